"""DDP: torchrun with 2 CPU processes (gloo) trains exactly as one process over the same global batch."""
import subprocess
import sys

import pytest

from conftest import offline_env, run_kdrun

COMMON = ["train.max_steps=3", "train.batch_size=4", "train.log_every=1", "train.eval_every=0",
          "data.max_train_queries=16", "data.max_eval_queries=10", "student.dropout=0", "tracking.experiment=ddp"]


def _history(client, run, key):
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


@pytest.mark.slow
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path):
    """Rank r takes every 2nd bucket from r on; one process with grad_accum=2 takes the same two buckets per step.
    Same losses, gradient norms and final weights; rank 0 alone logs (2 runs in all) and saves the student."""
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    env = offline_env(tmp_path)
    one = run_kdrun(COMMON + ["train.grad_accum=2", "tracking.run_name=one", f"hydra.run.dir={tmp_path / 'one'}"],
                    cwd=tmp_path, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "kdrun", *COMMON, "train.grad_accum=1", "tracking.run_name=two",
                          f"hydra.run.dir={tmp_path / 'two'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert two.stdout.count("kdrun: MLflow") == 1, "rank 0 alone prints the summary"

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("ddp").experiment_id])}
    assert sorted(runs) == ["one", "two"], "one MLflow run per job: rank 1 logs nothing"
    for key in ("train/loss", "train/grad_norm"):
        a, b = _history(client, runs["one"], key), _history(client, runs["two"], key)
        assert len(a) == len(b) == 3
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7), key
    assert runs["two"].data.metrics["train/samples_per_s"] > 0
    w1 = load_file(str(tmp_path / "one" / "student" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "student" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst < 1e-5, f"weights differ by up to {worst}"
