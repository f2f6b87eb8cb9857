"""The loop's mechanics on toy modules: accumulation, frozen teacher, non-finite loss, logging."""
import copy
import math

import pytest
import torch
from torch import nn

from kdrun.errors import NonFiniteLossError
from kdrun.losses import Context, WeightedLoss
from kdrun.runtime import make_runtime
from kdrun.train import make_optim, train, warmup_then

RT = make_runtime("cpu", "fp32")
OPT = dict(lr=0.1, weight_decay=0.0, betas=[0.9, 0.999], eps=1e-8, schedule="constant", warmup_ratio=0.0,
           max_grad_norm=0.0)


class Scorer(nn.Module):
    """features [B, n, d] -> scores [B, n]"""

    def __init__(self, d=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(d, 1, bias=False)  # a bias cancels in margins: its true gradient is 0

    def forward(self, x):
        return {"scores": self.lin(x).squeeze(-1)}


def _batches(x, t, size):
    for i in range(0, len(x), size):
        yield {"student": x[i:i + size], "teacher_out": {"scores": t[i:i + size]}, "size": size}


def margin_mse():
    return WeightedLoss([("margin_mse", 1.0)], Context(task="ranking"))


def _run(student, batches, steps, accum, teacher=None, logs=None):
    optim = make_optim(student, RT, steps, **OPT)
    train(student, teacher, margin_mse(), batches, optim, RT, max_steps=steps,
          grad_accum=accum, log_every=1, eval_every=0, log=lambda m, s: logs.append((s, m)) if logs is not None else None,
          evaluate=lambda s: {})


def test_grad_accumulation_equals_one_big_batch():
    torch.manual_seed(1)
    x, t = torch.randn(8, 3, 4), torch.randn(8, 3)
    a, b = Scorer(), Scorer()
    _run(a, _batches(x, t, 8), steps=1, accum=1)
    _run(b, _batches(x, t, 4), steps=1, accum=2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_online_teacher_gets_no_gradient_and_does_not_change():
    torch.manual_seed(2)
    x = torch.randn(8, 2, 4)
    teacher = Scorer(seed=5).requires_grad_(False).eval()
    before = copy.deepcopy(teacher.state_dict())
    student = Scorer()
    batches = ({"student": x[i:i + 4], "teacher": x[i:i + 4], "size": 4} for i in (0, 4))
    logs = []
    _run(student, batches, steps=2, accum=1, teacher=teacher, logs=logs)
    assert all(p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])
    assert [s for s, _ in logs] == [1, 2]
    assert {"train/loss", "train/margin_mse", "train/lr", "train/grad_norm", "train/samples_per_s"} <= set(logs[0][1])


def test_an_online_teacher_is_not_run_for_a_loss_that_reads_no_teacher():
    """ce (and pskd) read the labels or the student only: a teacher forward per step would cost time for nothing."""
    class NotToBeCalled(nn.Module):
        def forward(self, x):
            raise AssertionError("the teacher ran for a loss that reads no teacher")

    torch.manual_seed(4)
    x = torch.randn(8, 3, 4)
    batches = ({"student": x[i:i + 4], "teacher": x[i:i + 4], "size": 4} for i in (0, 4))
    student, logs = Scorer(), []
    loss = WeightedLoss([("ce", 1.0, {"in_batch": False})], Context(task="ranking"))
    assert not loss.reads_teacher
    train(student, NotToBeCalled(), loss, batches, make_optim(student, RT, 2, **OPT), RT, max_steps=2, grad_accum=1,
          log_every=1, eval_every=0, log=lambda m, s: logs.append((s, m)), evaluate=lambda s: {})
    assert [s for s, _ in logs] == [1, 2] and all(math.isfinite(m["train/ce"]) for _, m in logs)


@pytest.mark.parametrize("mode", ["online", "precompute"])
def test_a_loss_that_reads_no_teacher_gets_batches_without_the_teachers_inputs_or_outputs(mode):
    """The pipeline's side of the test above: no teacher pass (precompute) and, online, no teacher features in the
    collate (tokenising the teacher's texts every step for a teacher that does not run)."""
    from omegaconf import OmegaConf

    from kdrun import pipeline

    class Task:
        def __init__(self):
            self.asked = []

        def examples(self):
            return ["as they are"]

        def attach(self, outputs):
            self.asked.append(("attach", outputs))
            return ["with outputs"]

        def lengths(self):
            return [1]

        def collate(self, online):
            self.asked.append(("collate", online))
            return lambda rows: rows

    cfg = OmegaConf.create({"teacher": {"mode": mode}, "train": {"batch_size": 1, "seed": 0},
                            "hardware": {"num_workers": 0}})
    for reads in (False, True):
        task = Task()
        if reads and mode == "precompute":  # (a pass over the data: the pipeline's end-to-end tests)
            examples = task.attach({"scores": None})
        else:
            examples, metrics = pipeline.training_examples(cfg, task, object(), None, RT, reads_teacher=reads)
            assert metrics == {}
        pipeline.batches(cfg, task, examples, RT, reads_teacher=reads)
        online = mode == "online" and reads
        assert task.asked[-1] == ("collate", online)
        assert examples == (["as they are"] if online else ["with outputs"])
        assert (("attach", {}) in task.asked) == (not reads)


def test_loss_goes_down_on_a_learnable_target():
    torch.manual_seed(3)
    x = torch.randn(64, 2, 4)
    target = Scorer(seed=9)
    with torch.no_grad():
        t = target(x)["scores"]
    logs = []
    _run(Scorer(), (b for _ in range(50) for b in _batches(x, t, 16)), steps=100, accum=1, logs=logs)
    assert logs[-1][1]["train/loss"] < 0.05 * logs[0][1]["train/loss"]


def test_non_finite_loss_stops_with_the_step_and_terms():
    x, t = torch.randn(4, 2, 4), torch.tensor([[float("nan"), 0.0]] * 4)
    with pytest.raises(NonFiniteLossError, match=r"at step 1 \(mean over steps 1-1: margin_mse=nan"):
        _run(Scorer(), _batches(x, t, 4), steps=1, accum=1)


def test_bf16_autocast_step_runs_and_matches_fp32_closely():
    torch.manual_seed(4)
    x, t = torch.randn(8, 3, 4), torch.randn(8, 3)
    results = []
    for precision in ("fp32", "bf16"):
        rt = make_runtime("cpu", precision)
        student = Scorer()
        optim = make_optim(student, rt, 1, **OPT)
        train(student, None, margin_mse(), _batches(x, t, 8), optim, rt, max_steps=1,
              grad_accum=1, log_every=1, eval_every=0, log=lambda m, s: results.append(m["train/loss"]),
              evaluate=lambda s: {})
    assert results[1] == pytest.approx(results[0], rel=2e-2)


def test_gpu_profiles_without_a_gpu_say_so():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    from kdrun.errors import ConfigError

    with pytest.raises(ConfigError, match="no CUDA GPU.*hardware=cpu"):
        make_runtime("cuda", "bf16")
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        make_runtime("cpu", "fp16")
    assert make_runtime("auto", "fp32").device.type == "cpu"


class NanAt(nn.Module):
    """A loss that turns non-finite at the given steps (1-based, counted per call)."""

    def __init__(self, bad):
        super().__init__()
        self.inner, self.bad, self.calls = margin_mse(), set(bad), 0

    needs = set()

    def forward(self, s, t, batch):
        self.calls += 1
        out = self.inner(s, t, batch)
        if self.calls in self.bad:
            out = {k: v * float("nan") for k, v in out.items()}
        return out

    def logs(self):
        return {}


def _nan_run(bad, skips, steps=6):
    torch.manual_seed(3)
    x, t = torch.randn(4 * steps, 2, 4), torch.randn(4 * steps, 2)
    student, logs = Scorer(), []
    optim = make_optim(student, RT, steps, **OPT)
    train(student, None, NanAt(bad), _batches(x, t, 4), optim, RT, max_steps=steps, grad_accum=1, log_every=3,
          eval_every=0, log=lambda m, s: logs.append((s, m)), evaluate=lambda s: {}, max_nonfinite_skips=skips)
    return student, logs


def test_a_non_finite_step_stops_the_run_naming_the_step_and_terms():
    with pytest.raises(NonFiniteLossError, match=r"at step 2 \(mean over steps 1-3: margin_mse=nan, loss=nan.*"
                                                 r"train.max_nonfinite_skips"):
        _nan_run(bad={2}, skips=0)


def test_up_to_n_non_finite_steps_are_skipped_and_counted():
    student, logs = _nan_run(bad={2, 5}, skips=2)
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert [(s, m["train/nonfinite_skips"]) for s, m in logs] == [(3, 1), (6, 2)]
    assert all(math.isfinite(m["train/loss"]) for _, m in logs)  # skipped steps stay out of the means
    with pytest.raises(NonFiniteLossError, match=r"step 5: .*the 3th; train.max_nonfinite_skips=2"):
        _nan_run(bad={1, 2, 5}, skips=2)


def test_warmup_then_linear_decay():
    f = warmup_then("linear", warmup_steps=4, total_steps=14)
    assert [round(f(s), 3) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.5)
    assert f(14) == 0.0
    assert warmup_then("constant", 2, 10)(8) == 1.0
