"""Every option of every group composes and validates; bad configs fail with one clear message."""
import re

import pytest
from omegaconf import OmegaConf

from support import CONF, compose as _compose
from kdrun import config, tasks
from kdrun.errors import ConfigError
from kdrun.losses import specs

config.register()
GROUPS = ["teacher", "student", "loss", "data", "hardware", "optimizer", "experiment"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
PRESET = {"ranking": [], "classification": ["experiment=classification_demo"],
          "causal_lm": ["experiment=causal_lm_demo"]}


def context(group: str, option: str) -> list:
    """Overrides an option needs around it: its task family's preset, and an online teacher for terms that
    read the teacher's internals (the default ranking teacher is precomputed)."""
    if group == "experiment":
        return []
    extra = []
    if group == "loss":
        names = list(OmegaConf.load(CONF / "loss" / f"{option}.yaml").terms)
        extra = ["teacher.mode=online"] if any(specs.TERMS[n].online_teacher for n in names) else []
    if group == "data" and option == "triples":  # its files have no default
        extra = [f"data.{k}={k}.tsv" for k in ("collection", "queries", "triples", "qrels")]
    if group == "teacher" and option == "scores_file":  # a scores file, and a student that needs no teacher model
        extra = ["teacher.scores_file=scores.tsv", "student=tinybert"]
    return PRESET[task_of(group, option)] + extra


def task_of(group: str, option: str) -> str:
    """The task family an option belongs to, read from its yaml (ranking for task-neutral groups)."""
    node = OmegaConf.load(CONF / group / f"{option}.yaml")
    if group == "loss":
        return specs.TERMS[next(iter(node.terms))].tasks[0]
    if group == "teacher":
        return tasks.family_of_kind(node.kind)[0]
    if group == "data":
        return node.task
    if group == "student" and node.get("init") == "scratch":
        return "classification"
    return "ranking"


def test_every_group_has_options():
    assert {g for g, _ in OPTIONS} == set(GROUPS)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(group, option, monkeypatch):
    """Each option, in the context of its task family (an experiment preset for classification/causal LM)."""
    if (group, option) == ("hardware", "multi_gpu"):
        monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun starts it
    cfg = _compose([*context(group, option), f"{group}={option}"])
    config.validate(cfg)
    if group != "experiment":
        node = OmegaConf.to_container(cfg[group], resolve=True, enum_to_str=True)
        assert node, f"{group}={option} is empty"
        if group == "loss":  # the command line wins over the preset's choice
            expected = list(OmegaConf.load(CONF / "loss" / f"{option}.yaml").terms)
            assert list(node["terms"]) == expected


def test_every_loss_yaml_names_registered_terms_with_every_setting_they_take():
    """A yaml shows its terms' every knob (so `loss.terms.NAME.SETTING=...` needs no '+'), and its terms share a task."""
    import dataclasses

    for path in sorted((CONF / "loss").glob("*.yaml")):
        terms = OmegaConf.load(path).terms
        tasks = set.intersection(*(set(specs.TERMS[n].tasks) for n in terms))
        assert tasks, f"{path.name}: its terms fit no common task"
        for name, node in terms.items():
            taken = {f.name for f in dataclasses.fields(specs.TERMS[name])} - {"teacher"}
            assert set(node) == taken, (path.name, name, set(node) ^ taken)
    assert {n for p in (CONF / "loss").glob("*.yaml") for n in OmegaConf.load(p).terms} == set(specs.TERMS)


def test_the_kl_losses_read_the_teachers_logits_at_the_scale_it_was_fine_tuned_at():
    """teacher_scale follows teacher.finetune.scale (a cosine teacher fine-tuned at 20 gives the KL 20 x cos); a
    setting of its own wins; other teachers give 1."""
    for option in ("in_batch_kl", "in_batch_kl_ce", "in_batch_kl_ce_z", "listwise_kl", "tas_b"):
        cfg = _compose(["teacher=minilm_finetuned", "teacher.similarity=cos", "teacher.finetune.scale=20",
                        f"loss={option}"])
        config.validate(cfg)
        [kl] = [n for n in cfg.loss.terms if n in ("in_batch_kl", "listwise_kl")]
        assert cfg.loss.terms[kl].teacher_scale == 20.0
        assert _compose([f"loss={option}"]).loss.terms[kl].teacher_scale == 1.0
    own = _compose(["teacher=minilm_finetuned", "teacher.finetune.scale=20", "loss=listwise_kl",
                    "loss.terms.listwise_kl.teacher_scale=5"])
    assert own.loss.terms.listwise_kl.teacher_scale == 5.0
    with pytest.raises(ConfigError, match="loss.terms.listwise_kl.teacher_scale"):
        config.validate(_compose(["loss=listwise_kl", "loss.terms.listwise_kl.teacher_scale=0"]))


def test_experiment_presets_pick_their_task_families():
    cls = _compose(["experiment=classification_demo"])
    assert cls.data.task == "classification" and cls.teacher.kind == "classifier"
    assert cls.teacher.finetune.steps > 0 and list(cls.loss.terms) == ["kd_kl", "ce"]
    lm = _compose(["experiment=causal_lm_demo"])
    assert lm.data.task == "causal_lm" and lm.teacher.gguf_file.endswith(".gguf")
    for data in ("chatterbot", "code_search"):
        rep = _compose([f"experiment=reproduce_{data}"])
        assert rep.data.task == "ranking" and rep.tracking.experiment == f"reproduce_{data}"
        assert rep.teacher.finetune.steps > 0 and rep.data.negatives_per_query == 4


@pytest.mark.parametrize("data", ["chatterbot", "code_search"])
def test_the_reproduction_presets_sweep_students_losses_and_seeds(data):
    from hydra import compose, initialize_config_dir

    from kdrun.sweep import swept_keys

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment=reproduce_{data}"], return_hydra_config=True)
    params = dict(cfg.hydra.sweeper.params)
    losses = ("in_batch_kl_ce", "in_batch_kl_ce_z", "ce", "pointwise_mse", "margin_mse", "listwise_kl")  # (the
    # embeddings' pass first)
    assert params == {"student": "teacher_slice,colbert", "loss": ",".join(losses), "train.seed": "1,2,3"}
    assert swept_keys([f"experiment=reproduce_{data}"], cfg) == ["student", "loss", "train.seed"]
    assert swept_keys(["train.seed=1", "optimizer.lr=1e-4,2e-4"], cfg) == ["optimizer.lr", "student", "loss"]
    for student in ("teacher_slice", "colbert"):  # every job of the sweep composes and validates
        for loss in losses:
            config.validate(_compose([f"experiment=reproduce_{data}", f"student={student}", f"loss={loss}"]))


def test_design_card_command_composes():
    cfg = _compose(["teacher=bert", "student=tinybert", "loss=margin_mse"])
    config.validate(cfg)
    assert cfg.teacher.kind == "cross_encoder"
    assert cfg.student.name == "huawei-noah/TinyBERT_General_4L_312D"
    assert list(cfg.loss.terms) == ["margin_mse"]


def test_a_precomputed_bi_encoder_teacher_gives_in_batch_terms_their_scores():
    """in_batch_kl and tas_b read the teacher's in-batch scores: a precomputed bi-encoder teacher keeps its embeddings
    (kdrun.models.encoders.in_batch_from_embeddings), so they need no online teacher."""
    for loss in ("in_batch_kl", "tas_b"):
        cfg = _compose([f"loss={loss}", "teacher.mode=precompute"])
        config.validate(cfg)
        assert config.teacher_keeps(cfg) == {"in_batch_scores", "embeddings"}
    assert config.teacher_keeps(_compose(["teacher.mode=online"])) == frozenset()


def test_default_is_offline_minilm_teaching_its_two_layer_slice(minilm_dir):
    cfg = _compose()
    assert cfg.teacher.path == minilm_dir
    assert cfg.student.init == config.StudentInit.teacher_layers
    assert list(cfg.student.layers) == [0, 5]


@pytest.mark.parametrize("overrides,match", [
    (["student.layers=[]"], "student.layers"),
    (["student.layers=[1,1]"], "distinct"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.max_steps=0", "train.epochs=0"], "train.max_steps"),
    (["data.eval_fraction=1.5"], "data.eval_fraction"),
    (["optimizer.lr=0"], "optimizer.lr"),
    (["teacher.path=null", "teacher.name=null"], "teacher.path"),
    (["student=tinybert", "student.name=null"], "student.path"),
    (["loss=kd_kl"], r"kd_kl is a classification/causal_lm loss.*losses for ranking: \['ce', 'embedding_align', 'in_batch_kl'"),
    (["experiment=classification_demo", "loss=margin_mse"], "margin_mse is a ranking loss"),
    (["experiment=causal_lm_demo", "loss=hidden_mse"], "hidden_mse is a classification loss"),
    (["data=fortunes"], "teacher.kind=bi_encoder is a ranking teacher but data.task=classification"),
    (["experiment=classification_demo", "teacher.mode=precompute", "loss=tinybert"], "teacher.mode=online"),
    (["loss=in_batch_kl", "teacher=minilm_cross_encoder", "teacher.mode=precompute"],
     r"in_batch_kl reads the teacher's internals.*one bi-encoder teacher, whose cached embeddings"),
    (["loss=tas_b", "teacher=minilm_cross_encoder"], "in_batch_kl reads the teacher's internals"),
    (["experiment=causal_lm_demo", "teacher.mode=precompute"], "teacher.top_k"),
    (["teacher.top_k=8"], "a ranking teacher gives its full outputs"),
    (["experiment=classification_demo", "loss=jsd", "loss.terms.jsd.beta=1.0"], "loss.terms.jsd.beta=1.0"),
    (["experiment=causal_lm_demo", "loss=taid", "loss.terms.taid.t_start=1.0"], "t_start < t_end"),
    (["experiment=classification_demo", "student.arch=late_interaction"],
     r"student.arch=late_interaction: a classification student is one of \['bi_encoder'\]"),
    (["student.dim=0"], "student.dim"),
    (["data=triples", "data.collection=c.tsv"], "data.queries has no value"),
    (["teacher=scores_file"], "set teacher.scores_file=FILE"),
    (["teacher=scores_file", "teacher.scores_file=s.tsv"], "set teacher.path .*or student.path"),
    (["teacher.mode=scores_file", "teacher.scores_file=s.tsv", "teacher.max_missing_fraction=1.0"],
     "teacher.max_missing_fraction"),
    (["experiment=classification_demo", "teacher.mode=scores_file", "teacher.scores_file=s.tsv"],
     "scores_file reads ranking scores"),
    (["mode=score", "experiment=classification_demo"], "mode=score writes a teacher's scores"),
    (["mode=score", "teacher.mode=scores_file", "teacher.scores_file=s.tsv"], "and a teacher model"),
    (["+teacher@teachers.second=minilm_offline", "+loss.terms.margin_mse.teacher=third"],
     r"no such teacher; choose one of \['teacher', 'second'\]"),
    (["+teacher@teachers.second=minilm_classifier"], "teachers.second.kind=classifier is a classification teacher"),
    (["+teacher@teachers.second=minilm_offline", "teachers.second.weight=0"], "teachers.second.weight"),
    (["experiment=causal_lm_demo", "+teacher@teachers.second=smollm2"], "a causal_lm run takes one"),
    (["+teacher@teachers.second=minilm_offline", "teacher.mode=online", "loss=in_batch_kl"], "several teachers"),
    (["experiment=causal_lm_demo", "teacher.finetune.steps=10"],
     "kdrun fine-tunes classifier and ranking teachers, not causal_lm teachers"),
    (["experiment=classification_demo", "teacher.finetune.in_batch=true"],
     "teacher.finetune.in_batch=True: in-batch negatives are a ranking setting"),
    (["experiment=classification_demo", "teacher.finetune.negatives=2"], "teacher.finetune.negatives=2: how many"),
    (["experiment=classification_demo", "train.on_policy.fraction=0.5"], "trains a causal LM on its own samples"),
    (["experiment=causal_lm_gkd", "train.on_policy.fraction=1.5"], r"fraction=1.5 must be in \[0, 1\]"),
    (["experiment=causal_lm_gkd", "teacher.mode=precompute", "teacher.top_k=8"],
     "the teacher scores the student's own samples, so it must run online"),
    (["experiment=causal_lm_gkd", "train.on_policy.top_p=0"], r"top_p=0.0 must be in \(0, 1\]"),
    (["student=colbert", "loss=embedding_align"], "aligns a bi-encoder student's embeddings with a bi-encoder"),
    (["loss=embedding_align", "+teacher@teachers.second=minilm_offline"], "precompute with one bi-encoder teacher"),
    (["loss=embedding_align", "teacher.mode=online", "+teacher@teachers.second=minilm_offline",
      "teachers.second.mode=online"], "does not work with several teachers"),
    (["teacher=minilm_finetuned", "teacher.finetune.negatives=-1"], "give a number >= 0 with ranking data"),
    (["teacher=minilm_finetuned", "teacher.finetune.negatives=0", "teacher.finetune.in_batch=false"],
     "leaves each positive nothing to rank against"),
    (["experiment=classification_demo", "teacher.finetune.scale=20"], "teacher.finetune.scale=20.0: a ranking"),
    (["teacher=minilm_finetuned", "teacher.finetune.scale=0"], r"teacher.finetune.scale=0.0 must be in \(0, inf\)"),
])
def test_cross_field_validation_names_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        config.validate(_compose(overrides))


LOSS_OPTIONS = [o for g, o in OPTIONS if g == "loss"]


@pytest.mark.parametrize("option", LOSS_OPTIONS)
def test_a_setting_a_term_does_not_take_is_an_error_naming_the_term(option):
    """Settings were once dropped silently (forward_kl's beta, jsd's temperature): every term of every loss yaml
    refuses a setting another term takes, naming the term and the settings it does take."""
    import dataclasses

    every = {f.name for cls in specs.TERMS.values() for f in dataclasses.fields(cls)}
    for name in OmegaConf.load(CONF / "loss" / f"{option}.yaml").terms:
        taken = [f.name for f in dataclasses.fields(specs.TERMS[name])]
        foreign = sorted(every - set(taken))[0]
        match = re.escape(f"loss.terms.{name}: {name} takes no '{foreign}'") + ".*" + re.escape(f"its settings: {taken}")
        with pytest.raises(ConfigError, match=match):
            config.validate(_compose([*context("loss", option), f"loss={option}", f"+loss.terms.{name}.{foreign}=1"]))


def test_only_the_extension_points_take_new_keys():
    cfg = _compose(["+tracking.tags.team=search", "+teacher@teachers.second=minilm_offline"])
    config.check_known_keys(cfg)  # tracking.tags.NAME and teachers.NAME are open
    for added in ("+train.max_step=5", "+teachers.second.poolin=cls", "+data.language2=en", "+hardware.gpus=2"):
        with pytest.raises(ConfigError, match="is not a kdrun setting"):
            config.validate(_compose(["+teacher@teachers.second=minilm_offline", added]))


@pytest.mark.parametrize("override,message", [
    ("train.epochs=inf", "train.epochs=inf must be a finite number"),
    ("optimizer.lr=nan", "optimizer.lr=nan must be a finite number"),
    ("optimizer.betas=[2,3]", "optimizer.betas.0=2.0 must be in [0, 1)"),
    ("optimizer.betas=[0.9]", "optimizer.betas=[0.9] must be two numbers"),
    ("optimizer.eps=0", "optimizer.eps=0.0 must be in (0, inf)"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay=-0.1 must be in [0, inf)"),
    ("student.layers=[0,[5]]", "student.layers=[0, [5]]: each item must be a number, not a list"),
    ("student.layers=[0,-1]", "student.layers.1=-1 must be in [0, inf)"),
    ("student.max_length=0", "student.max_length=0 must be in [1, inf)"),
    ("data.max_train_queries=0", "data.max_train_queries=0 must be in [1, inf)"),
    ("data.mine_depth=0", "data.mine_depth=0 must be in [1, inf)"),
    ("teacher.finetune.lr=-1", "teacher.finetune.lr=-1.0 must be in (0, inf)"),
    (f"+tracking.tags.note={'x' * 5001}", "MLflow takes tag names up to 250 and values up to 5000 characters"),
])
def test_values_that_pass_the_types_but_not_the_ranges_are_config_errors(override, message):
    from kdrun.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        config.validate(_compose([override]))
    assert message in str(e.value)


def test_every_preset_passes_the_range_checks():
    for name in sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")):
        config.validate(_compose([f"experiment={name}"]))


def test_every_loss_is_runnable_somewhere():
    """Every loss yaml fits at least one task family, where tests/tasks/<family>/test_runs.py trains it."""
    from support import losses_for

    assert set(losses_for("classification")) | set(losses_for("causal_lm")) | set(losses_for("ranking")) == \
        {p.stem for p in (CONF / "loss").glob("*.yaml")}
