"""The real `kdrun`, stopped with SIGTERM mid-run and resumed with resume=auto: the same MLflow run continues (no
duplicate steps) and ends with exactly the weights and logged losses of a run that was never stopped."""
import signal

import pytest
import torch
from safetensors.torch import load_file

from support import kdrun, offline_env, ok, start_kdrun, wait_until

# the tiny models (experiment=smoke), with steps enough (about 7 s of training on 2 cores) for the signal to land in training
ARGS = ["experiment=smoke", "train.max_steps=120", "train.checkpoint_every=5", "train.log_every=3", "train.eval_every=40",
        "data.max_train_queries=200", "data.max_eval_queries=40", "train.batch_size=8"]


def _histories(client, run, keys):
    return {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)] for k in keys}


@pytest.mark.slow(seconds=40)  # two real processes (the console script, signalled mid-training), then two more runs
def test_sigterm_then_resume_auto_equals_an_uninterrupted_run(tmp_path):
    env = offline_env(tmp_path)
    ref = start_kdrun([*ARGS, "tracking.experiment=ref", f"hydra.run.dir={tmp_path / 'ref'}"], tmp_path, env)
    out = tmp_path / "stopped"
    stopped = start_kdrun([*ARGS, "tracking.experiment=stopped", f"hydra.run.dir={out}"], tmp_path, env)
    wait_until(stopped, lambda: (out / "checkpoints" / "ckpt-00000005").is_dir())  # stop it once it is training
    stopped.send_signal(signal.SIGTERM)
    _, err = stopped.communicate(timeout=300)
    assert stopped.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    step = int(err.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert 5 <= step < 120
    assert f"resume={out / 'checkpoints' / f'ckpt-{step:08d}'}" in err  # the command to continue, printed

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("stopped").experiment_id
    [run] = client.search_runs([experiment])
    assert run.info.status == "KILLED"

    changed = kdrun([*ARGS, "tracking.experiment=stopped", f"hydra.run.dir={out}", "resume=auto", "optimizer.lr=1e-3"],
                    tmp_path, env)
    assert changed.returncode == 2 and "optimizer.lr: 0.0002 -> 0.001" in changed.stderr, changed.stderr[-2000:]

    ok(kdrun([*ARGS, "tracking.experiment=stopped", f"hydra.run.dir={out}", "resume=auto"], tmp_path, env))
    assert ref.wait(timeout=300) == 0, ref.communicate()[1][-3000:]

    [run] = client.search_runs([experiment])  # the same run, continued
    [ref_run] = client.search_runs([client.get_experiment_by_name("ref").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["kdrun.resumes"] == "1"
    keys = [k for k in ref_run.data.metrics if k.startswith(("train/loss", "train/margin_mse", "train/grad_norm",
                                                             "train/lr", "eval/student/mrr", "eval/student/ndcg"))]
    assert len(keys) >= 6
    got, want = _histories(client, run, keys), _histories(client, ref_run, keys)
    for k in keys:
        steps = [s for s, _ in got[k]]
        assert steps == sorted(set(steps)), f"{k}: duplicate or unordered steps {steps}"
        assert got[k] == want[k], k
    a = load_file(out / "student" / "model.safetensors")
    b = load_file(tmp_path / "ref" / "student" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
