"""Faults outside the training loop (issue 20): each defect the outside fault-injection pass found, as a test that
fails on the code it was found in."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kdrun import config, tracking


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield f"sqlite:///{tmp_path / 'store.db'}"
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


def test_a_resumed_run_logs_the_final_evaluation_it_was_killed_before(store, tmp_path):
    """Killed after its last checkpoint (step 20) and before its final evaluation: the store holds train/* at step 20
    and eval/* at step 0 only. The resumed run redoes the evaluation at step 20 and it must land (it was dropped as
    'already logged' because *some* metric held step 20), while train/* at step 20 is not logged twice."""
    first = tracking.Tracker(store, "resume", output_dir=str(tmp_path))
    run_id = first.start("r", {}, {})
    first.metrics({"eval/student/mrr_at_10": 0.27}, step=0)
    first.metrics({"train/loss": 1.0}, step=20)
    first.end("KILLED")

    again = tracking.Tracker(store, "resume", output_dir=str(tmp_path))
    again.resume(run_id, step=20)
    again.metrics({"train/loss": 1.0}, step=20)  # the loop's last log, repeated by the resumed run
    again.metrics({"eval/student/mrr_at_10": 0.46}, step=20)
    again.end("FINISHED")
    history = lambda k: [(m.step, m.value) for m in again.client.get_metric_history(run_id, k)]
    assert history("eval/student/mrr_at_10") == [(0, 0.27), (20, 0.46)]
    assert history("train/loss") == [(20, 1.0)]


def test_runs_started_together_get_their_own_output_dirs(tmp_path):
    """Two kdrun processes started at once (in the same second, as often as not) resolve different output dirs:
    the default run dir ends in the process id, where outputs/DATE/TIME alone made them share one."""
    exe = Path(sys.executable).with_name("kdrun")
    procs = [subprocess.Popen([str(exe), "--cfg", "job", "--resolve"], cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    dirs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        [line] = [x for x in out.splitlines() if x.startswith("output_dir: ")]
        dirs.append(line.split(": ", 1)[1])
        assert re.fullmatch(rf"{re.escape(str(tmp_path))}/outputs/\d{{4}}-\d\d-\d\d/\d\d-\d\d-\d\d-{p.pid}", dirs[-1])
    assert dirs[0] != dirs[1]


def test_torchrun_ranks_share_their_agents_run_dir(monkeypatch):
    """Under torchrun each rank is its own process; they must still write to one output dir: the agent's."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert config.run_stamp().endswith(f"-{os.getppid()}")
    monkeypatch.delenv("LOCAL_RANK")
    assert config.run_stamp().endswith(f"-{os.getpid()}")


@pytest.mark.parametrize("target,error", [
    ("torch.save", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")),
    ("safetensors.torch.save_model",
     "SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')"),
])
def test_a_full_disk_in_torch_save_or_safetensors_is_a_checkpoint_error(tmp_path, monkeypatch, target, error):
    """What torch.save and safetensors raise on a full disk (RuntimeError, SafetensorError: measured on a full tmpfs)
    ends as a CheckpointError (training goes on) with no staging dir left, not as a crash."""
    from safetensors import SafetensorError

    from test_checkpoint import DropScorer, OPT, RT, STEPS, _loss, _saver
    from kdrun.checkpoint import CheckpointError
    from kdrun.train import make_optim

    if isinstance(error, str):
        error = SafetensorError(error.split("'")[1])
    student, loss = DropScorer(), _loss()
    save = _saver(tmp_path, student, loss, make_optim([student, loss], RT, STEPS, **OPT))
    save(1, {"step": 1, "window": {}, "window_steps": 0, "skipped": 0})

    def full(*args, **kwargs):
        raise error

    monkeypatch.setattr(target, full)
    with pytest.raises(CheckpointError) as e:
        save(2, {"step": 2, "window": {}, "window_steps": 0, "skipped": 0})
    assert "ckpt-00000002" in str(e.value) and "ckpt-00000001" in str(e.value)
    if target != "torch.save":
        assert "No space left on device" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt-00000001"]


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
    from test_config import _compose

    from kdrun.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        config.validate(_compose([override]))
    assert message in str(e.value)


def test_every_preset_passes_the_range_checks():
    from test_config import _compose

    for name in sorted(p.stem for p in (Path(config.__file__).parents[1] / "conf" / "experiment").glob("*.yaml")):
        config.validate(_compose([f"experiment={name}"]))
