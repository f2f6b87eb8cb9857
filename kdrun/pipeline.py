"""Builds a run from a validated config, in order: tracking store, data, teacher, student, loss,
optimizer; then evaluates, trains, evaluates again and records everything in MLflow."""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Dict

from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from kdrun.config import enum_value
from kdrun.data.batching import BucketBatchSampler
from kdrun.errors import ConfigError, DataError
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


def _hf_config(model):
    """The transformers config under a kdrun model wrapper."""
    return (model.model if hasattr(model, "model") else model.encoder).config


def loss_context(task: str, student, teacher, student_cfg, total_batches: int):
    """What loss terms need to know about the models: widths, depths, the student's origin, class centres."""
    from kdrun.losses import Context

    sc, tc = _hf_config(student), _hf_config(teacher)
    default_map = [i + 1 for i in student_cfg.layers] if enum_value(student_cfg.init) == "teacher_layers" else None
    centres = None
    if task == "classification":
        from kdrun.models.classifier import classifier_head

        centres = classifier_head(teacher.model).weight
    return Context(task=task, student_hidden=sc.hidden_size, teacher_hidden=tc.hidden_size,
                   student_layers=sc.num_hidden_layers, teacher_layers=tc.num_hidden_layers,
                   default_layer_map=default_map, total_batches=total_batches, class_centres=centres)


def run(cfg: DictConfig) -> Dict[str, object]:
    import transformers
    from torch.utils.data import DataLoader

    from kdrun import train as loop
    from kdrun.losses import WeightedLoss
    from kdrun.runtime import make_runtime, seed_everything
    from kdrun.tasks import task_class

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # weight-loading bars; kdrun shows its own progress
    hw, tr = _node(cfg.hardware), cfg.train
    rt = make_runtime(hw["device"], hw["precision"])
    seed_everything(tr.seed)
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment)  # an unusable store fails before any loading
    data_node = _node(cfg.data)
    task_name = data_node.pop("task")  # picks the task family; the loader does not need it
    data = build(data_node)
    teacher_node = _node(cfg.teacher)
    teacher_mode = teacher_node.pop("mode")
    teacher = build(teacher_node, data=data, runtime=rt).to(rt.device)
    student = build(_node(cfg.student), teacher=teacher).to(rt.device)
    task = task_class(task_name)(data, teacher, student, rt, tr.eval_batch_size)

    examples = task.examples()
    if len(examples) < tr.batch_size:
        raise DataError(f"{data.source}: {len(examples)} training examples, fewer than train.batch_size={tr.batch_size}")
    batches_per_epoch = len(examples) // tr.batch_size
    max_steps = tr.max_steps if tr.max_steps > 0 else max(1, math.ceil(tr.epochs * batches_per_epoch / tr.grad_accum))
    terms = [(t.pop("name"), t.pop("weight"), t) for t in _node(cfg.loss)["terms"]]
    loss_fn = WeightedLoss(terms, loss_context(task_name, student, teacher, cfg.student,
                                                   max_steps * tr.grad_accum)).to(rt.device)
    if {"hidden_states", "attentions"} & loss_fn.needs and not task.collate(online=True).shared:
        raise ConfigError("loss terms on hidden states or attentions compare teacher and student token by token, so "
                          "both must tokenize alike: the same tokenizer and teacher.max_length == student.max_length "
                          f"(now {cfg.teacher.max_length} and {cfg.student.max_length})")
    for model in (student, teacher):
        model.request(loss_fn.needs)  # hidden states, attentions, features, in-batch scores

    teacher_seconds = 0.0
    if teacher_mode == "precompute":  # the teacher runs over every example once; no teacher in the loop
        t0 = time.perf_counter()
        examples = task.precompute()
        teacher_seconds = time.perf_counter() - t0
    sampler = BucketBatchSampler(task.lengths(), tr.batch_size, tr.seed)
    loader = DataLoader(examples, batch_sampler=sampler, num_workers=hw["num_workers"],
                        collate_fn=task.collate(online=teacher_mode == "online"), pin_memory=rt.device.type == "cuda")
    optim = loop.make_optim([student, loss_fn], rt, max_steps, **_node(cfg.optimizer))

    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    run_id = tracker.start(cfg.tracking.run_name, flatten(resolved), tags={"kdrun.task": task_name})
    log.info("MLflow %s", tracker.run_url())
    try:
        tracker.text(OmegaConf.to_yaml(resolved), "config.yaml")
        tracker.text("\n".join(_overrides()) + "\n", "overrides.txt")
        n_params = lambda m: sum(p.numel() for p in m.parameters())
        tracker.metrics({**{f"data/{k}": v for k, v in data.stats.items()},
                         **getattr(teacher, "finetune_info", {}),
                         "model/student_params": n_params(student), "model/teacher_params": n_params(teacher),
                         "model/loss_params": n_params(loss_fn),
                         "train/max_steps": max_steps, "teacher/precompute_seconds": teacher_seconds}, step=0)

        def evaluate(model, who: str, step: int) -> Dict[str, float]:
            metrics = task.evaluate(model, who)
            tracker.metrics({f"eval/{who}/{k}": v for k, v in metrics.items()}, step=step)
            return metrics

        teacher_metrics = evaluate(teacher, "teacher", 0)  # first: the student's agreement is measured against it
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

    rows = [(k, f"{before[k]:.4f}", f"{after[k]:.4f}", f"{teacher_metrics[k]:.4f}" if k in teacher_metrics else "-")
            for k in after]
    print(f"\nkdrun: MLflow {tracker.run_url()} (experiment '{cfg.tracking.experiment}')")
    print(f"{task.describe()}, steps: {max_steps}")
    print(summary_table(rows, ("metric", "student before", "student after", "teacher")))
    return {f"eval/student/{k}": v for k, v in after.items()} | {
        "run_id": run_id, "objective": after[task.primary]}


def _fmt(metrics: Dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
