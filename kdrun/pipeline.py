"""Builds a run from a validated config, in order: tracking store, data, teacher, student, loss,
optimizer; then evaluates, trains, evaluates again and records everything in MLflow."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Dict, Optional

from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from kdrun.data.batching import BucketBatchSampler
from kdrun.errors import DataError
from kdrun.tracking import Tracker, flatten, summary_table

log = logging.getLogger(__name__)


def _node(cfg: DictConfig) -> dict:
    """A config group as plain values (enums as strings) for a `_target_` builder."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def build(node: dict, **extra):
    """Call the node's `_target_` with its other keys (what hydra's instantiate does, minus the wrapping
    of our errors in InstantiationException: a ModelLoadError must reach the user as it is)."""
    node = dict(node)
    return get_method(node.pop("_target_"))(**node, **extra)


def _overrides() -> list:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def run(cfg: DictConfig) -> Dict[str, object]:
    import transformers
    from torch.utils.data import DataLoader

    from kdrun import train as loop
    from kdrun.losses import WeightedLoss
    from kdrun.runtime import make_runtime, seed_everything
    from kdrun.tasks import ranking

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # weight-loading bars; kdrun shows its own progress
    hw, tr = _node(cfg.hardware), cfg.train
    rt = make_runtime(hw["device"], hw["precision"])
    seed_everything(tr.seed)
    teacher_node = _node(cfg.teacher)
    teacher_mode = teacher_node.pop("mode")
    teacher = build(teacher_node).to(rt.device)
    student = build(_node(cfg.student), teacher_source=teacher.source).to(rt.device)
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)  # an unusable store fails before training
    data = build(_node(cfg.data))
    loss_fn = WeightedLoss([(t["name"], t["weight"], t["temperature"]) for t in _node(cfg.loss)["terms"]])

    if len(data.train) < tr.batch_size:
        raise DataError(f"{data.source}: {len(data.train)} training examples, fewer than train.batch_size={tr.batch_size}")
    train_set, teacher_seconds = data.train, 0.0
    if teacher_mode == "precompute":  # the teacher scores every example once; no teacher in the loop
        t0 = time.perf_counter()
        scores = ranking.precompute_teacher_scores(teacher, data.train, tr.eval_batch_size, rt).cpu()
        train_set = [(q, ps, row) for (q, ps), row in zip(data.train, scores)]
        teacher_seconds = time.perf_counter() - t0
    sampler = BucketBatchSampler([ranking.example_length(ex) for ex in data.train], tr.batch_size, tr.seed)
    loader = DataLoader(train_set, batch_sampler=sampler, num_workers=hw["num_workers"],
                        collate_fn=ranking.Collate(teacher if teacher_mode == "online" else None, student),
                        pin_memory=rt.device.type == "cuda")
    max_steps = tr.max_steps if tr.max_steps > 0 else max(1, math.ceil(tr.epochs * len(loader) / tr.grad_accum))
    optim = loop.make_optim(student, rt, max_steps, **_node(cfg.optimizer))

    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    run_id = tracker.start(cfg.tracking.run_name, flatten(resolved), tags={"kdrun.task": "ranking"})
    log.info("MLflow %s", tracker.run_url())
    try:
        tracker.text(OmegaConf.to_yaml(resolved), "config.yaml")
        tracker.text("\n".join(_overrides()) + "\n", "overrides.txt")
        n_params = lambda m: sum(p.numel() for p in m.parameters())
        tracker.metrics({**{f"data/{k}": v for k, v in data.stats.items()},
                         "model/student_params": n_params(student), "model/teacher_params": n_params(teacher),
                         "train/max_steps": max_steps, "teacher/precompute_seconds": teacher_seconds}, step=0)

        def evaluate(model, who: str, step: int) -> Dict[str, float]:
            metrics = ranking.evaluate(model, data.eval_queries, data.eval_candidates, data.eval_labels,
                                       tr.eval_batch_size, rt)
            tracker.metrics({f"eval/{who}/{k}": v for k, v in metrics.items()}, step=step)
            return metrics

        teacher_metrics = evaluate(teacher, "teacher", 0)
        before = evaluate(student, "student", 0)
        log.info("before training: student %s | teacher %s", _fmt(before), _fmt(teacher_metrics))

        def periodic_eval(step: int) -> Dict[str, float]:
            m = evaluate(student, "student", step)
            tracker.metrics({f"eval/teacher/{k}": v for k, v in teacher_metrics.items()}, step=step)
            log.info("step %d: student %s", step, _fmt(m))
            return m

        loop.train(student, teacher, loss_fn, loop.forever(loader), optim, rt, max_steps=max_steps,
                   grad_accum=tr.grad_accum, log_every=tr.log_every, eval_every=tr.eval_every,
                   log=tracker.metrics, evaluate=periodic_eval)
        after = periodic_eval(max_steps)

        if cfg.tracking.log_student:
            out = Path(cfg.output_dir) / "student"
            out.mkdir(parents=True, exist_ok=True)
            student.save(out)
            tracker.artifacts(str(out), "student")
        tracker.end("FINISHED")
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise

    rows = [(k, f"{before[k]:.4f}", f"{after[k]:.4f}", f"{teacher_metrics[k]:.4f}") for k in after]
    print(f"\nkdrun: MLflow {tracker.run_url()} (experiment '{cfg.tracking.experiment}')")
    print(f"held-out queries: {len(data.eval_queries)}, candidates per query: "
          f"{data.stats['eval_candidates_per_query']:.0f}, steps: {max_steps}")
    print(summary_table(rows, ("metric", "student before", "student after", "teacher")))
    return {f"eval/student/{k}": v for k, v in after.items()} | {"run_id": run_id}


def _fmt(metrics: Dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
