"""The student as an ecosystem object (issue 21): an MLflow logged model in the flavor its users load, registered by
tracking.register_as and loaded back by `models:/NAME/VERSION` with the scores of the run's own evaluation; the data
as MLflow dataset inputs with kdrun's fingerprints; system metrics; the model card. Against a real local store, through
the real `kdrun` entry point in this process, on the tiny models (the same against a real `mlflow server`:
tests/tracking/test_server.py)."""
import math
from pathlib import Path

import pytest

from support import CONF, compose as _compose, held_out_texts, kdrun, offline_env, ok, runs, trec_scores

RANK = ["teacher=tiny", "student.max_length=32", "teacher.max_length=32", "data.max_train_queries=24",
        "data.max_eval_queries=6", "data.eval_candidates=8", "train.max_steps=4", "train.batch_size=4",
        "train.log_every=1"]
CLS = ["experiment=smoke_classification", "teacher.finetune.steps=4", "teacher.max_length=32", "student.max_length=32",
       "data.max_train=48", "data.max_eval=24", "train.batch_size=8", "train.max_steps=2", "teacher.mode=precompute",
       "student=scratch", "loss=kd"]


@pytest.fixture(scope="module")
def ranking_runs(tmp_path_factory, kdrun_cache):
    """A bi-encoder and a ColBERT student in one sweep, each registered as a version of kd-rank."""
    tmp = tmp_path_factory.mktemp("logged")
    # MLflow logs system metrics once per interval and drops the samples of an unfinished one when the run ends: a
    # tiny run can end within 1 s, so sample 5 times a second (not 10 s, MLflow's default)
    env = offline_env(tmp, kdrun_cache) | {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2"}
    r = ok(kdrun(["-m", "student=scratch,colbert", "student.scratch.num_layers=1", "student.scratch.hidden_size=64",
                  "student.scratch.num_heads=2", "student.scratch.intermediate_size=128", *RANK,
                  "tracking.register_as=kd-rank", "tracking.experiment=logged", f"hydra.sweep.dir={tmp / 'multi'}"],
                 tmp, env))
    assert "Traceback" not in r.stderr
    client, jobs = runs(tmp, "logged")
    assert len(jobs) == 2
    return tmp, env, client, {x.data.params["student.arch"]: x for x in jobs}


def test_each_ranking_student_is_a_registered_logged_model_that_scores_as_the_run_evaluated(ranking_runs):
    import mlflow
    import pandas as pd
    import torch

    tmp, env, client, runs = ranking_runs
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    versions = {v.run_id: v.version for v in client.search_model_versions("name='kd-rank'")}
    assert sorted(map(int, versions.values())) == [1, 2]  # a new version per run
    text = held_out_texts(RANK)
    for arch, run in runs.items():
        [output] = run.outputs.model_outputs
        model = client.get_logged_model(output.model_id)
        assert str(model.status).endswith("READY") and model.name == "model" and output.step == 4
        linked = {m.key: m.value for m in model.metrics}
        assert linked["eval/student/mrr_at_10"] == run.data.metrics["eval/student/mrr_at_10"]  # metrics linked
        info = mlflow.models.get_model_info(f"models:/{model.model_id}")
        assert info.signature is not None and info.saved_input_example_info is not None
        expected = trec_scores(client.download_artifacts(run.info.run_id, "eval/run.student.trec", str(tmp / arch)))
        pairs = sorted(expected)
        uri = f"models:/kd-rank/{versions[run.info.run_id]}"
        if arch == "bi_encoder":  # sentence-transformers flavor: encode, then the student's dot product
            assert "sentence_transformers" in info.flavors
            st = mlflow.sentence_transformers.load_model(uri)
            q = st.encode([text[qid] for qid, _ in pairs], convert_to_tensor=True)
            p = st.encode([text[pid] for _, pid in pairs], convert_to_tensor=True)
            got = (q * p).sum(-1).tolist()
        else:  # ColBERT: the pyfunc over kdrun's scorer, (query, passage) rows in, scores out
            assert arch == "late_interaction" and "python_function" in info.flavors
            frame = pd.DataFrame({"query": [text[qid] for qid, _ in pairs], "passage": [text[pid] for _, pid in pairs]})
            got = mlflow.pyfunc.load_model(uri).predict(frame).tolist()
            from sentence_transformers import MultiVectorEncoder  # the student/ folder, as the library people use

            local = client.download_artifacts(run.info.run_id, "student", str(tmp / "colbert"))
            mv = MultiVectorEncoder(local, device="cpu", local_files_only=True)
            sim = mv.similarity(mv.encode_query([text[qid] for qid, _ in pairs]),
                                mv.encode_document([text[pid] for _, pid in pairs]))
            assert torch.allclose(torch.diagonal(torch.as_tensor(sim)).float(), torch.tensor([expected[k] for k in pairs]),
                                  rtol=1e-4, atol=1e-4)
        want = [expected[k] for k in pairs]
        assert torch.allclose(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-4), (arch, got[:4], want[:4])


def test_the_data_are_dataset_inputs_with_kdruns_fingerprints_and_system_metrics_are_logged(ranking_runs):
    from kdrun import pipeline

    _, _, _, runs = ranking_runs
    _, data = pipeline.load_data(_compose(RANK))
    for run in runs.values():
        inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
        assert set(inputs) == {"chatterbot-train", "chatterbot-heldout"}
        train = inputs["chatterbot-train"]
        assert train.dataset.digest == data.fingerprint()[:32]
        assert {t.key: t.value for t in train.tags}["mlflow.data.context"] == "training"
        assert '"num_rows": ' in train.dataset.profile and "chatterbot-corpus" in train.dataset.source
        assert {t.key: t.value for t in inputs["chatterbot-heldout"].tags}["mlflow.data.context"] == "evaluation"
        assert "system/cpu_utilization_percentage" in run.data.metrics  # MLflow's system metrics, on by default
        assert "system/system_memory_usage_megabytes" in run.data.metrics


def test_the_model_card_parses_and_names_the_runs_metrics(ranking_runs):
    from kdrun.model_card import front_matter

    tmp, _, client, runs = ranking_runs
    for arch, run in runs.items():
        card = Path(client.download_artifacts(run.info.run_id, "student/README.md", str(tmp / f"card-{arch}")))
        front = front_matter(card)
        results = front["model-index"][0]["results"][0]
        values = {m["type"]: m["value"] for m in results["metrics"]}
        assert values["mrr_at_10"] == pytest.approx(run.data.metrics["eval/student/mrr_at_10"], abs=1e-6)
        assert front["datasets"] == ["chatterbot"] and "kdrun" in front["tags"] and "margin_mse" in front["tags"]
        assert front["library_name"] == "sentence-transformers"  # ColBERT: its MultiVectorEncoder
        # scratch: no base; ColBERT is cut from the tiny teacher, which is on no hub (no base_model that is not one)
        assert "base_model" not in front
        body = card.read_text()
        assert "## Held-out metrics" in body and "-m " not in body  # the job's own command, not the sweep's
        assert f"kdrun student={'scratch' if arch == 'bi_encoder' else 'colbert'} student.scratch.num_layers=1" in body
        assert f"kdrun {__import__('importlib.metadata').metadata.version('kdrun')}" in body


def test_a_classifier_student_is_a_transformers_model_whose_predictions_give_the_runs_accuracy(tmp_path, kdrun_cache):
    import mlflow

    from kdrun import pipeline

    env = offline_env(tmp_path, kdrun_cache)
    ok(kdrun([*CLS, "tracking.register_as=kd-cls", "tracking.experiment=cls_logged",
              f"hydra.run.dir={tmp_path / 'out'}"], tmp_path, env))
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    client = mlflow.MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("cls_logged").experiment_id])
    info = mlflow.models.get_model_info("models:/kd-cls/1")
    assert "transformers" in info.flavors and info.signature is not None
    classify = mlflow.transformers.load_model("models:/kd-cls/1")
    _, data = pipeline.load_data(_compose([a for a in CLS if not a.startswith(("teacher.", "student="))]))
    predicted = [p["label"] for p in classify(list(data.eval_texts), truncation=True, max_length=32)]
    accuracy = sum(p == data.label_names[y] for p, y in zip(predicted, data.eval_labels)) / len(data.eval_labels)
    assert math.isclose(accuracy, run.data.metrics["eval/student/accuracy"], abs_tol=1e-9)


@pytest.mark.parametrize("kind,task", [("bert", "text-classification"), ("llama", "text-generation")])
def test_the_signature_kdrun_gives_a_pipeline_is_the_one_mlflow_infers_from_the_input_example(kind, task, request):
    """kdrun gives MLflow the signature of a classifier's and a causal LM's pipeline instead of letting it run the
    pipeline on the input example (a generation on the causal-LM demo's student: 8 s): the same signature."""
    import transformers
    from mlflow.transformers.signature import infer_or_get_default_signature

    from kdrun.logged_model import pipeline_signature

    d = request.getfixturevalue(f"tiny_{kind}")
    auto = transformers.AutoModelForSequenceClassification if kind == "bert" else transformers.AutoModelForCausalLM
    pipe = transformers.pipeline(task, model=auto.from_pretrained(d),
                                 tokenizer=transformers.AutoTokenizer.from_pretrained(d),
                                 **({"max_new_tokens": 2} if kind == "llama" else {}))
    inferred = infer_or_get_default_signature(pipe, example=["a held-out text", "another one"])
    assert pipeline_signature(task) == inferred
    other = "text-generation" if kind == "bert" else "text-classification"
    assert pipeline_signature(task) != pipeline_signature(other)


@pytest.mark.parametrize("overrides,message", [
    (["tracking.register_as=kd", "tracking.log_student=false"], "keep tracking.log_student=true"),
    (["tracking.register_as= "], "give a model name"),
])
def test_register_as_needs_a_name_and_a_logged_student(overrides, message):
    from kdrun import config
    from kdrun.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        config.validate(_compose(overrides))


def test_model_card_base_model_follows_the_students_init():
    from kdrun.model_card import text

    common = dict(kind="classifier", data_name="fortunes", data_source="fortunes:/x", before={"accuracy": 0.1},
                  after={"accuracy": 0.5}, teacher={"accuracy": 0.7}, command="kdrun", version="0", commit=None)
    params = {"student.name": "prajjwal1/bert-tiny", "teacher.path": "/models/teacher", "loss.terms.kd_kl.weight": "1.0"}
    for init, base in (("pretrained", "prajjwal1/bert-tiny"), ("teacher_layers", "/models/teacher"), ("scratch", None)):
        card = text(params={**params, "student.init": init}, **common)
        assert (f"base_model: {base}" in card) if base else ("base_model" not in card), (init, card[:300])
    assert "| accuracy | 0.1000 | 0.5000 | 0.7000 |" in card and "kd_kl (weight 1.0)" in card


@pytest.mark.slow
@pytest.mark.skipif(not any(__import__("shutil").which(b) for b in ("chromium", "chromium-browser", "google-chrome")),
                    reason="scripts/ui_check drives headless Chromium, which is not installed here "
                           "(Debian: apt-get install chromium)")
def test_the_ui_shows_the_run_its_datasets_and_its_logged_model(ranking_runs):
    """scripts/ui_check against MLflow's UI as `make ui` serves it (rendered DOM text in headless Chromium)."""
    import subprocess
    import sys

    from support import free_port

    tmp, env, _, _ = ranking_runs
    r = subprocess.run([sys.executable, str(CONF.parent / "scripts" / "ui_check"), "--store",
                        env["MLFLOW_TRACKING_URI"], "--experiment", "logged", "--port", str(free_port())],
                       cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "all checks hold" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]
