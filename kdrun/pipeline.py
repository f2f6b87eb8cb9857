"""Builds a run from a validated config, in order: tracking store, data, teacher, student, loss,
optimizer; then evaluates, trains, evaluates again and records everything in MLflow."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Dict

from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from kdrun import checkpoint, sweep, teacher_cache
from kdrun.config import enum_value
from kdrun.data import scores_file
from kdrun.data.batching import BucketBatchSampler
from kdrun.errors import ConfigError, DataError, NonFiniteLossError
from kdrun.report import JOB_TAG
from kdrun.secrets import redact, redact_arg
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
    return {f"kdrun.choice.{g.split('@')[-1]}": str(c) for g, c in HydraConfig.get().runtime.choices.items()
            if c is not None and "/" not in g}  # "teacher@teachers.cls" (an extra teacher) -> "teachers.cls"


def flops_per_token(model) -> float:
    """Forward FLOPs per token, approximated as 2 x the parameters outside embedding tables (Kaplan et al. 2020;
    attention's length-dependent term left out): what a token costs to encode, comparable across students."""
    import torch

    embedding = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return 2.0 * sum(p.numel() for p in model.parameters() if id(p) not in embedding)


def _run_name() -> str:
    """A sweep job: "#N" and its swept values, so the UI tells children apart; a single run: the time and a random
    suffix (MLflow's own names would repeat here: they draw from `random`, which kdrun seeds)."""
    return sweep.job_name() or f"kdrun-{time.strftime('%m%d-%H%M%S')}-{os.urandom(2).hex()}"


def _hf_model(model):
    """The transformers model under a kdrun model wrapper (the main teacher of several)."""
    model = getattr(model, "main", model)
    return model.model if hasattr(model, "model") else model.encoder


def loss_context(task: str, student, teacher, student_cfg, total_batches: int):
    """What loss terms need to know about the models: widths, depths, the student's origin, class centres."""
    from kdrun.losses import Context

    sc = _hf_model(student).config
    tc = _hf_model(teacher).config if teacher is not None else None
    default_map = [i + 1 for i in student_cfg.layers] if enum_value(student_cfg.init) == "teacher_layers" else None
    centres = None
    if task == "classification" and teacher is not None:
        from kdrun.models.classifier import classifier_head

        centres = classifier_head(_hf_model(teacher)).weight
    return Context(task=task, student_hidden=sc.hidden_size, teacher_hidden=tc.hidden_size if tc else 0,
                   student_layers=sc.num_hidden_layers, teacher_layers=tc.num_hidden_layers if tc else 0,
                   default_layer_map=default_map, total_batches=total_batches, class_centres=centres)


_NOT_BUILDER_ARGS = ("mode", "cache", "cache_dir", "scores_file", "max_missing_fraction", "weight")


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
            node.pop(key)
        models[name] = build(node, data=data, runtime=rt).to(rt.device, dtype=rt.teacher_dtype)  # low precision
    if len(models) == 1:
        return models["teacher"], models["teacher"].source
    from kdrun.models.ensemble import Ensemble

    teacher = Ensemble(models, weights)
    return teacher, teacher.source


def teacher_outputs(task, teacher, cfg: DictConfig, rt, info):
    """Every teacher's outputs over the training data, through the teacher-output cache; several teachers'
    are averaged with their weights (each one's own kept for loss terms that name it)."""
    from kdrun import teacher_cache

    members = dict(teacher.members) if hasattr(teacher, "members") else {"teacher": teacher}
    outputs = {name: teacher_cache.teacher_outputs(task, m, rt, cfg.teacher.cache_dir, cfg.teacher.cache, info, name)
               for name, m in members.items()}
    if len(outputs) == 1:
        return outputs["teacher"]
    from kdrun.models.ensemble import combine

    return combine(outputs, teacher.weights)


def _forward_counter(teacher):
    from kdrun.teacher_cache import ForwardCounter

    members = dict(teacher.members).values() if hasattr(teacher, "members") else [teacher]
    return ForwardCounter([_hf_model(m) for m in members])


def student_inputs(task, student, cfg: DictConfig) -> Dict[str, float]:
    """How the student's batches are built (hardware profile): its training texts tokenised once (cached through
    `datasets`), padded to a multiple of 8/16, a ranking student's texts in up to `length_groups` length groups.
    Causal LMs train on packed blocks and cross-encoder students on text pairs: neither has single texts to
    tokenise ahead."""
    from kdrun.data import tokens
    from kdrun.models.hub import cache_root
    from kdrun.teacher_cache import tokenizer_fingerprint

    hw = cfg.hardware
    if hasattr(student, "pad_multiple"):
        student.pad_multiple = hw.pad_to_multiple_of
    if not hasattr(task, "train_texts") or not hasattr(student, "token_table") or \
            enum_value(cfg.student.arch) == "cross_encoder":
        return {}
    if task.name == "ranking":
        student.max_groups = hw.length_groups
    t0 = time.perf_counter()
    student.token_table, hit = tokens.pretokenize(student.tokenizer, task.train_texts(), student.max_length,
                                                  cache_root() / "tokens", tokenizer_fingerprint(student.tokenizer))
    return {"data/tokenize_seconds": time.perf_counter() - t0, "data/tokenize_cache_hit": float(hit),
            "data/distinct_texts": float(len(student.token_table))}


def runtime(cfg: DictConfig):
    """The device and precision of cfg.hardware (transformers' own logging and progress bars quietened)."""
    import transformers

    from kdrun.runtime import make_runtime

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # weight-loading bars; kdrun shows its own progress
    hw = _node(cfg.hardware)
    return make_runtime(hw["device"], hw["precision"])  # (hardware.distributed without torchrun: refused at validation)


def load_data(cfg: DictConfig):
    """(task family, data) from cfg.data: `task` picks the family; the loader does not need it."""
    node = _node(cfg.data)
    task_name = node.pop("task")
    return task_name, build(node)


def log_interval(max_steps: int) -> int:
    """train.log_every when it is not set: 25 or more points for runs under 250 steps, every 10 steps beyond."""
    return min(10, max(1, max_steps // 25))


RESULT_FILE = "kdrun-result.json"  # in output_dir when a run has finished: resume=auto does not repeat it


def run(cfg: DictConfig) -> Dict[str, object]:
    done = Path(cfg.output_dir) / RESULT_FILE
    if cfg.resume == "auto" and done.is_file():  # e.g. a sweep run again after a pre-emption: this job had finished
        result = json.loads(done.read_text())
        print(f"kdrun: {cfg.output_dir} holds a finished run (MLflow run {result['run_id']}); resume=auto has "
              "nothing to do")
        return result
    rt = runtime(cfg)
    try:
        result = _run(cfg, rt)
    finally:
        rt.close()
    if rt.is_main:
        done.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _run(cfg: DictConfig, rt) -> Dict[str, object]:
    import torch
    from torch.utils.data import DataLoader

    from kdrun import train as loop
    from kdrun.losses import WeightedLoss, specs
    from kdrun.runtime import compile_model, seed_everything
    from kdrun.tasks import task_class

    hw, tr = _node(cfg.hardware), cfg.train
    sweep.writable_dir(cfg.output_dir, "output_dir")  # checkpoints and the student go there: fail now, not after hours
    seed_everything(tr.seed)  # the same on every rank: identical initialisation
    terms = specs.parse(cfg.loss.terms, enum_value(cfg.data.task), ["teacher", *cfg.teachers],
                        online=enum_value(cfg.teacher.mode) == "online")
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    resolved["loss"]["terms"] = {name: spec.as_config() for name, spec in terms.items()}  # every setting in effect
    params = flatten(redact(resolved))
    found = resume_point(cfg, params)  # (checkpoint dir, its meta.json) or None; a bad resume= fails here
    # an unusable store fails before any loading; under DDP rank 0 alone logs
    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, enum_value(cfg.tracking.fallback),
                      cfg.output_dir) if rt.is_main else NullTracker()
    task_name, data = load_data(cfg)
    teacher_mode = enum_value(cfg.teacher.mode)
    teacher, teacher_source = build_teachers(cfg, data, rt)  # None for a scores file
    student = build(_node(cfg.student), teacher=teacher, teacher_source=teacher_source).to(rt.device)
    setup_metrics: Dict[str, float] = {}
    if teacher_mode == "scores_file":  # join before the task sees the data: examples without scores are dropped
        table = scores_file.read(cfg.teacher.scores_file)
        data.train, file_scores, missing = scores_file.join(data, table, cfg.teacher.scores_file,
                                                            cfg.teacher.max_missing_fraction)
        if missing:
            log.warning("teacher.scores_file: %d training examples have no score and were left out", missing)
        setup_metrics["teacher/scores_missing"] = missing
    task = task_class(task_name)(data, teacher, student, rt, tr.eval_batch_size)
    setup_metrics.update(student_inputs(task, student, cfg))

    examples = task.examples()
    if len(examples) < tr.batch_size:
        raise DataError(f"{data.source}: {len(examples)} training examples, fewer than train.batch_size={tr.batch_size}")
    batches_per_epoch = len(examples) // tr.batch_size // rt.world_size  # each rank's share
    max_steps = tr.max_steps if tr.max_steps > 0 else max(1, math.ceil(tr.epochs * batches_per_epoch / tr.grad_accum))
    loss_fn = WeightedLoss(terms, loss_context(task_name, student, teacher, cfg.student,
                                                   max_steps * tr.grad_accum)).to(rt.device)
    task.token_level = bool({"hidden_states", "attentions", "attention_scores"} & loss_fn.needs)
    if task.token_level and not task.collate(online=True).shared:
        raise ConfigError("loss terms on hidden states or attentions compare teacher and student token by token, so "
                          "both must tokenize alike: the same tokenizer and teacher.max_length == student.max_length "
                          f"(now {cfg.teacher.max_length} and {cfg.student.max_length})")
    student.request(loss_fn.student_needs)  # hidden states, attentions, features, in-batch scores
    if teacher is not None:
        teacher.request(loss_fn.needs)

    counter = _forward_counter(teacher) if teacher is not None else None  # teacher forward calls on training data
    cache = teacher_cache.CacheInfo()
    if teacher_mode == "precompute":  # the teacher's outputs over every example: from the cache, or computed once
        examples = task.attach(teacher_outputs(task, teacher, cfg, rt, cache))
        setup_metrics.update(cache.metrics())
    elif teacher_mode == "scores_file":
        examples = task.attach({"scores": file_scores})
    sampler = BucketBatchSampler(task.lengths(), tr.batch_size, tr.seed, rank=rt.rank, world_size=rt.world_size)
    loader = DataLoader(examples, batch_sampler=sampler, num_workers=hw["num_workers"],
                        persistent_workers=hw["num_workers"] > 0, collate_fn=task.collate(online=teacher_mode == "online"),
                        pin_memory=rt.device.type == "cuda",  # pinned: the copies to the GPU run asynchronously
                        generator=torch.Generator())  # its own: drawing worker seeds leaves the training RNG alone
    optim = loop.make_optim([student, loss_fn], rt, max_steps, **_node(cfg.optimizer))
    position = lambda step: {"micro_batches": step * tr.grad_accum, "batches_per_epoch": len(sampler),
                             "max_steps": max_steps}
    sizes = {f"data/{k}": f"{v:g}" for k, v in data.stats.items()}  # the data's sizes: params, not metric charts
    if "data/distinct_texts" in setup_metrics:
        sizes["data/distinct_texts"] = f"{setup_metrics.pop('data/distinct_texts'):g}"
    loop_state = None
    if found:  # weights, optimizer, scheduler, scaler and the loop's window from the checkpoint; the data position
        path, meta = found
        saved = meta["position"]
        if (saved["batches_per_epoch"], saved["max_steps"]) != (len(sampler), max_steps):
            raise ConfigError(f"resume: {path} was written by a run of {saved['max_steps']} steps over "
                              f"{saved['batches_per_epoch']} batches per epoch; this one has {max_steps} "
                              f"and {len(sampler)}: the data changed. Resume with the same data, or start afresh")
        loop_state = checkpoint.restore(path, student=student, loss_fn=loss_fn, optim=optim, rt=rt)
        sampler.resume_at(*divmod(saved["micro_batches"], len(sampler)))
        run_id = tracker.resume(meta["run_id"], step=meta["step"])
    else:
        run_id = tracker.start(cfg.tracking.run_name or _run_name(), {**params, **sizes},
                               tags={**resolved["tracking"]["tags"], "kdrun.task": task_name, **_choices(),
                                     **({} if sweep.job_number() is None else {JOB_TAG: str(sweep.job_number())})},
                               parent_run_id=sweep.parent_run_id())
    log.info("MLflow %s", tracker.run_url())
    ckpt_dir = checkpoint.root(cfg.output_dir)
    signals = checkpoint.StopSignals().__enter__()  # from now on SIGTERM/SIGINT end in a checkpoint, not a dead run
    try:
        if not found:
            tracker.text(OmegaConf.to_yaml(redact(resolved)), "config.yaml")  # credentials never reach the store
            tracker.text("\n".join(redact_arg(o) for o in _overrides()) + "\n", "overrides.txt")
        n_params = lambda m: sum(p.numel() for p in m.parameters())
        tracker.metrics({**getattr(getattr(teacher, "main", teacher), "finetune_info", {}), **setup_metrics,
                         "model/student_params": n_params(student), "model/loss_params": n_params(loss_fn),
                         "model/teacher_params": n_params(teacher) if teacher is not None else 0,
                         "model/student_flops_per_token": flops_per_token(student),
                         **({"model/teacher_flops_per_token": flops_per_token(teacher)} if teacher is not None else {}),
                         "train/max_steps": max_steps}, step=0)

        latency: Dict[str, float] = {}  # the last evaluation's milliseconds per held-out example

        def evaluate(model, who: str, step: int) -> Dict[str, float]:
            if not rt.is_main:  # rank 0 evaluates; the others wait for it in the next all-reduce
                return {}
            t0 = time.perf_counter()
            with counter.paused() if counter else contextlib.nullcontext():  # only training data is counted
                metrics = task.evaluate(model, who)
            latency[who] = 1000 * (time.perf_counter() - t0) / task.eval_size()
            tracker.metrics({f"eval/{who}/ms_per_example": latency[who]}, step=step)
            tracker.metrics({f"eval/{who}/{k}": v for k, v in metrics.items()}, step=step)
            return metrics

        if found:  # evaluated before the interruption: read back from the run
            teacher_eval, before = tracker.logged("eval/teacher/", 0), tracker.logged("eval/student/", 0)
            latency.update({who: m.pop("ms_per_example") for who, m in (("teacher", teacher_eval),
                                                                        ("student", before)) if "ms_per_example" in m})
        else:  # the teacher first: the student's agreement is measured against it (a scores file has no teacher)
            teacher_eval = evaluate(teacher, "teacher", 0) if teacher is not None else {}
            before = evaluate(student, "student", 0)
        log.info("before training: student %s | teacher %s", _fmt(before), _fmt(teacher_eval))

        def periodic_eval(step: int) -> Dict[str, float]:
            if not rt.is_main:
                return {}
            m = evaluate(student, "student", step)
            tracker.metrics({f"eval/teacher/{k}": v for k, v in teacher_eval.items()}, step=step)
            log.info("step %d: student %s", step, _fmt(m))
            return m

        if hw["compile"]:
            compile_model(_hf_model(student))  # in place: saving and evaluation see the same module
        if rt.distributed:
            torch.manual_seed(tr.seed + rt.rank)  # each rank its own dropout masks
        if found:
            checkpoint.restore_rng(found[0], rt.rank)  # last: the RNG continues exactly where it stopped

        def save_checkpoint(step: int, state: Dict):
            t0 = time.perf_counter()
            try:
                path = checkpoint.save(ckpt_dir, step, student=student, loss_fn=loss_fn, optim=optim, loop_state=state,
                                       position=position(step), run_id=run_id, config=params, rt=rt,
                                       keep=tr.keep_checkpoints)
            except checkpoint.CheckpointError as e:  # training goes on; the previous checkpoint is intact
                log.error("%s", e)
                tracker.tags({"kdrun.checkpoint_error": str(e)})
                return None
            tracker.metrics({"train/checkpoint_seconds": time.perf_counter() - t0}, step=step)
            return path

        log_every = tr.log_every or log_interval(max_steps)
        loop.train(rt.wrap(student), teacher, loss_fn, loop.forever(loader), optim, rt, max_steps=max_steps,
                   grad_accum=tr.grad_accum, log_every=log_every, eval_every=tr.eval_every,
                   log=tracker.metrics, evaluate=periodic_eval, max_nonfinite_skips=tr.max_nonfinite_skips,
                   checkpoint=save_checkpoint, checkpoint_every=tr.checkpoint_every, signals=signals,
                   resume=loop_state)
        signals.__exit__()  # the rest (evaluation, saving) finishes rather than stopping
        if counter is not None:  # precompute: 0 when every output came from the cache
            tracker.metrics({"teacher/train_forward_calls": counter.calls}, step=max_steps)
        after = periodic_eval(max_steps)

        if cfg.tracking.log_student and rt.is_main:
            out = Path(cfg.output_dir) / "student"
            out.mkdir(parents=True, exist_ok=True)
            student.save(out)
            tracker.artifacts(str(out), "student")
        tracker.end("FINISHED")
    except (KeyboardInterrupt, checkpoint.Interrupted):  # resumable: resume=PATH continues this very run
        tracker.end("KILLED")
        raise
    except BaseException as e:
        if isinstance(e, NonFiniteLossError) and (last := checkpoint.latest_name(ckpt_dir)):
            e.args = (f"{e}. The last good checkpoint is kept: {last}",)
        tracker.tags({"kdrun.failure": f"{type(e).__name__}: {e}"[:4000]})  # why, in the UI
        tracker.end("FAILED")
        raise
    finally:
        signals.__exit__()  # (already done when training ended)

    if not rt.is_main:
        return {"run_id": None, "objective": float("nan")}
    rows = [(k, f"{before[k]:.4f}", f"{after[k]:.4f}", f"{teacher_eval[k]:.4f}" if k in teacher_eval else "-")
            for k in after]
    print(f"\nkdrun: MLflow {tracker.run_url()} (experiment '{cfg.tracking.experiment}')")
    print(f"{task.describe()}, steps: {max_steps}")
    print(summary_table(rows, ("metric", "student before", "student after", "teacher")))
    final = {f"eval/student/{k}": v for k, v in after.items()} | {f"eval/teacher/{k}": v for k, v in teacher_eval.items()}
    final |= {f"eval/{who}/ms_per_example": v for who, v in latency.items()}
    return final | {"run_id": run_id, "objective": after[task.primary]}


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
    from kdrun.tasks import task_class

    rt = runtime(cfg)
    _, data = load_data(cfg)
    teacher, _ = build_teachers(cfg, data, rt)
    task = task_class("ranking")(data, teacher, None, rt, cfg.train.eval_batch_size)
    info = teacher_cache.CacheInfo()
    scores = teacher_outputs(task, teacher, cfg, rt, info)["scores"]
    lines = scores_file.write(cfg.scores_out, data, scores)
    how = "read from the teacher cache" if info.hits and not info.misses else f"computed in {info.teacher_seconds:.1f} s"
    print(f"kdrun: wrote {lines} scored triples ({len(data.train)} training examples, {how}) to {cfg.scores_out}\n"
          f"train on them with: teacher.mode=scores_file teacher.scores_file={cfg.scores_out}")
    return {"objective": float(lines), "lines": lines, "path": cfg.scores_out}
