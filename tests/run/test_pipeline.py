"""A whole run (kdrun/pipeline.py) through the real `kdrun` entry point, in this process, on the tiny models of
experiment=smoke: what lands in MLflow (params, tags, metric histories, artifacts, a loadable student), the errors a
run gives before anything trains, and `pipeline.run(cfg)` from a composed config. The default job's quality on the
real models: test_default_job_improves_the_student (slow)."""
from pathlib import Path

import pytest

from support import QUIET, RANK, client, compose, entry, history, kdrun, offline_env, ok, only_run, run_kdrun, values

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
E2E = ["experiment=smoke", "train.max_steps=4", "train.batch_size=8", "train.log_every=2", "train.eval_every=2",
       "data.max_eval_queries=20", "tracking.experiment=e2e"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    return tmp, ok(kdrun(E2E + [f"hydra.run.dir={tmp / 'out'}"], tmp))


def test_run_finishes_and_prints_metrics(default_run):
    _, r = default_run
    assert "student before" in r.stdout and "teacher" in r.stdout
    assert "mrr_at_10" in r.stdout and "MLflow run" in r.stdout


def test_params_tags_and_metric_histories_land_in_mlflow(default_run):
    tmp, _ = default_run
    c, run = only_run(tmp, "e2e")
    assert run.info.status == "FINISHED"
    p = run.data.params
    assert p["teacher.kind"] == "bi_encoder" and p["student.init"] == "teacher_layers"
    assert p["student.layers"] == "[0, 5]" and p["train.max_steps"] == "4"
    assert {k: v for k, v in p.items() if k.startswith("loss.terms.")} == {"loss.terms.margin_mse.weight": "1.0"}
    assert p["data.task"] == "ranking" and run.data.tags["kdrun.task"] == "ranking"
    assert "kdrun.command" in run.data.tags and "train.max_steps=4" in run.data.tags["kdrun.command"]
    hist = lambda key: history(c, run, key)
    assert [s for s, _ in hist("train/loss")] == [2, 4]
    assert [s for s, _ in hist("train/margin_mse")] == [2, 4]
    assert all(v > 0 for _, v in hist("train/lr"))
    assert all(v > 0 for _, v in hist("train/samples_per_s"))
    assert all(v > 0 for _, v in hist("train/tokens_per_s"))  # real (non-pad) tokens
    assert all(0.5 < v <= 1.0 for _, v in hist("train/real_token_fraction"))  # length buckets and groups
    assert int(p["data/distinct_texts"]) > 0 and "data/tokenize_seconds" in run.data.metrics
    assert int(p["data/train_queries"]) == 816 and not any(k in run.data.metrics for k in ("data/train_queries",
                                                                                          "data/distinct_texts"))
    assert p["train.batch_size"] == "8" and p["hardware.batch_size"] == "32"  # the command line wins
    assert p["train.grad_accum"] == "1"  # resolved from the hardware profile, not logged as ${...}
    for who in ("student", "teacher"):
        for metric in ("mrr_at_10", "ndcg_at_10", "recall_at_10"):
            steps = [s for s, _ in hist(f"eval/{who}/{metric}")]
            assert steps == [0, 2, 4], (who, metric, steps)
    assert all(0.0 <= v <= 1.0 for _, v in hist("eval/student/mrr_at_10"))
    # the teacher is frozen: its metrics do not move
    assert len({v for _, v in hist("eval/teacher/mrr_at_10")}) == 1
    # the choices of the config groups, as tags (the UI filters by them, sweep results group by them)
    assert run.data.tags["kdrun.choice.experiment"] == "smoke" and run.data.tags["kdrun.choice.teacher"] == "tiny"


def test_artifacts_config_overrides_and_a_loadable_student(default_run):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tmp, _ = default_run
    c, run = only_run(tmp, "e2e")
    names = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "overrides.txt", "student"} <= names
    student_files = {a.path for a in c.list_artifacts(run.info.run_id, "student")}
    assert {"student/config.json", "student/model.safetensors", "student/tokenizer.json"} <= student_files
    local = c.download_artifacts(run.info.run_id, "student", str(tmp / "dl"))
    model, tok = AutoModel.from_pretrained(local), AutoTokenizer.from_pretrained(local)
    assert model.config.num_hidden_layers == 2
    with torch.inference_mode():
        out = model(**tok(["hello there"], return_tensors="pt")).last_hidden_state
    assert out.shape[-1] == 32 and torch.isfinite(out).all()  # kdrun-tiny/bert's width
    overrides = c.download_artifacts(run.info.run_id, "overrides.txt", str(tmp / "dl2"))
    assert "train.max_steps=4" in open(overrides).read()


def test_the_experiment_opens_on_its_runs_in_the_mlflow_ui(default_run):
    """MLflow 3's UI opens an experiment on its GenAI pages, where these runs do not show: kdrun tags the experiment
    as a model-training one and `make ui` (kdrun-ui) prints the runs view's URL, as the run's own summary does."""
    from kdrun import ui

    tmp, r = default_run
    c = client(tmp)
    exp = c.get_experiment_by_name("e2e")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    _, run = only_run(tmp, "e2e")
    assert f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}" in r.stdout
    legacy = c.create_experiment("made_before_the_tag")  # an experiment logged by an older kdrun
    c.create_run(legacy, tags={"kdrun.command": "kdrun"})
    shown = ok(entry(ui.main, ["--no-serve", "--port", "5123", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}"],
                     tmp, prog="kdrun-ui"))
    assert f"http://127.0.0.1:5123/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning" in shown.stdout
    assert f"#/experiments/{legacy}/runs?workflowType=machine_learning" in shown.stdout
    assert c.get_experiment(legacy).tags["mlflow.experimentKind"] == "custom_model_development"


def test_hub_teacher_without_network_names_teacher_path(tmp_path):
    r = kdrun(["teacher=bert", f"hydra.run.dir={tmp_path / 'out'}"], tmp_path)
    assert r.returncode == 2
    assert "nboost/pt-bert-base-uncased-msmarco" in r.stderr
    assert "not available offline" in r.stderr and "teacher.path=" in r.stderr
    assert "Traceback" not in r.stderr


def test_hub_student_without_network_names_student_path(tmp_path):
    r = kdrun(["student=tinybert", f"hydra.run.dir={tmp_path / 'out'}"], tmp_path)
    assert r.returncode == 2
    assert "huawei-noah/TinyBERT_General_4L_312D" in r.stderr and "student.path=" in r.stderr


@pytest.fixture(scope="module")
def local_cross_encoder(tmp_path_factory, tiny_bert):
    """A local cross-encoder directory (the tiny BERT + a 2-logit classification head), as a user would pass with
    teacher.path=DIR. Its head is untrained: this checks the plumbing, not the teacher's quality."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    d = tmp_path_factory.mktemp("cross_encoder")
    AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(d)
    return d


@pytest.mark.parametrize("mode", ["precompute"])  # online: the student x teacher matrix (tests/teachers/test_modes.py)
def test_design_card_teacher_from_a_local_path(tmp_path, local_cross_encoder, mode):
    ok(kdrun([*RANK, "teacher=bert", f"teacher.path={local_cross_encoder}", f"teacher.mode={mode}",
              "teacher.max_length=64", "data.max_eval_queries=3", "tracking.experiment=cross",
              f"hydra.run.dir={tmp_path / 'out'}"], tmp_path))
    _, run = only_run(tmp_path, "cross")
    assert run.info.status == "FINISHED" and run.data.params["teacher.kind"] == "cross_encoder"
    assert "eval/teacher/mrr_at_10" in run.data.metrics


@pytest.mark.slow(seconds=110)
def test_default_job_improves_the_student(tmp_path):
    """What `make demo` runs, on the real models: the distilled 2-layer slice beats itself before training on
    held-out queries. Over 60 s (the whole default job on all-MiniLM-L6-v2): the one test that the default command
    distils a better student, which no tiny model can show."""
    ok(kdrun([f"hydra.run.dir={tmp_path / 'out'}", "tracking.experiment=demo"], tmp_path))
    c, run = only_run(tmp_path, "demo")
    mrr, ndcg = values(c, run, "eval/student/mrr_at_10"), values(c, run, "eval/student/ndcg_at_10")
    assert mrr[-1] > mrr[0] + 0.05, mrr
    assert ndcg[-1] > ndcg[0] + 0.05, ndcg
    assert mrr[-1] < run.data.metrics["eval/teacher/mrr_at_10"]  # a 2-layer student stays below its teacher


def test_flops_per_token_count_the_layers_every_token_passes(minilm_dir):
    """2 x the parameters applied to each token: embedding tables (a lookup) and BERT's pooler (the first token,
    once per sequence) left out, so a student with 2 of the teacher's 6 layers costs a third of it per token."""
    from transformers import AutoModel

    from kdrun.pipeline import flops_per_token

    teacher = AutoModel.from_pretrained(minilm_dir)
    layer = sum(p.numel() for p in teacher.encoder.layer[0].parameters())
    norm = sum(p.numel() for p in teacher.embeddings.LayerNorm.parameters())
    assert flops_per_token(teacher) == 2.0 * (6 * layer + norm)
    teacher.encoder.layer = teacher.encoder.layer[:1] + teacher.encoder.layer[5:]
    assert flops_per_token(teacher) == 2.0 * (2 * layer + norm)
    assert flops_per_token(teacher) / (2.0 * (6 * layer + norm)) == pytest.approx(1 / 3, rel=1e-3)


def test_unreachable_tracking_server_fails_at_once_with_the_fix(tmp_path):
    """Before any loading, in seconds (MLflow's own HTTP retries took 250 s here), credentials redacted."""
    import time

    t0 = time.perf_counter()
    r = kdrun(RANK + ["tracking.uri=http://bob:hunter2@127.0.0.1:9"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "tracking server 'http://bob:***REDACTED***@127.0.0.1:9' cannot be reached" in r.stderr, r.stderr
    assert "make server" in r.stderr and "hunter2" not in r.stderr + r.stdout
    assert time.perf_counter() - t0 < 60


def test_a_non_finite_loss_fails_the_run_with_the_reason_tagged_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "out"
    r = kdrun(RANK + ["train.max_steps=4", "optimizer.lr=1e30", "optimizer.warmup_ratio=0",
                      "train.checkpoint_every=1", "train.log_every=3", "tracking.experiment=nan",
                      f"hydra.run.dir={out}"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "kdrun: error: non-finite loss or gradient at step 2" in r.stderr, r.stderr[-2000:]
    good = out / "checkpoints" / "ckpt-00000001"
    assert f"The last good checkpoint is kept: {good}" in r.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-00000001"]  # step 2's never written
    _, run = only_run(tmp_path, "nan")
    assert run.info.status == "FAILED"
    assert run.data.tags["kdrun.failure"].startswith("NonFiniteLossError: non-finite loss or gradient at step 2")


@pytest.mark.parametrize("key", ["output_dir", "hydra.run.dir"])
def test_an_output_dir_that_cannot_be_written_fails_before_anything_runs(tmp_path, key):
    (tmp_path / "a_file").write_text("")
    r = kdrun(RANK + [f"{key}={tmp_path / 'a_file' / 'out'}"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"kdrun: error: {key}={tmp_path / 'a_file' / 'out'} is not a writable directory (Not a directory)" \
        in r.stderr


def test_a_users_own_loss_term_trains_through_kdrun_by_target(tmp_path, monkeypatch):
    """tests/plugins/my_terms.py is not part of kdrun: its function trains a student through the real entrypoint,
    named by _target_, its setting logged; a setting it does not take stops the run before anything loads."""
    monkeypatch.syspath_prepend(str(PLUGINS))  # (a new process: PYTHONPATH)
    mine = ["~loss.terms.margin_mse", "+loss.terms.mine._target_=my_terms.scaled_margin_mse",
            "+loss.terms.mine.scale=2.0", "tracking.experiment=custom"]
    ok(kdrun(RANK + mine + [f"hydra.run.dir={tmp_path / 'out'}"], tmp_path))
    c, run = only_run(tmp_path, "custom")
    assert run.data.params["loss.terms.mine._target_"] == "my_terms.scaled_margin_mse"
    assert run.data.params["loss.terms.mine.scale"] == "2.0" and "loss.terms.margin_mse.weight" not in run.data.params
    got = values(c, run, "train/mine")
    assert len(got) == 2 and all(v == v and v >= 0 for v in got)
    bad = kdrun(RANK + mine + ["+loss.terms.mine.scal=2"], tmp_path)
    assert bad.returncode == 2 and "my_terms.scaled_margin_mse takes no 'scal'" in bad.stderr, bad.stderr


def test_the_pipeline_runs_in_process_from_a_composed_config(tmp_path, monkeypatch):
    """kdrun.pipeline.run(cfg): the whole run from a composed config, in this process (as lightning-hydra-template's
    train(cfg)), returning the held-out metrics, the MLflow run id and the objective."""
    from kdrun import pipeline

    for key, value in offline_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    cfg = compose([*RANK, "data.max_eval_queries=4", f"output_dir={tmp_path / 'out'}", "tracking.experiment=in_process"])
    result = pipeline.run(cfg)
    assert set(result) >= {"run_id", "objective", "eval/student/mrr_at_10", "eval/teacher/mrr_at_10"}
    assert result["objective"] == result["eval/student/mrr_at_10"]
    run = client(tmp_path).get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.max_steps"] == "2"
    assert (tmp_path / "out" / pipeline.RESULT_FILE).is_file()


@pytest.mark.slow  # the console script in a new process: Python's start and every import again
def test_the_console_script_runs_a_smoke_job_and_exits_0(tmp_path):
    """The installed `kdrun` in a process of its own (what a shell sees): the smoke preset trains, prints its table
    and exits 0; its run lands FINISHED in the store the environment names."""
    r = run_kdrun(["experiment=smoke", "data.max_train_queries=8", "data.max_eval_queries=4", *QUIET,
                   f"hydra.run.dir={tmp_path / 'out'}"], tmp_path, offline_env(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "student before" in r.stdout and "Traceback" not in r.stderr
    _, run = only_run(tmp_path, "smoke")
    assert run.info.status == "FINISHED"
