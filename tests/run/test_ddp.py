"""DDP: torchrun with 2 CPU processes (gloo) trains exactly as one process over the same global batch, splits the
teacher pass over its ranks, and resumes after SIGTERM to the uninterrupted weights. On the tiny models (the one-process
runs in this process; torchrun's ranks are processes of their own)."""
import subprocess
import sys

import pytest

from support import f32_close, kdrun, offline_env, ok, wait_until

COMMON = ["experiment=smoke", "train.max_steps=3", "train.batch_size=4", "train.log_every=1", "train.eval_every=0",
          "data.max_train_queries=16", "data.max_eval_queries=10", "student.dropout=0", "tracking.experiment=ddp"]
STEPS, LOG_EVERY = 120, 20  # the stopped run's: the tiny models train a step in milliseconds


def _history(client, run, key):
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


@pytest.mark.slow  # torchrun starts two processes
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path):
    """Rank r takes every 2nd bucket from r on; one process with grad_accum=2 takes the same two buckets per step.
    Same losses, gradient norms and final weights; rank 0 alone logs (2 runs in all) and saves the student."""
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    env = offline_env(tmp_path)
    ok(kdrun(COMMON + ["train.grad_accum=2", "tracking.run_name=one", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path,
             env))
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
    # Attention key biases are left out: softmax does not change when every key of a query moves by the same amount,
    # so their true gradient is 0 and the computed one is float rounding, which Adam scales up to +-lr per step in
    # either run (measured: up to 1.1e-5 after 3 steps at lr 3e-5, every other weight within 1e-5)
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1 if not k.endswith("attention.self.key.bias"))
    assert worst < 1e-5, f"weights differ by up to {worst}"
    keys = [k for k in w1 if k.endswith("attention.self.key.bias")]
    assert keys and max((w1[k] - w2[k]).abs().max().item() for k in keys) <= 3 * 3e-5  # 3 steps x lr at most


@pytest.mark.slow  # torchrun starts two processes
def test_the_teacher_pass_is_split_over_the_ranks_and_gives_one_process_outputs(tmp_path):
    """Under torchrun each rank runs the teacher over every 2nd shard; rank 0 publishes the entry, which holds what
    one process computes."""
    import numpy as np
    from mlflow.tracking import MlflowClient

    env = offline_env(tmp_path)
    common = COMMON + ["train.max_steps=1", "teacher.shard_size=8", "tracking.log_student=false"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "kdrun", *common, f"teacher.cache_dir={tmp_path / 'c2'}", "tracking.run_name=two",
                          f"hydra.run.dir={tmp_path / 'two'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    ok(kdrun(common + [f"teacher.cache_dir={tmp_path / 'c1'}", "tracking.run_name=one",
                       f"hydra.run.dir={tmp_path / 'one'}"], tmp_path, env))
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("ddp").experiment_id])}
    n = int(runs["one"].data.params["data/train_examples"])
    assert runs["one"].data.metrics["teacher/computed_examples"] == n
    mine = runs["two"].data.metrics["teacher/computed_examples"]  # rank 0's own shards: every 2nd of 8 examples
    assert mine == sum(min(8, n - s) for s in range(0, n, 16)) and mine < n
    entry = lambda c: next(p for p in (tmp_path / c / "ranking").iterdir() if p.is_dir() and p.suffix == "")
    a, b = np.load(entry("c1") / "scores.npy"), np.load(entry("c2") / "scores.npy")
    assert a.shape == b.shape == (n, 2) and f32_close(b, a)
    assert not list((tmp_path / "c2" / "ranking").glob("*.partial"))


@pytest.mark.slow(seconds=95)  # torchrun's processes, stopped by a signal
def test_ddp_stopped_by_sigterm_resumes_to_the_uninterrupted_weights(tmp_path):
    """torchrun forwards SIGTERM to both ranks; they agree on the step, rank 0 writes the checkpoint and each rank its
    RNG state; resumed under torchrun, the run ends with the weights and losses of a run that never stopped (with
    dropout on: each rank's RNG must continue where it was). Over 60 s (three torchrun launches of two ranks each): the
    one test that a stopped DDP run resumes exactly."""
    import signal

    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    env = offline_env(tmp_path)
    args = [a for a in COMMON if not a.startswith(("student.dropout", "train.max_steps"))] + [
        f"train.max_steps={STEPS}", "train.checkpoint_every=2", f"train.log_every={LOG_EVERY}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "kdrun"]
    ref = subprocess.run([*torchrun, *args, "tracking.run_name=ref", f"hydra.run.dir={tmp_path / 'ref'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "stopped"
    stop_args = [*args, "tracking.run_name=stopped", f"hydra.run.dir={out}"]
    proc = subprocess.Popen([*torchrun, *stop_args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_until(proc, lambda: (out / "checkpoints" / "ckpt-00000002").is_dir(), every=0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert "stopped by SIGTERM after step" in err, err[-3000:]
    step = int(err.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert 2 <= step < STEPS and (out / "checkpoints" / f"ckpt-{step:08d}" / "rank-1.pt").is_file()
    resumed = subprocess.run([*torchrun, *stop_args, "resume=auto"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("ddp").experiment_id])}
    assert sorted(runs) == ["ref", "stopped"] and runs["stopped"].info.status == "FINISHED"
    for key in ("train/loss", "train/grad_norm"):
        got = [(m.step, m.value) for m in client.get_metric_history(runs["stopped"].info.run_id, key)]
        want = [(m.step, m.value) for m in client.get_metric_history(runs["ref"].info.run_id, key)]
        assert sorted(got) == sorted(want) and len(got) == STEPS // LOG_EVERY, key
    a = load_file(str(out / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "student" / "model.safetensors"))
    assert all(torch_equal(a[k], b[k]) for k in a)


def torch_equal(x, y) -> bool:
    import torch

    return torch.equal(x, y)
