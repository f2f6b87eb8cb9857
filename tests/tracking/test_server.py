"""A real MLflow tracking server (what `make server` starts): kdrun logs a run and a 2-job sweep over HTTP, and
MLflow's client reads back runs, params, metric histories and artifacts."""
import os
from pathlib import Path

import pytest

from support import free_port, held_out_texts, kdrun, mlflow_server, offline_env, ok, trec_scores

SMALL = ["experiment=smoke", "train.max_steps=2", "train.batch_size=4", "train.log_every=1", "data.max_train_queries=6",
         "data.max_eval_queries=3", "tracking.experiment=served"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    port = free_port()
    proc = mlflow_server(tmp, port)
    url = f"http://127.0.0.1:{port}"
    yield tmp, url
    os.killpg(proc.pid, 15)
    proc.wait(timeout=30)


@pytest.mark.slow(seconds=45)  # a real `mlflow server` process (its start takes seconds)
def test_a_run_and_a_sweep_log_to_a_real_tracking_server(server):
    tmp, url = server
    env = {**offline_env(tmp), "MLFLOW_TRACKING_URI": ""}
    r = ok(kdrun(SMALL + [f"tracking.uri={url}", f"hydra.run.dir={tmp / 'one'}", "tracking.register_as=kd-served"],
                 tmp, env))
    assert f"{url}/#/experiments/" in r.stdout  # the run's address in the UI
    ok(kdrun(["-m", *SMALL, "tracking.log_student=false", f"tracking.uri={url}", "optimizer.lr=1e-4,3e-4",
              f"hydra.sweep.dir={tmp / 'sweep'}"], tmp, env))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    runs = client.search_runs([client.get_experiment_by_name("served").experiment_id])
    assert len(runs) == 4 and all(x.info.status == "FINISHED" for x in runs)
    parent = next(x for x in runs if x.data.tags.get("kdrun.sweep_parent") == "1")
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    single = next(x for x in runs if x is not parent and x not in children)
    assert len(children) == 2
    assert single.data.params["train.max_steps"] == "2" and single.data.params["tracking.uri"] == url
    assert [m.step for m in client.get_metric_history(single.info.run_id, "train/loss")] == [1, 2]
    assert [m.step for m in client.get_metric_history(single.info.run_id, "eval/student/mrr_at_10")] == [0, 2]
    names = {a.path for a in client.list_artifacts(single.info.run_id)}
    assert {"config.yaml", "overrides.txt", "student"} <= names
    local = client.download_artifacts(single.info.run_id, "student", str(tmp / "dl"))
    assert (Path(local) / "model.safetensors").is_file()
    assert (tmp / "artifacts").is_dir()  # the server stored them, proxied over HTTP
    # the logged student, registered through the server and loaded back by its models:/ URI: the run's scores
    import mlflow
    import torch

    mlflow.set_tracking_uri(url)
    assert [v.run_id for v in client.search_model_versions("name='kd-served'")] == [single.info.run_id]
    st = mlflow.sentence_transformers.load_model("models:/kd-served/1")
    expected = trec_scores(client.download_artifacts(single.info.run_id, "eval/run.student.trec", str(tmp / "ev")))
    text, pairs = held_out_texts([a for a in SMALL if a.startswith(("data.", "experiment="))]), sorted(expected)
    q = st.encode([text[qid] for qid, _ in pairs], convert_to_tensor=True)
    p = st.encode([text[pid] for _, pid in pairs], convert_to_tensor=True)
    assert torch.allclose((q * p).sum(-1), torch.tensor([expected[k] for k in pairs]), rtol=1e-4, atol=1e-4)
    summary = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert "summary/summary.csv" in summary and "summary/pareto.png" in summary
