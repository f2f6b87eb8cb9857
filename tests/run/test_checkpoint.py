"""Checkpoints: atomic writes that keep the last K, truncated ones skipped, a full disk that leaves the previous
one intact, RNG and sampler positions restored, and a loop stopped by a signal that resumes to the very same
weights and logged losses as a run never stopped."""
import errno
import json
import os
import random
import signal

import numpy as np
import pytest
import torch
from torch import nn

from kdrun import checkpoint, signals
from kdrun.checkpoint import CheckpointError, Interrupted
from kdrun.data.batching import BucketBatchSampler
from kdrun.errors import ConfigError
from kdrun.losses import Context, WeightedLoss
from kdrun.runtime import make_runtime
from kdrun.train import make_optim, train

RT = make_runtime("cpu", "fp32")
OPT = dict(lr=0.05, weight_decay=0.01, betas=[0.9, 0.999], eps=1e-8, schedule="linear", warmup_ratio=0.25,
           max_grad_norm=1.0)
STEPS, ACCUM = 10, 2


class DropScorer(nn.Module):
    """features [B, n, d] -> scores [B, n], with dropout: the RNG state matters."""

    def __init__(self, d=8):
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.drop, self.out = nn.Linear(d, 16), nn.Dropout(0.3), nn.Linear(16, 1)

    def forward(self, x):
        return {"scores": self.out(self.drop(torch.relu(self.hidden(x)))).squeeze(-1)}


def _data():
    g = torch.Generator().manual_seed(7)
    x, t = torch.randn(STEPS * ACCUM * 4, 3, 8, generator=g), torch.randn(STEPS * ACCUM * 4, 3, generator=g)
    return [{"student": x[i:i + 4], "teacher_out": {"scores": t[i:i + 4]}, "size": 4} for i in range(0, len(x), 4)]


def _loss():
    return WeightedLoss([("margin_mse", 1.0, {})], Context(task="ranking"))


class SignalAt:
    """A stand-in for StopSignals: SIGTERM arrives during step `step`."""

    def __init__(self, step):
        self.step, self.calls = step, 0

    def requested(self, rt):
        self.calls += 1
        return signal.SIGTERM if self.calls >= self.step else 0


def _train(student, loss, optim, batches, logs, **kw):
    return train(student, None, loss, iter(batches), optim, RT, max_steps=STEPS, grad_accum=ACCUM, log_every=3,
                 eval_every=0, log=lambda m, s: logs.append((s, {k: v for k, v in m.items() if "per_s" not in k})),
                 evaluate=lambda s: {}, **kw)


def _saver(tmp_path, student, loss, optim, keep=2):
    return lambda step, state: checkpoint.save(tmp_path / "checkpoints", step, student=student, loss_fn=loss,
                                               optim=optim, loop_state=state, position={"micro_batches": step * ACCUM},
                                               run_id="run-1", config={"optimizer.lr": "0.05"}, rt=RT, keep=keep)


def test_a_loop_stopped_by_sigterm_resumes_to_the_same_weights_and_logged_losses(tmp_path):
    data = _data()
    ref, ref_loss, ref_logs = DropScorer(), _loss(), []
    _train(ref, ref_loss, make_optim([ref, ref_loss], RT, STEPS, **OPT), data, ref_logs)

    student, loss, logs = DropScorer(), _loss(), []
    optim = make_optim([student, loss], RT, STEPS, **OPT)
    with pytest.raises(Interrupted) as stop:
        _train(student, loss, optim, data, logs, checkpoint=_saver(tmp_path, student, loss, optim),
               checkpoint_every=0, signals=SignalAt(5))
    assert stop.value.step == 5 and stop.value.path.name == "ckpt-00000005"
    random.random(), np.random.rand(), torch.rand(3)  # whatever ran in between must not matter

    path, meta = checkpoint.find(tmp_path)
    assert meta["step"] == 5 and meta["run_id"] == "run-1" and meta["position"] == {"micro_batches": 10}
    student, loss = DropScorer(), _loss()  # a new process builds everything afresh
    optim = make_optim([student, loss], RT, STEPS, **OPT)
    state = checkpoint.restore(path, student=student, loss_fn=loss, optim=optim, rt=RT)
    checkpoint.restore_rng(path, 0)
    _train(student, loss, optim, data[meta["position"]["micro_batches"]:], logs, resume=state)

    for k, v in ref.state_dict().items():
        assert torch.equal(student.state_dict()[k], v), k
    assert [s for s, _ in logs] == [s for s, _ in ref_logs] == [3, 6, 9, 10]  # the window 4-6 spans the stop
    for (_, got), (_, want) in zip(logs, ref_logs):
        assert {k: got[k] for k in ("train/loss", "train/grad_norm", "train/lr")} == \
               {k: want[k] for k in ("train/loss", "train/grad_norm", "train/lr")}


def test_checkpoints_are_written_atomically_and_the_newest_k_kept(tmp_path):
    student, loss = DropScorer(), _loss()
    optim = make_optim([student, loss], RT, STEPS, **OPT)
    _train(student, loss, optim, _data(), [], checkpoint=_saver(tmp_path, student, loss, optim, keep=3),
           checkpoint_every=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["ckpt-00000006", "ckpt-00000008", "ckpt-00000010"]
    meta = json.loads((root / "ckpt-00000010" / "meta.json").read_text())
    assert set(meta["files"]) == {"student.safetensors", "state.pt", "rank-0.pt"}
    assert all(len(f["sha256"]) == 64 and f["bytes"] > 0 for f in meta["files"].values())
    # state.pt holds only what weights_only=True loads (no pickled code)
    torch.load(root / "ckpt-00000010" / "state.pt", weights_only=True)


@pytest.mark.parametrize("damage", ["truncate", "alter", "no_meta"])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, damage, caplog):
    student, loss = DropScorer(), _loss()
    optim = make_optim([student, loss], RT, STEPS, **OPT)
    _train(student, loss, optim, _data(), [], checkpoint=_saver(tmp_path, student, loss, optim), checkpoint_every=5)
    newest = tmp_path / "checkpoints" / "ckpt-00000010"
    f = newest / "student.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-100])
    elif damage == "alter":
        data = bytearray(f.read_bytes())
        data[-5] ^= 0xFF
        f.write_bytes(bytes(data))
    else:
        (newest / "meta.json").unlink()
    (tmp_path / "checkpoints" / ".tmp-ckpt-00000012").mkdir()  # an unfinished write: never a candidate
    path, meta = checkpoint.find(tmp_path)
    assert path.name == "ckpt-00000005" and meta["step"] == 5
    assert "skipping checkpoint" in caplog.text and "ckpt-00000010" in caplog.text


def test_a_full_disk_while_checkpointing_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    student, loss = DropScorer(), _loss()
    optim = make_optim([student, loss], RT, STEPS, **OPT)
    save = _saver(tmp_path, student, loss, optim)
    save(1, {"step": 1, "window": {}, "window_steps": 0, "skipped": 0})
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "ckpt-00000001").iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("safetensors.torch.save_model", full)
    with pytest.raises(CheckpointError) as e:
        save(2, {"step": 2, "window": {}, "window_steps": 0, "skipped": 0})
    msg = str(e.value)
    assert "ckpt-00000002" in msg and "No space left on device" in msg and "ckpt-00000001" in msg and "intact" in msg
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["ckpt-00000001"]  # no partial files left
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "ckpt-00000001").iterdir()} == before
    assert checkpoint.find(tmp_path)[1]["step"] == 1


def test_rng_states_round_trip():
    state = checkpoint.rng_state()
    want = (random.random(), float(np.random.rand()), torch.rand(2))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    checkpoint.set_rng_state(state)
    got = (random.random(), float(np.random.rand()), torch.rand(2))
    assert got[:2] == want[:2] and torch.equal(got[2], want[2])


def test_the_sampler_resumes_mid_epoch_in_the_same_order():
    lengths = [random.Random(i).randint(1, 50) for i in range(200)]
    full = BucketBatchSampler(lengths, 8, seed=3)
    epochs = [list(full), list(full)]
    resumed = BucketBatchSampler(lengths, 8, seed=3)
    resumed.resume_at(1, 5)
    assert list(resumed) == epochs[1][5:]
    assert len(list(resumed)) == len(epochs[1])  # the next epoch is whole again


def test_taid_schedule_state_is_part_of_the_state_dict():
    opts = lambda: {"t_start": 0.4, "t_end": 1.0, "taid_alpha": 5e-4, "taid_beta": 0.99}
    loss = WeightedLoss([("taid", 1.0, opts())], Context(task="causal_lm", total_batches=10))
    term = loss.terms[0]
    term.calls, term.t, term.prev, term.momentum = 4, 0.37, 1.5, 0.2
    other = WeightedLoss([("taid", 1.0, opts())], Context(task="causal_lm", total_batches=10))
    other.load_state_dict(loss.state_dict())
    assert (other.terms[0].calls, other.terms[0].t, other.terms[0].prev, other.terms[0].momentum) == (4, 0.37, 1.5, 0.2)


def test_stop_signals_catch_sigterm_then_restore_the_old_handler():
    old = signal.getsignal(signal.SIGTERM)
    with signals.StopSignals() as s:
        assert s.requested(RT) == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert s.requested(RT) == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is old


def test_resume_config_differences_ignore_where_things_go():
    saved = {"optimizer.lr": "0.0002", "output_dir": "a", "tracking.uri": "x", "train.log_every": "10", "resume": "null"}
    now = {"optimizer.lr": "0.001", "output_dir": "b", "tracking.uri": "y", "train.log_every": "5", "resume": "auto"}
    assert checkpoint.config_differences(saved, now) == ["optimizer.lr"]


def test_resume_from_a_path_without_checkpoints_names_it(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        checkpoint.locate(str(tmp_path / "nope"), str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no valid checkpoint"):
        checkpoint.locate(str(tmp_path / "empty"), str(tmp_path))
    assert checkpoint.locate("auto", str(tmp_path)) is None  # auto: nothing to resume, a fresh start


@pytest.mark.parametrize("target,error", [
    ("torch.save", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")),
    ("safetensors.torch.save_model",
     "SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')"),
])
def test_a_full_disk_in_torch_save_or_safetensors_is_a_checkpoint_error(tmp_path, monkeypatch, target, error):
    """What torch.save and safetensors raise on a full disk (RuntimeError, SafetensorError: measured on a full tmpfs)
    ends as a CheckpointError (training goes on) with no staging dir left, not as a crash."""
    from safetensors import SafetensorError

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


def test_resume_prunes_a_checkpoint_left_over_by_a_kill_before_pruning(tmp_path):
    """Killed between writing ckpt-6 and pruning: three checkpoints with keep_checkpoints=2, and a resumed run that
    wrote no other checkpoint kept all three. Resume prunes (never the checkpoint it resumed from)."""
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        (root / f"ckpt-{step:08d}").mkdir(parents=True)
    checkpoint.prune(root, 2, protect=root / "ckpt-00000002")
    assert sorted(p.name for p in root.iterdir()) == ["ckpt-00000002", "ckpt-00000004", "ckpt-00000006"]
    checkpoint.prune(root, 2, protect=root / "ckpt-00000006")
    assert sorted(p.name for p in root.iterdir()) == ["ckpt-00000004", "ckpt-00000006"]
