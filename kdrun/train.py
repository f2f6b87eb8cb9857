"""The training loop. One optimizer step reads top to bottom in `train`; everything else is set-up."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional

import torch

import kdrun
from kdrun import progress
from kdrun.checkpoint import Interrupted
from kdrun.data.batching import to_device
from kdrun.data.tokens import token_counts
from kdrun.errors import NonFiniteLossError
from kdrun.runtime import Runtime, loss_param_sync
from kdrun.signals import StopSignals


@dataclass
class Optim:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    max_grad_norm: float  # <= 0: no clipping (the norm is still measured)
    params: list  # what the optimizer trains (student and loss-term parameters), for clipping


def warmup_then(schedule: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """lr multiplier: linear warmup from 0, then linear decay to 0 ("linear") or flat ("constant")."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def make_optim(modules, rt: Runtime, max_steps: int, *, lr: float, weight_decay: float, betas,
               eps: float, schedule: str, warmup_ratio: float, max_grad_norm: float) -> Optim:
    """AdamW over the trainable parameters of `modules` (the student, plus loss terms with parameters such as
    TinyBERT's projections); fused where torch has the kernel, no weight decay on biases and norms; warmup + decay; GradScaler
    for fp16."""
    modules = modules if isinstance(modules, (list, tuple)) else [modules]
    params = list({id(p): p for m in modules for p in m.parameters() if p.requires_grad}.values())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:  # one fused kernel for all parameters (CUDA and CPU; on CPU ~20x faster than the default per-tensor loop)
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)
    factor = warmup_then(schedule, int(warmup_ratio * max_steps), max_steps)
    return Optim(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor), rt.grad_scaler(), max_grad_norm,
                 params)


def _clone(v):
    """An inference-mode tensor (or tuple of them, e.g. hidden states) as an ordinary tensor."""
    return tuple(x.clone() for x in v) if isinstance(v, (tuple, list)) else v.clone()


def _fmt(values: Dict) -> str:
    return ", ".join(f"{k}={float(v):.4g}" for k, v in values.items())


def forever(loader) -> Iterator:
    """Batches across epochs; a DataLoader with shuffle draws a new order each epoch."""
    while True:
        yield from loader


def train(student, teacher, loss_fn, batches: Iterator[Dict], optim: Optim, rt: Runtime, *, max_steps: int,
          grad_accum: int, log_every: int, eval_every: int, log: Callable[[Dict[str, float], int], None],
          evaluate: Callable[[int], Dict[str, float]], desc: str = "distil", max_nonfinite_skips: int = 0,
          checkpoint: Optional[Callable[[int, Dict], object]] = None, checkpoint_every: int = 0,
          signals: Optional[StopSignals] = None, resume: Optional[Dict] = None,
          on_policy: Optional[Callable] = None) -> int:
    """Train `student` (DDP-wrapped when distributed) to match `teacher` for `max_steps` optimizer steps. A step whose
    loss or gradient is not finite stops the run (found at the next log step, naming it), or with
    max_nonfinite_skips > 0 is skipped, up to that many times (then each step is checked: one host sync).
    `checkpoint(step, loop_state)` runs every `checkpoint_every` steps and when `signals` caught SIGTERM/SIGINT
    (then the loop stops: Interrupted); `resume` is a checkpoint's loop state to continue from. `on_policy(student,
    batch, step, micro)` (causal LM, kdrun/tasks/causal_lm/on_policy.py) may replace rows of each batch by the
    student's own continuations before the models run; its logs() join the training logs."""
    student.train()
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]  # e.g. TinyBERT's projections
    resume = resume or {"step": 0, "window": {}, "window_steps": 0, "skipped": 0}
    window: Dict[str, torch.Tensor] = dict(resume["window"])  # per-term sums on the device: no host sync in a step
    window_steps, skipped = resume["window_steps"], resume["skipped"]
    first_bad = torch.zeros((), dtype=torch.long, device=rt.device)  # first non-finite step (0: none), on the device
    samples = real_tokens = tokens = 0  # counted on the host from the CPU batches
    first_step: Dict[str, float] = {}
    t0 = time.perf_counter()
    bar = progress.bar(total=max_steps, initial=resume["step"], desc=desc, show=rt.is_main, delay=0.0)
    reads_teacher = getattr(loss_fn, "reads_teacher", True)  # False: the online teacher is not run in training
    for step in range(resume["step"] + 1, max_steps + 1):
        # ---- one optimizer step over grad_accum micro-batches ----
        terms: Dict[str, torch.Tensor] = {}
        for micro in range(grad_accum):
            batch = next(batches)
            if on_policy is not None:  # causal LM: the student continues a share of the prompts (GKD)
                batch = on_policy(student, batch, step, micro)
            real, padded = token_counts(batch["student"])  # attention masks, still on the CPU
            batch = to_device(batch, rt.device)
            teacher_out = batch.get("teacher_out")  # precomputed teacher outputs, when there are any
            if teacher_out is None and not reads_teacher:  # ce, pskd: the labels or the student itself only
                teacher_out = {}
            if teacher_out is None:  # online teacher: frozen, low precision, no autograd graph
                with torch.inference_mode(), rt.autocast():
                    teacher_out = teacher(batch["teacher"])
                teacher_out = {k: _clone(v) for k, v in teacher_out.items()}  # ordinary tensors again
            with rt.accumulating(student, micro < grad_accum - 1):  # DDP: all-reduce on the last micro-batch
                with rt.autocast():
                    student_out = student(batch["student"])  # {"scores": [B, n]} or {"logits": ...}, ...
                losses = loss_fn(student_out, teacher_out, batch)
                optim.scaler.scale(losses["loss"] / grad_accum).backward()
            for k, v in losses.items():
                terms[k] = terms.get(k, 0.0) + v.detach() / grad_accum
            samples, real_tokens, tokens = samples + batch["size"], real_tokens + real, tokens + padded
        loss_param_sync(rt, loss_params)  # DDP: parameters outside the student
        optim.scaler.unscale_(optim.optimizer)
        clip = optim.max_grad_norm if optim.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(optim.params, clip)
        finite = torch.isfinite(terms["loss"]) & (torch.isfinite(grad_norm) | optim.scaler.is_enabled())  # fp16: scaler's job
        lr = optim.scheduler.get_last_lr()[0]  # the lr this step uses
        if max_nonfinite_skips and not finite:  # skipping allowed: look now (a host sync per step); skip the update
            skipped += 1
            if skipped > max_nonfinite_skips:
                raise NonFiniteLossError(f"step {step}: non-finite loss or gradient ({_fmt(terms)}), the "
                                         f"{skipped}th; train.max_nonfinite_skips={max_nonfinite_skips}")
        else:
            first_bad = torch.where((first_bad == 0) & ~finite, step, first_bad)
            for k, v in {**terms, "grad_norm": grad_norm.detach()}.items():
                window[k] = window.get(k, 0.0) + v
            window_steps += 1
            optim.scaler.step(optim.optimizer)  # skipped by the scaler when fp16 grads overflowed
            optim.scaler.update()
            optim.scheduler.step()
        optim.optimizer.zero_grad(set_to_none=True)
        bar.update(1)
        if step == resume["step"] + 1:  # how long the run took to start training (data, models, caches): logged next
            first_step = {"system/first_step_seconds": time.time() - kdrun.STARTED}

        # ---- every log_every steps (and the last): one host sync (DDP: means over the ranks), then log ----
        if step % log_every == 0 or step == max_steps:
            n = max(window_steps, 1)
            counts = rt.mean({"samples": samples, "real": real_tokens, "padded": tokens})  # DDP: x world = totals
            values = {k: float(v) / n for k, v in rt.mean(window).items()}  # (no terms: every step was skipped)
            if int(first_bad):  # (the floats above synced already)
                raise NonFiniteLossError(f"non-finite loss or gradient at step {int(first_bad)} (mean over steps "
                                         f"{step - n + 1}-{step}: {_fmt(values)}); lower optimizer.lr, keep "
                                         "optimizer.max_grad_norm > 0, or set train.max_nonfinite_skips=N to skip such steps")
            elapsed = max(time.perf_counter() - t0, 1e-9)
            samples_all, real_all, padded_all = (float(counts[k]) * rt.world_size for k in ("samples", "real", "padded"))
            values.update(lr=lr, samples_per_s=samples_all / elapsed, tokens_per_s=real_all / elapsed,  # real tokens
                          real_token_fraction=real_all / max(padded_all, 1.0), **loss_fn.logs(),
                          **(on_policy.logs() if on_policy is not None else {}),
                          **({"nonfinite_skips": skipped} if max_nonfinite_skips else {}))
            if rt.is_main:
                log({**{f"train/{k}": v for k, v in values.items()}, **first_step}, step)
            bar.set_postfix(loss=f"{values.get('loss', math.nan):.4g}", samples_s=f"{values['samples_per_s']:.1f}")
            window, window_steps, samples, real_tokens, tokens, t0 = {}, 0, 0, 0, 0, time.perf_counter()
            first_step = {}
        if eval_every and step % eval_every == 0 and step < max_steps:
            evaluate(step)  # rank 0 (the others wait for it in the next step's all-reduce)
            t0 = time.perf_counter()  # eval time is not training throughput

        # ---- checkpoints: every checkpoint_every steps, and on SIGTERM/SIGINT (then stop) ----
        signum = signals.requested(rt) if signals else 0  # DDP: the ranks agree (a tiny host-side all-reduce)
        if signum or (checkpoint and checkpoint_every and step % checkpoint_every == 0):
            if int(first_bad):  # never save a diverged student: the last good checkpoint stays the newest
                raise NonFiniteLossError(f"non-finite loss or gradient at step {int(first_bad)}; lower optimizer.lr, "
                                         "keep optimizer.max_grad_norm > 0, or set train.max_nonfinite_skips=N")
            state = {"step": step, "window": window, "window_steps": window_steps, "skipped": skipped}
            path = checkpoint(step, state) if checkpoint else None
            if signum:
                bar.close()
                raise Interrupted(signum, step, path)
    bar.close()
    return max_steps
