"""Classification and causal-LM distillation through the real `kdrun` entrypoint, checked in MLflow.

Every loss yaml under conf/loss/ trains 2 steps in each task family it fits: one `kdrun -m loss=...`
sweep per family (the jobs share one process, so imports and model conversion are paid once), then
one test per loss reads its run back from the MLflow store.
"""
import json

import pytest
from omegaconf import OmegaConf

from conftest import CONF, offline_env, run_kdrun
from kdrun.losses.specs import TERMS
from kdrun.report import term_names


def losses_for(task: str):
    out = []
    for path in sorted((CONF / "loss").glob("*.yaml")):
        names = list(OmegaConf.load(path).terms)
        if all(task in TERMS[n].tasks for n in names):
            out.append(path.stem)
    return out


CLS_LOSSES, LM_LOSSES, RANK_LOSSES = losses_for("classification"), losses_for("causal_lm"), losses_for("ranking")
STEPS = ["train.max_steps=2", "train.log_every=1", "tracking.log_student=false"]
CLS = ["experiment=classification_demo", "teacher.finetune.steps=4", "teacher.max_length=32",
       "student.max_length=32", "data.max_train=48", "data.max_eval=24", "train.batch_size=8", *STEPS]
LM = ["experiment=causal_lm_demo", "data.block_size=24", "data.max_train_blocks=8", "data.max_eval_blocks=2",
      "train.batch_size=2", "student.layers=[0,29]", "train.on_policy.eval_samples=0", *STEPS]


def _client(tmp):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")


def _sweep(tmp_path_factory, cache, name, base, losses):
    tmp = tmp_path_factory.mktemp(name)
    r = run_kdrun(["-m", f"loss={','.join(losses)}", *base, f"tracking.experiment={name}",
                   f"hydra.sweep.dir={tmp / 'multi'}"], cwd=tmp, env=offline_env(tmp, cache), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    client = _client(tmp)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    runs = [x for x in runs if "kdrun.sweep_parent" not in x.data.tags]  # the jobs, not the sweep's parent run
    assert len(runs) == len(losses)
    return client, runs


@pytest.fixture(scope="module")
def cls_sweep(tmp_path_factory, kdrun_cache):
    return _sweep(tmp_path_factory, kdrun_cache, "cls", CLS, CLS_LOSSES)


@pytest.fixture(scope="module")
def lm_sweep(tmp_path_factory, kdrun_cache):
    return _sweep(tmp_path_factory, kdrun_cache, "lm", LM, LM_LOSSES)


@pytest.fixture(scope="module")
def rank_sweep(tmp_path_factory, kdrun_cache):
    base = ["train.max_steps=2", "train.batch_size=4", "train.log_every=1", "data.max_train_queries=8",
            "data.max_eval_queries=3", "tracking.log_student=false", "teacher.mode=online"]
    return _sweep(tmp_path_factory, kdrun_cache, "rank", base, RANK_LOSSES)


def _run_of(sweep, loss):
    client, runs = sweep
    yaml_terms = list(OmegaConf.load(CONF / "loss" / f"{loss}.yaml").terms)
    matching = [r for r in runs if r.data.tags.get("kdrun.choice.loss") == loss]  # (two presets may share terms)
    assert len(matching) == 1, f"loss={loss}: {len(matching)} runs"
    assert sorted(term_names(matching[0])) == sorted(yaml_terms)
    return client, matching[0], yaml_terms


def _check_run(sweep, loss, eval_keys, student_only=()):
    client, run, terms = _run_of(sweep, loss)
    assert run.info.status == "FINISHED"
    hist = lambda key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
    for term in ["loss", *terms]:
        values = hist(f"train/{term}")
        assert [s for s, _ in values] == [1, 2], (loss, term, values)
        assert all(v == v and abs(v) < 1e6 for _, v in values), (loss, term, values)  # finite
    for key in eval_keys:
        assert f"eval/student/{key}" in run.data.metrics and f"eval/teacher/{key}" in run.data.metrics, key
    for key in student_only:
        assert f"eval/student/{key}" in run.data.metrics, key
    if "taid" in terms:
        t = hist("train/taid_t")
        assert 0.4 <= t[0][1] <= t[-1][1] <= 1.0
    return client, run


def test_every_loss_is_runnable_somewhere():
    assert set(CLS_LOSSES) | set(LM_LOSSES) | set(RANK_LOSSES) == {p.stem for p in (CONF / "loss").glob("*.yaml")}


@pytest.mark.parametrize("loss", CLS_LOSSES)
def test_classification_loss_trains_through_kdrun(cls_sweep, loss):
    client, run = _check_run(cls_sweep, loss, ["accuracy", "macro_f1"], student_only=["agreement"])
    assert run.data.tags["kdrun.task"] == "classification"
    assert 0.0 <= run.data.metrics["eval/student/agreement"] <= 1.0
    assert run.data.params["data/classes"] == "4"


def test_classification_teacher_is_fine_tuned_once_per_sweep(cls_sweep):
    _, runs = cls_sweep
    hits = sorted(r.data.metrics["teacher/finetune_cache_hit"] for r in runs)
    assert hits == [0.0] + [1.0] * (len(runs) - 1)


def test_an_already_fine_tuned_classifier_directory_is_used_as_it_is(cls_sweep, tmp_path, kdrun_cache):
    """teacher.path=DIR with teacher.finetune.steps=0: the sweep's fine-tuned teacher, a plain HF directory."""
    fine_tuned = next(p for p in (kdrun_cache / "teachers").iterdir() if (p / "kdrun_complete").is_file())
    r = run_kdrun([*CLS, f"teacher.path={fine_tuned}", "teacher.finetune.steps=0", "tracking.experiment=cls_dir",
                   f"hydra.run.dir={tmp_path / 'o'}"], cwd=tmp_path, env=offline_env(tmp_path, kdrun_cache))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    client = _client(tmp_path)
    run = client.search_runs([client.get_experiment_by_name("cls_dir").experiment_id])[0]
    # the same teacher as the sweep's: the same held-out accuracy
    _, sweep_runs = cls_sweep
    assert run.data.metrics["eval/teacher/accuracy"] == sweep_runs[0].data.metrics["eval/teacher/accuracy"]


# the causal-LM runs load a 135M-parameter teacher (de-quantised from GGUF once per cache, ~20 s): slow suite
@pytest.mark.slow
@pytest.mark.parametrize("loss", LM_LOSSES)
def test_causal_lm_loss_trains_through_kdrun(lm_sweep, loss):
    client, run = _check_run(lm_sweep, loss, ["perplexity"], student_only=["top1_agreement", "kl_to_teacher"])
    assert run.data.tags["kdrun.task"] == "causal_lm"
    assert run.data.metrics["eval/teacher/perplexity"] < run.data.metrics["eval/student/perplexity"]


@pytest.mark.parametrize("loss", RANK_LOSSES)
def test_ranking_loss_trains_through_kdrun(rank_sweep, loss):
    _check_run(rank_sweep, loss, ["mrr_at_10", "ndcg_at_10"])


@pytest.mark.parametrize("loss", ["ce", "pskd"])
def test_a_loss_that_reads_no_teacher_skips_a_precomputed_teachers_pass(tmp_path, kdrun_cache, loss):
    r = run_kdrun([*CLS, "teacher.mode=precompute", f"loss={loss}", "tracking.experiment=no_pass",
                   f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path, env=offline_env(tmp_path, kdrun_cache))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    client = _client(tmp_path)
    [run] = client.search_runs([client.get_experiment_by_name("no_pass").experiment_id])
    assert run.info.status == "FINISHED" and "eval/student/accuracy" in run.data.metrics
    assert "teacher/cache_misses" not in run.data.metrics and "teacher/cache_hits" not in run.data.metrics


def test_classification_precomputed_teacher_scratch_student_and_a_loadable_save(tmp_path, kdrun_cache):
    r = run_kdrun([*CLS, "teacher.mode=precompute", "student=scratch", "loss=kd", "tracking.log_student=true",
                   "tracking.experiment=cls_pre", f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path,
                  env=offline_env(tmp_path, kdrun_cache))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "accuracy" in r.stdout and "agreement" in r.stdout
    client = _client(tmp_path)
    run = client.search_runs([client.get_experiment_by_name("cls_pre").experiment_id])[0]
    assert run.data.metrics["teacher/seconds"] > 0 and run.data.metrics["teacher/cache_misses"] == 1
    assert run.data.params["student.init"] == "scratch"
    from transformers import AutoModelForSequenceClassification

    local = client.download_artifacts(run.info.run_id, "student", str(tmp_path / "dl"))
    model = AutoModelForSequenceClassification.from_pretrained(local)
    assert model.config.num_hidden_layers == 2 and model.config.num_labels == 4
    assert model.config.id2label[0] == "computers"


@pytest.mark.slow
def test_causal_lm_topk_teacher_online_and_precomputed_and_a_loadable_save(tmp_path, kdrun_cache):
    for mode, save in (("online", "false"), ("precompute", "true")):
        r = run_kdrun([*LM, "teacher.top_k=16", f"teacher.mode={mode}", "loss=jsd", f"tracking.log_student={save}",
                       f"tracking.experiment=lm_{mode}", f"hydra.run.dir={tmp_path / mode}",
                       *(["tracking.register_as=kd-lm"] if save == "true" else [])], cwd=tmp_path,
                      env=offline_env(tmp_path, kdrun_cache))
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    client = _client(tmp_path)
    runs = {m: client.search_runs([client.get_experiment_by_name(f"lm_{m}").experiment_id])[0]
            for m in ("online", "precompute")}
    assert runs["online"].data.params["teacher.top_k"] == "16"
    # the same blocks, the same sparse teacher, the same seed: the first step's loss agrees
    first = {m: client.get_metric_history(run.info.run_id, "train/jsd")[0].value for m, run in runs.items()}
    assert first["online"] == pytest.approx(first["precompute"], rel=1e-4)
    from transformers import AutoModelForCausalLM

    local = client.download_artifacts(runs["precompute"].info.run_id, "student", str(tmp_path / "dl"))
    assert AutoModelForCausalLM.from_pretrained(local).config.num_hidden_layers == 2

    # the registered logged model (transformers flavor, text-generation): its held-out perplexity is the run's
    import math

    import mlflow
    import torch
    from hydra import compose, initialize_config_dir

    from kdrun import config, pipeline
    from kdrun.tasks.causal_lm.task import pack

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    info = mlflow.models.get_model_info("models:/kd-lm/1")
    assert "transformers" in info.flavors and info.signature is not None
    parts = mlflow.transformers.load_model("models:/kd-lm/1", return_type="components")
    assert parts["task"] == "text-generation"
    config.register()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[a for a in LM if a.startswith(("experiment=", "data."))])
    _, data = pipeline.load_data(cfg)
    blocks = pack(data.eval_texts, parts["tokenizer"], data.block_size, data.max_eval_blocks)
    with torch.inference_mode():
        logits = parts["model"](input_ids=blocks).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)).item()
    assert math.exp(nll) == pytest.approx(runs["precompute"].data.metrics["eval/student/perplexity"], rel=1e-4)


@pytest.mark.slow
def test_causal_lm_student_with_another_tokenizer_is_a_config_error(tmp_path, kdrun_cache, minilm_dir):
    r = run_kdrun([*LM, "student.init=pretrained", f"student.path={minilm_dir}", f"hydra.run.dir={tmp_path / 'o'}"],
                  cwd=tmp_path, env=offline_env(tmp_path, kdrun_cache))
    assert r.returncode == 2
    assert "different tokenizers" in r.stderr and "Traceback" not in r.stderr


def test_classifier_teacher_without_a_trained_head_says_how_to_fix(tmp_path, kdrun_cache):
    r = run_kdrun([*CLS, "teacher.finetune.steps=0", f"hydra.run.dir={tmp_path / 'o'}"], cwd=tmp_path,
                  env=offline_env(tmp_path, kdrun_cache))
    assert r.returncode == 2
    assert "no trained classification head" in r.stderr and "teacher.finetune.steps" in r.stderr
    assert "Traceback" not in r.stderr


def test_local_jsonl_classification_through_datasets(tmp_path, kdrun_cache):
    rows = [{"text": f"{w} number {i} is here", "label": w} for i in range(30) for w in ("apple", "engine")]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    r = run_kdrun(["experiment=classification_demo", "data=text_classification", f"data.path={data}",
                   "teacher.finetune.steps=2", "teacher.max_length=16", "student.max_length=16",
                   "train.batch_size=8", *STEPS, "tracking.experiment=jsonl", f"hydra.run.dir={tmp_path / 'o'}"],
                  cwd=tmp_path, env=offline_env(tmp_path, kdrun_cache))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    client = _client(tmp_path)
    run = client.search_runs([client.get_experiment_by_name("jsonl").experiment_id])[0]
    assert run.data.params["data/classes"] == "2" and "eval/student/accuracy" in run.data.metrics


def test_token_level_terms_need_teacher_and_student_to_tokenize_alike(tmp_path, kdrun_cache):
    r = run_kdrun([*CLS, "loss=hidden_mse", "student.max_length=16", f"hydra.run.dir={tmp_path / 'o'}"], cwd=tmp_path,
                  env=offline_env(tmp_path, kdrun_cache))
    assert r.returncode == 2 and "token by token" in r.stderr and "Traceback" not in r.stderr


def test_missing_fortunes_folder_names_the_key(tmp_path, kdrun_cache):
    r = run_kdrun([*CLS, f"data.path={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'o'}"], cwd=tmp_path,
                  env=offline_env(tmp_path, kdrun_cache))
    assert r.returncode == 2 and "data.path=" in r.stderr and "no such directory" in r.stderr


def _demo(tmp_path, experiment):
    r = run_kdrun([f"experiment={experiment}", f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path,
                  env=offline_env(tmp_path), timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    client = _client(tmp_path)
    run = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])[0]
    return run, lambda key: [m.value for m in client.get_metric_history(run.info.run_id, key)]


@pytest.mark.demo
def test_classification_demo_distils_a_better_student(tmp_path):
    """`kdrun experiment=classification_demo`: fine-tuned teacher well above chance, the 2-layer student
    gains accuracy and agreement through KD and stays at or below its teacher."""
    run, hist = _demo(tmp_path, "classification_demo")
    acc, agree = hist("eval/student/accuracy"), hist("eval/student/agreement")
    teacher = run.data.metrics["eval/teacher/accuracy"]
    assert teacher > 0.7, teacher  # 4 classes: chance is 0.25
    assert acc[-1] > acc[0] + 0.1, acc
    assert agree[-1] > agree[0] + 0.1, agree
    assert acc[-1] <= teacher + 0.02
    assert run.data.metrics["teacher/finetune_cache_hit"] == 0.0 and run.data.metrics["teacher/finetune_seconds"] > 0


@pytest.mark.demo
def test_causal_lm_demo_distils_a_better_student(tmp_path):
    """`kdrun experiment=causal_lm_demo`: the 8-layer slice's perplexity and KL to the teacher fall by
    orders of magnitude and its top-1 agreement with the teacher rises."""
    run, hist = _demo(tmp_path, "causal_lm_demo")
    ppl, kl = hist("eval/student/perplexity"), hist("eval/student/kl_to_teacher")
    agree = hist("eval/student/top1_agreement")
    assert ppl[-1] < ppl[0] / 1000, ppl
    assert kl[-1] < kl[0] / 2, kl
    assert agree[-1] > agree[0] + 0.1, agree
    assert run.data.metrics["eval/teacher/perplexity"] < ppl[-1]
