"""A run, in named steps that read top to bottom (`_run`): the settings and the tracking store; then what the run
trains with (`build_all`: data, teachers, student, task, loss, teacher outputs, batches, optimizer); then the MLflow
run (`record`: evaluate, train, evaluate again, save). Each step is a function of what the ones before built, and
`run(cfg)` works in-process as from the command line. This module wires; the work is in the modules it calls."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from kdrun import checkpoint, eval_cache, sweep, tags, tasks, teacher_cache
from kdrun.names import enum_value
from kdrun.data import scores_file
from kdrun.data.batching import BucketBatchSampler
from kdrun.errors import ConfigError, DataError, KdrunError, NonFiniteLossError
from kdrun.secrets import redact, redact_arg
from kdrun.signals import PhaseSignals, StopSignals, Stopped, work_done
from kdrun.store import write_error
from kdrun.tracking import NullTracker, Tracker, flatten, summary_table

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


def _choices() -> Dict[str, str]:
    """The config-group options this run was composed from, as tags (kdrun.choice.loss = margin_mse, ...): the UI
    filters by them and sweep results group by them."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {f"{tags.CHOICE}{g.split('@')[-1]}": str(c) for g, c in HydraConfig.get().runtime.choices.items()
            if c is not None and "/" not in g}  # "teacher@teachers.cls" (an extra teacher) -> "teachers.cls"


def flops_per_token(model) -> float:
    """Forward FLOPs per token, approximated as 2 x the parameters applied to every token (Kaplan et al. 2020;
    attention's length-dependent term left out): what a token costs to encode, comparable across students. Left out:
    embedding tables (a lookup) and poolers (BERT's pooler reads the first token once per sequence)."""
    import torch

    model = getattr(model, "cost_model", model)  # out-of-fold teachers: one fold's model runs per query
    skip = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) or type(m).__name__.endswith("Pooler")
            for p in m.parameters()}
    return 2.0 * sum(p.numel() for p in model.parameters() if id(p) not in skip)


def _run_name() -> str:
    """A sweep job: "#N" and its swept values, so the UI tells children apart; a single run: the time and a random
    suffix (MLflow's own names would repeat here: they draw from `random`, which kdrun seeds)."""
    return sweep.job_name() or f"kdrun-{time.strftime('%m%d-%H%M%S')}-{os.urandom(2).hex()}"


def _hf_model(model):
    """The transformers model under a kdrun model wrapper (the main teacher of several)."""
    model = getattr(model, "main", model)
    return model.model if hasattr(model, "model") else model.encoder


# ---- the steps -------------------------------------------------------------------------------------------------

def runtime(cfg: DictConfig):
    """The device and precision of cfg.hardware (transformers' own logging and progress bars quietened)."""
    import transformers

    from kdrun.runtime import make_runtime

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # weight-loading bars; kdrun shows its own progress
    hw = _node(cfg.hardware)
    return make_runtime(hw["device"], hw["precision"])  # (hardware.distributed without torchrun: refused at validation)


def settings(cfg: DictConfig):
    """(loss term specs, the resolved config as logged, the flattened params): every loss setting in effect, with
    credentials redacted."""
    from kdrun.config import teacher_keeps
    from kdrun.losses import specs

    terms = specs.parse(cfg.loss.terms, str(cfg.data.task), ["teacher", *cfg.teachers],
                        online=enum_value(cfg.teacher.mode) == "online", cached=teacher_keeps(cfg))
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    resolved["loss"]["terms"] = {name: spec.as_config() for name, spec in terms.items()}
    return terms, resolved, flatten(redact(resolved))


def open_tracker(cfg: DictConfig, rt):
    """The MLflow run's tracker: an unusable store fails here, before anything loads; under DDP rank 0 alone logs."""
    if not rt.is_main:
        return NullTracker()
    return Tracker(cfg.tracking.uri, cfg.tracking.experiment, enum_value(cfg.tracking.fallback), cfg.output_dir,
                   system_metrics=cfg.tracking.system_metrics)


def load_data(cfg: DictConfig):
    """(task family, data) from cfg.data: `task` picks the family; the loader does not need it."""
    node = _node(cfg.data)
    return tasks.family(node.pop("task")), build(node)


_NOT_BUILDER_ARGS = ("mode", "cache", "cache_dir", "shard_size", "scores_file", "max_missing_fraction", "weight")


def build_teachers(cfg: DictConfig, data, rt):
    """(teacher module, its source): one frozen teacher, several as an Ensemble (cfg.teachers), or for a scores
    file no module and the source of the model the scores came from (for student init), when given."""
    if enum_value(cfg.teacher.mode) == "scores_file":
        from kdrun.models.hub import resolve_source

        t = cfg.teacher
        return None, (resolve_source("teacher", t.name, t.path) if (t.name or t.path) else None)
    nodes = {"teacher": _node(cfg.teacher), **{name: _node(c) for name, c in cfg.teachers.items()}}
    models, weights = {}, {}
    for name, node in nodes.items():
        weights[name] = node["weight"]
        for key in _NOT_BUILDER_ARGS:
            node.pop(key, None)
        models[name] = build(node, task=str(cfg.data.task), data=data, runtime=rt,
                             hardware=_node(cfg.hardware)).to(rt.device, dtype=rt.teacher_dtype)
    if len(models) == 1:
        return models["teacher"], models["teacher"].source
    from kdrun.models.ensemble import Ensemble

    teacher = Ensemble(models, weights)
    return teacher, teacher.source


def build_student(cfg: DictConfig, teacher, teacher_source: Optional[str], rt):
    """The trainable student, built by the task family (student._target_)."""
    return build(_node(cfg.student), task=str(cfg.data.task), teacher=teacher,
                 teacher_source=teacher_source).to(rt.device)


def join_scores_file(cfg: DictConfig, data):
    """teacher.mode=scores_file: (the file's scores per training example, metrics). Joined before the task sees the
    data: examples without a score are left out (and counted)."""
    if enum_value(cfg.teacher.mode) != "scores_file":
        return None, {}
    if not cfg.teacher.scores_file:  # the data's own score column (data=ranking_columns)
        import torch

        if getattr(data, "teacher_scores", None) is None:
            raise DataError(f"teacher.mode=scores_file without teacher.scores_file: {data.source} has no score "
                            "column (scores, margin or label); add one, or give teacher.scores_file=FILE")
        return torch.from_numpy(data.teacher_scores), {"teacher/scores_missing": 0}
    scores, missing = scores_file.join(data, cfg.teacher.scores_file, cfg.teacher.max_missing_fraction)
    if missing:
        log.warning("teacher.scores_file: %d training examples have no score and were left out", missing)
    return scores, {"teacher/scores_missing": missing}


def plan_steps(cfg: DictConfig, task, data, rt) -> int:
    """Optimizer steps: train.max_steps, else train.epochs over each rank's share of the batches."""
    tr = cfg.train
    n = len(task.examples())
    if n < tr.batch_size:
        raise DataError(f"{data.source}: {n} training examples, fewer than train.batch_size={tr.batch_size}")
    batches_per_epoch = n // tr.batch_size // rt.world_size
    return tr.max_steps if tr.max_steps > 0 else max(1, math.ceil(tr.epochs * batches_per_epoch / tr.grad_accum))


def loss_context(task, student, teacher, student_cfg, total_batches: int):
    """What loss terms need to know about the models (widths, depths, the student's origin) and the family's own
    (classification: the teacher's class centres)."""
    from kdrun.losses import Context

    sc = _hf_model(student).config
    tc = _hf_model(teacher).config if teacher is not None else None
    default_map = [i + 1 for i in student_cfg.layers] if enum_value(student_cfg.init) == "teacher_layers" else None
    return Context(task=task.name, student_hidden=sc.hidden_size, teacher_hidden=tc.hidden_size if tc else 0,
                   student_layers=sc.num_hidden_layers, teacher_layers=tc.num_hidden_layers if tc else 0,
                   default_layer_map=default_map, total_batches=total_batches, **task.loss_context())


def build_loss(cfg: DictConfig, terms, task, student, teacher, max_steps: int, rt):
    """The weighted loss; the models asked for what its terms read (hidden states, attentions, features)."""
    from kdrun.losses import WeightedLoss

    loss_fn = WeightedLoss(terms, loss_context(task, student, teacher, cfg.student,
                                               max_steps * cfg.train.grad_accum)).to(rt.device)
    task.token_level = bool({"hidden_states", "attentions", "attention_scores"} & loss_fn.needs)
    if task.token_level and not task.collate(online=True).shared:
        raise ConfigError("loss terms on hidden states or attentions compare teacher and student token by token, so "
                          "both must tokenize alike: the same tokenizer and teacher.max_length == student.max_length "
                          f"(now {cfg.teacher.max_length} and {cfg.student.max_length})")
    student.request(loss_fn.student_needs)  # hidden states, attentions, features, in-batch scores, a second head
    for term in loss_fn.terms:  # (loss=dual_head: the mixing weight of the student's two heads)
        if hasattr(term, "configure_student"):
            term.configure_student(student)
    if teacher is not None:
        teacher.request(loss_fn.needs)
    return loss_fn


def teacher_members(teacher) -> Dict[str, Any]:
    """{name: model} of the run's teachers: an Ensemble's members, else {"teacher": the one teacher}."""
    return dict(teacher.members) if hasattr(teacher, "members") else {"teacher": teacher}


def teacher_outputs(task, teacher, cfg: DictConfig, rt, info):
    """Every teacher's outputs over the training data, through the teacher-output cache; several teachers'
    are averaged with their weights (each one's own kept for loss terms that name it)."""
    members = teacher_members(teacher)
    if hasattr(task, "teacher_outputs_range"):  # a pass in shards: resumable, split over DDP ranks
        task.teacher_chunk = cfg.teacher.shard_size
    outputs = {name: teacher_cache.teacher_outputs(task, m, rt, cfg.teacher.cache_dir, cfg.teacher.cache, info, name)
               for name, m in members.items()}
    if len(outputs) == 1:
        return outputs["teacher"]
    import numpy as np
    import torch

    from kdrun.models.ensemble import combine

    outputs = {name: {k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v for k, v in out.items()}
               for name, out in outputs.items()}  # (a memory-mapped cache entry: averaged in memory)

    return combine(outputs, teacher.weights)


def training_examples(cfg: DictConfig, task, teacher, file_scores, rt, reads_teacher: bool = True):
    """(examples, metrics): with a precomputed teacher, its outputs over every example (from the cache, or
    computed once); with a scores file, the file's scores; online, the examples as they are. A loss that reads no
    teacher (ce, pskd) skips the teacher's pass, and online the teacher's inputs: the examples carry no outputs."""
    mode = enum_value(cfg.teacher.mode)
    if mode in ("precompute", "online") and not reads_teacher:
        return task.attach({}), {}
    if mode == "precompute":
        cache = teacher_cache.CacheInfo()
        examples = task.attach(teacher_outputs(task, teacher, cfg, rt, cache))
        return examples, cache.metrics()
    if mode == "scores_file":
        return task.attach({"scores": file_scores}), {}
    return task.examples(), {}


def batches(cfg: DictConfig, task, examples, rt, reads_teacher: bool = True):
    """(sampler, loader): length-bucketed batches (DDP: each rank its share), collated by the task; with the
    teacher's inputs for an online teacher, unless the loss reads no teacher (then it does not run in the step)."""
    import torch
    from torch.utils.data import DataLoader

    hw, tr = _node(cfg.hardware), cfg.train
    sampler = BucketBatchSampler(task.lengths(), tr.batch_size, tr.seed, rank=rt.rank, world_size=rt.world_size)
    loader = DataLoader(examples, batch_sampler=sampler, num_workers=hw["num_workers"],
                        persistent_workers=hw["num_workers"] > 0,
                        collate_fn=task.collate(online=enum_value(cfg.teacher.mode) == "online" and reads_teacher),
                        pin_memory=rt.device.type == "cuda",  # pinned: the copies to the GPU run asynchronously
                        generator=torch.Generator())  # its own: drawing worker seeds leaves the training RNG alone
    return sampler, loader


def finetune_metrics(teacher) -> Dict[str, float]:
    """What fine-tuning the teachers cost (teacher/finetune_*; an extra teacher's as teachers/NAME/finetune_*)."""
    out: Dict[str, float] = {}
    for name, m in teacher_members(teacher).items():
        for k, v in (getattr(m, "finetune_info", None) or {}).items():
            out[k if name == "teacher" else k.replace("teacher/", f"teachers/{name}/", 1)] = v
    return out


@dataclass
class Built:
    """What `build_all` made, one field per step, for the MLflow run to use."""
    family: Any
    data: Any
    teacher: Any
    student: Any
    task: Any
    loss_fn: Any
    sampler: Any
    loader: Any
    optim: Any
    max_steps: int
    setup: Dict[str, float]  # metrics of the build (teacher cache, tokenising, scores missing, fine-tune)
    counter: Any  # the teachers' forward calls on training data (None without a teacher model)
    step_hook: Any = None  # run on each batch before the models (causal LM: on-policy generation)


def student_threads(cfg: DictConfig, build: bool = False) -> None:
    """hardware.threads=N: torch's CPU threads for training and evaluations. The build (`build`: teacher fine-tune,
    teacher pass) takes every core this process may use: parallel sweep jobs wait on the one job that fills a cache
    entry (scripts/reproduce_margin_mse: 2 jobs of 1 thread on 2 cores; joblib's workers start with 1 thread)."""
    threads = _node(cfg.hardware)["threads"]
    if threads:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(cores if build else threads)


def build_all(cfg: DictConfig, terms, rt) -> Built:
    """Everything the run trains with, each step from the ones before."""
    from kdrun import train as loop

    family, data = load_data(cfg)
    teacher, teacher_source = build_teachers(cfg, data, rt)  # None for a scores file
    student = build_student(cfg, teacher, teacher_source, rt)
    file_scores, setup = join_scores_file(cfg, data)
    task = family.task(data, teacher, student, rt, cfg.train.eval_batch_size)
    setup.update(task.prepare_student(student, _node(cfg.hardware)))
    max_steps = plan_steps(cfg, task, data, rt)
    loss_fn = build_loss(cfg, terms, task, student, teacher, max_steps, rt)
    if hasattr(task, "use_loss"):  # (ranking: an embedding-alignment term adds the asymmetric evaluation)
        task.use_loss(loss_fn)
    counter = _forward_counter(teacher) if teacher is not None else None  # counts from here: the teacher pass too
    examples, cache_metrics = training_examples(cfg, task, teacher, file_scores, rt, loss_fn.reads_teacher)
    setup.update(cache_metrics, **finetune_metrics(teacher))
    sampler, loader = batches(cfg, task, examples, rt, loss_fn.reads_teacher)
    optim = loop.make_optim([student, loss_fn], rt, max_steps, **_node(cfg.optimizer))
    hook = family.step_hook(task, cfg.train, rt)
    return Built(family, data, teacher, student, task, loss_fn, sampler, loader, optim, max_steps, setup, counter, hook)


def begin(cfg: DictConfig, rt, tracker, found, b: Built, params: Dict[str, str], resolved: dict) -> Tuple[str, Any]:
    """(MLflow run id, the loop's saved state): a checkpoint's weights, optimizer, scheduler and data position
    restored into the same MLflow run, or a new run with its params (the data's sizes among them) and tags."""
    if found:
        path, meta = found
        saved = meta["position"]
        if (saved["batches_per_epoch"], saved["max_steps"]) != (len(b.sampler), b.max_steps):
            raise ConfigError(f"resume: {path} was written by a run of {saved['max_steps']} steps over "
                              f"{saved['batches_per_epoch']} batches per epoch; this one has {b.max_steps} "
                              f"and {len(b.sampler)}: the data changed. Resume with the same data, or start afresh")
        state = checkpoint.restore(path, student=b.student, loss_fn=b.loss_fn, optim=b.optim, rt=rt)
        b.sampler.resume_at(*divmod(saved["micro_batches"], len(b.sampler)))
        return tracker.resume(meta["run_id"], step=meta["step"]), state
    sizes = {f"data/{k}": f"{v:g}" if isinstance(v, (int, float)) else str(v)
             for k, v in b.data.stats.items() if not k.endswith("_cache_hit")}  # the data's sizes: params
    b.setup.update({f"data/{k}": float(v) for k, v in b.data.stats.items() if k.endswith("_cache_hit")})  # metrics
    if "data/distinct_texts" in b.setup:
        sizes["data/distinct_texts"] = f"{b.setup.pop('data/distinct_texts'):g}"
    job = sweep.job_number()
    run_id = tracker.start(cfg.tracking.run_name or _run_name(), {**params, **sizes},
                           tags={**resolved["tracking"]["tags"], tags.TASK: b.family.name, **_choices(),
                                 **({} if job is None else {tags.JOB_NUM: str(job)})},
                           parent_run_id=sweep.parent_run_id())
    marker = Path(cfg.output_dir) / RUN_ID_FILE
    if rt.is_main and marker.is_file():  # an earlier run here died before any checkpoint: not left RUNNING
        tracker.close_stale(marker.read_text().strip(), run_id)
    if rt.is_main:
        marker.write_text(run_id + "\n")
    tracker.datasets(datasets(cfg, b))
    tracker.text(OmegaConf.to_yaml(redact(resolved)), "config.yaml")  # credentials never reach the store
    tracker.text("\n".join(redact_arg(o) for o in _overrides()) + "\n", "overrides.txt")
    return run_id, None


def _data_name_source(cfg: DictConfig, b: Built) -> Tuple[str, str]:
    """(the data's name: its loader's module, e.g. chatterbot; where it came from: the loader's own description)."""
    target = str(cfg.data.get("_target_", "data"))
    return target.split(".")[-2], str(getattr(b.data, "source", "") or target)


def datasets(cfg: DictConfig, b: Built) -> list:
    """The run's training and held-out data as MLflow dataset inputs (Tracker.datasets): kdrun's fingerprints."""
    name, source = _data_name_source(cfg, b)
    return [{"name": f"{name}-train", "digest": b.task.fingerprint(), "source": source, "rows": len(b.task.examples()),
             "context": "training"},
            {"name": f"{name}-heldout", "digest": b.task.eval_fingerprint(), "source": source,
             "rows": b.task.eval_size(), "context": "evaluation"}]


def _run(cfg: DictConfig, rt, phases) -> Dict[str, object]:
    from kdrun.runtime import seed_everything

    sweep.writable_dir(cfg.output_dir, "output_dir")  # checkpoints and the student go there: fail now, not after hours
    seed_everything(cfg.train.seed)  # the same on every rank: identical initialisation
    terms, resolved, params = settings(cfg)
    found = resume_point(cfg, params)  # (checkpoint dir, its meta.json) or None; a bad resume= fails here
    tracker = open_tracker(cfg, rt)
    phases.phase = "while loading the data, the models and the teacher's outputs (before its MLflow run started)"
    student_threads(cfg, build=True)
    b = build_all(cfg, terms, rt)
    student_threads(cfg)
    phases.check()  # (a stop swallowed by a finalizer while loading)
    run_id, loop_state = begin(cfg, rt, tracker, found, b, params, resolved)
    log.info("MLflow %s", tracker.run_url())
    before, after, teacher_eval, latency = record(cfg, rt, tracker, b, found, run_id, loop_state, params, phases)
    if not rt.is_main:
        return {"run_id": None, "objective": float("nan")}
    rows = [(k, f"{before[k]:.4f}", f"{after[k]:.4f}", f"{teacher_eval[k]:.4f}" if k in teacher_eval else "-")
            for k in after]
    print(f"\nkdrun: MLflow {tracker.run_url()} (experiment '{cfg.tracking.experiment}')")
    print(f"{b.task.describe()}, steps: {b.max_steps}")
    print(summary_table(rows, ("metric", "student before", "student after", "teacher")))
    final = {f"eval/student/{k}": v for k, v in after.items()} | {f"eval/teacher/{k}": v for k, v in teacher_eval.items()}
    final |= {f"eval/{who}/ms_per_example": v for who, v in latency.items()}
    return final | {"run_id": run_id, "objective": after[b.task.primary]}


def record(cfg: DictConfig, rt, tracker, b: Built, found, run_id: str, loop_state, params: Dict[str, str],
           phases):
    """The MLflow run: model sizes, the evaluation before training (read back when resumed), the training loop with
    its periodic evaluations and checkpoints, the final evaluation, the student saved. Ends the run FINISHED, KILLED
    (a signal: resumable) or FAILED (with the reason). Returns (before, after, teacher's metrics, latency)."""
    import torch

    from kdrun import train as loop
    from kdrun.runtime import compile_model

    tr, student, teacher, task, counter = cfg.train, b.student, b.teacher, b.task, b.counter
    ckpt_dir = checkpoint.root(cfg.output_dir)
    signals = StopSignals().__enter__()  # from now on SIGTERM/SIGINT end in a checkpoint, not a dead run
    latency: Dict[str, float] = {}  # the last evaluation's milliseconds per held-out example
    try:
        n_params = lambda m: sum(p.numel() for p in m.parameters())
        tracker.metrics({**b.setup, "model/student_params": n_params(student), "model/loss_params": n_params(b.loss_fn),
                         "model/teacher_params": 0 if teacher is None else n_params(getattr(teacher, "cost_model",
                                                                                             teacher)),
                         "model/student_flops_per_token": flops_per_token(student),
                         **({"model/teacher_flops_per_token": flops_per_token(teacher)} if teacher is not None else {}),
                         "train/max_steps": b.max_steps}, step=0)

        def evaluate(model, who: str, step: int, final: bool = True) -> Dict[str, float]:
            if not rt.is_main:  # rank 0 evaluates; the others wait for it in the next all-reduce
                return {}
            # before training (the teacher, the student as it starts): computed once per model and data
            key = eval_cache.key_of(task, model, rt, tr.eval_batch_size) if tr.eval_cache and step == 0 else None
            hit = eval_cache.load(key) if key else None
            if hit:
                metrics, latency[who] = hit["metrics"], hit["ms_per_example"]
                task.restore_eval(who, hit["state"])
                log.info("evaluation of the %s: from the evaluation cache (%s)", who, key)
            else:
                t0 = time.perf_counter()
                with counter.paused() if counter else contextlib.nullcontext():  # only training data is counted
                    metrics = task.evaluate(model, who, final=final)
                latency[who] = 1000 * (time.perf_counter() - t0) / task.eval_size()
                if key:
                    eval_cache.store(key, metrics, latency[who], task.eval_state(who))
            if key:
                tracker.metrics({f"eval_cache/{who}_hit": float(bool(hit))}, step=step)
            tracker.metrics({f"eval/{who}/ms_per_example": latency[who]}, step=step)
            tracker.metrics({(f"eval/{k}" if k.startswith("asymmetric/") else f"eval/{who}/{k}"): v
                             for k, v in metrics.items()}, step=step)  # (asymmetric: eval/asymmetric/<metric>)
            return metrics

        if found:  # evaluated before the interruption: read back from the run
            teacher_eval, before = tracker.logged("eval/teacher/", 0), tracker.logged("eval/student/", 0)
            latency.update({who: m.pop("ms_per_example") for who, m in (("teacher", teacher_eval),
                                                                        ("student", before)) if "ms_per_example" in m})
        else:  # the teacher first: the student's agreement is measured against it (a scores file has no teacher)
            teacher_eval = evaluate(teacher, "teacher", 0) if teacher is not None else {}
            before = evaluate(student, "student", 0)
        log.info("before training: student %s | teacher %s", _fmt(before), _fmt(teacher_eval))

        def periodic_eval(step: int, final: bool = False) -> Dict[str, float]:
            if not rt.is_main:
                return {}
            m = evaluate(student, "student", step, final)
            tracker.metrics({f"eval/teacher/{k}": v for k, v in teacher_eval.items()}, step=step)
            log.info("step %d: student %s", step, _fmt(m))
            return m

        def save_checkpoint(step: int, state: Dict):
            t0 = time.perf_counter()
            position = {"micro_batches": step * tr.grad_accum, "batches_per_epoch": len(b.sampler),
                        "max_steps": b.max_steps}
            try:
                path = checkpoint.save(ckpt_dir, step, student=student, loss_fn=b.loss_fn, optim=b.optim,
                                       loop_state=state, position=position, run_id=run_id, config=params, rt=rt,
                                       keep=tr.keep_checkpoints)
            except checkpoint.CheckpointError as e:  # training goes on; the previous checkpoint is intact
                log.error("%s", e)
                tracker.tags({tags.CHECKPOINT_ERROR: str(e)})
                return None
            tracker.metrics({"train/checkpoint_seconds": time.perf_counter() - t0}, step=step)
            return path

        if cfg.hardware.compile:
            compile_model(_hf_model(student))  # in place: saving and evaluation see the same module
        if rt.distributed:
            torch.manual_seed(tr.seed + rt.rank)  # each rank its own dropout masks
        if found:
            if rt.is_main:  # a run killed between writing a checkpoint and pruning left one too many
                checkpoint.prune(ckpt_dir, tr.keep_checkpoints, protect=found[0])
            checkpoint.restore_rng(found[0], rt.rank)  # last: the RNG continues exactly where it stopped
        loop.train(rt.wrap(student), teacher, b.loss_fn, loop.forever(b.loader), b.optim, rt, max_steps=b.max_steps,
                   grad_accum=tr.grad_accum, log_every=tr.log_every or log_interval(b.max_steps),
                   eval_every=tr.eval_every, log=tracker.metrics, evaluate=periodic_eval,
                   max_nonfinite_skips=tr.max_nonfinite_skips, checkpoint=save_checkpoint,
                   checkpoint_every=tr.checkpoint_every, signals=signals, resume=loop_state, on_policy=b.step_hook)
        signals.__exit__()  # from here a signal stops the run at once (PhaseSignals): KILLED, resumable from a checkpoint
        phases.phase = f"after training (step {b.max_steps}), during the final evaluation or the student's save"
        if counter is not None:  # precompute: 0 when every output came from the cache
            tracker.metrics({"teacher/train_forward_calls": counter.calls}, step=b.max_steps)
        tracker.metrics({"system/peak_rss_mb": peak_rss_mb()}, step=b.max_steps)
        after = periodic_eval(b.max_steps, final=True)
        if rt.is_main and hasattr(task, "eval_files"):  # e.g. the TREC runs the final metrics were computed from
            files = task.eval_files(Path(cfg.output_dir) / "eval")
            if files:
                tracker.artifacts(str(files[0].parent), "eval")
        if cfg.tracking.log_student and rt.is_main:
            out = Path(cfg.output_dir) / "student"
            try:
                if out.is_dir():  # a save cut short before a resume: written again whole, in the space it took
                    shutil.rmtree(out)
                out.mkdir(parents=True, exist_ok=True)
                student.save(out)
                write_card(cfg, out, b, params, before, after, teacher_eval)
            except checkpoint.WRITE_ERRORS as e:
                last = checkpoint.latest_name(ckpt_dir)
                raise KdrunError(f"could not save the trained student to {out} ({write_error(e, out)}); "
                                 "free space there (or set output_dir elsewhere) and run the same command with "
                                 "resume=auto" + (f": it continues from {last}" if last else "")) from None
            tracker.artifacts(str(out), "student")  # the plain folder: what from_pretrained users take
            tracker.model(str(out), task.model_examples(), b.max_steps, cfg.tracking.register_as)
        phases.check()  # a stop swallowed by a finalizer in this phase still ends the run KILLED
        tracker.end("FINISHED")
    except (KeyboardInterrupt, checkpoint.Interrupted, Stopped):  # resumable: resume=PATH continues this very run
        tracker.end("KILLED")
        raise
    except BaseException as e:
        if isinstance(e, NonFiniteLossError) and (last := checkpoint.latest_name(ckpt_dir)):
            e.args = (f"{e}. The last good checkpoint is kept: {last}",)
        tracker.tags({tags.FAILURE: f"{type(e).__name__}: {e}"[:4000]})  # why, in the UI
        tracker.end("FAILED")
        raise
    finally:
        signals.__exit__()  # (already done when training ended)
    return before, after, teacher_eval, latency


def write_card(cfg: DictConfig, out: Path, b: Built, params: Dict[str, str], before, after, teacher_eval) -> None:
    """The student's model card (kdrun.model_card) from this run."""
    from importlib.metadata import version

    import shlex

    from kdrun import logged_model, model_card
    from kdrun.tracking import git_commit

    name, source = _data_name_source(cfg, b)
    model_card.write(out, kind=logged_model.kind_of(out), params=params, data_name=name, data_source=source,
                     before=before, after=after,
                     teacher=teacher_eval, version=version("kdrun"), commit=git_commit(),
                     command=shlex.join(["kdrun", *(redact_arg(o) for o in _overrides())]))  # this job's own command


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _forward_counter(teacher):
    from kdrun.teacher_cache import ForwardCounter

    members = dict(teacher.members).values() if hasattr(teacher, "members") else getattr(teacher, "folds", [teacher])
    return ForwardCounter([_hf_model(m) for m in members])


def log_interval(max_steps: int) -> int:
    """train.log_every when it is not set: 25 or more points for runs under 250 steps, every 10 steps beyond."""
    return min(10, max(1, max_steps // 25))


RUN_ID_FILE = "kdrun-run-id"  # in output_dir from a run's start: the MLflow run this directory's training logs to
RESULT_FILE = "kdrun-result.json"  # in output_dir when a run has finished: resume=auto does not repeat it


def run(cfg: DictConfig) -> Dict[str, object]:
    """A whole run from a composed config (`kdrun` calls this; so can a test or a notebook, in-process): its
    held-out metrics, the MLflow run id and the objective a sweeper optimises."""
    from kdrun import config

    config.validate(cfg)
    done = Path(cfg.output_dir) / RESULT_FILE
    if cfg.resume == "auto" and done.is_file():  # e.g. a sweep run again after a pre-emption: this job had finished
        result = json.loads(done.read_text())
        work_done()  # nothing left to stop: a signal from here does not change the exit status
        print(f"kdrun: {cfg.output_dir} holds a finished run (MLflow run {result['run_id']}); resume=auto has "
              "nothing to do")
        return result
    rt = runtime(cfg)
    checkpoints = checkpoint.root(cfg.output_dir)
    phases = PhaseSignals(lambda: checkpoint.latest_name(checkpoints)).__enter__()  # a signal in any phase: KILLED
    try:
        result = _run(cfg, rt, phases)
        if rt.is_main:
            done.write_text(json.dumps(result, indent=1) + "\n")
        if work_done():  # finished and recorded: SIGTERM/SIGINT are ignored from here to the exit
            phases.release()
    finally:
        phases.__exit__()
        rt.close()
    return result


def resume_point(cfg: DictConfig, params: Dict[str, str]):
    """resume=auto|PATH: the checkpoint to continue from (None: a fresh run). Its run's config must match this one,
    but for where things go and how often they are logged."""
    if enum_value(cfg.mode) != "train" or not cfg.resume:
        return None
    found = checkpoint.locate(cfg.resume, cfg.output_dir)
    if found:
        differ = checkpoint.config_differences(found[1]["config"], params)
        if differ:
            shown = "; ".join(f"{k}: {found[1]['config'].get(k)} -> {params.get(k)}" for k in differ[:8])
            raise ConfigError(f"resume: {found[0]} belongs to a run with another config ({shown}). A checkpoint "
                              "continues the same run: pass the same overrides, or start a new run without resume=")
        log.info("resuming from %s (step %d)", found[0], found[1]["step"])
    return found


def _fmt(metrics: Dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def score(cfg: DictConfig) -> Dict[str, object]:
    """mode=score: the teacher's scores of every training triple, written to cfg.scores_out in the Margin-MSE
    authors' format (score_pos score_neg query_id pos_id neg_id), through the teacher-output cache. Score once
    on a big machine; train students anywhere with teacher.mode=scores_file teacher.scores_file=FILE."""
    rt = runtime(cfg)
    family, data = load_data(cfg)
    teacher, _ = build_teachers(cfg, data, rt)
    task = family.task(data, teacher, None, rt, cfg.train.eval_batch_size)
    info = teacher_cache.CacheInfo()
    scores = teacher_outputs(task, teacher, cfg, rt, info)["scores"]
    lines = scores_file.write(cfg.scores_out, data, scores)
    work_done()
    how = "read from the teacher cache" if info.hits and not info.misses else f"computed in {info.teacher_seconds:.1f} s"
    print(f"kdrun: wrote {lines} scored triples ({data.num_train} training examples, {how}) to {cfg.scores_out}\n"
          f"train on them with: teacher.mode=scores_file teacher.scores_file={cfg.scores_out}")
    return {"objective": float(lines), "lines": lines, "path": cfg.scores_out}
