"""Staged distillation: one `kdrun` command runs a chain of stages (`stages:` in a preset), each a child MLflow run of
one parent run, each stage's student starting from the student the stage before saved (ERNIE-Tiny's recipe: general
distillation of representations, then task distillation with soft and hard labels):

    stages:
      - {name: general, overrides: [loss=tinybert, loss.terms.kd_kl.weight=0]}
      - {name: task, overrides: [loss=kd]}

A stage is the command's own config plus its overrides, written to <output_dir>/stage<i>_<name>/ (checkpoints,
the student, kdrun-result.json). Run the same command again with resume=auto (or pass the run directory as
hydra.run.dir) and finished stages are read back, an interrupted one continues from its checkpoint, and the parent
run is the same one."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Dict, List

from omegaconf import DictConfig

from kdrun.errors import ConfigError
from kdrun import tags

log = logging.getLogger(__name__)
ENV = "KDRUN_STAGES_PARENT"  # the parent run of the stage now running (kdrun.sweep.parent_run_id reads it)
_OWN_KEYS = ("stages", "output_dir", "resume")  # what the driver sets per stage


def check(cfg: DictConfig) -> None:
    names = [str(s.name) for s in cfg.stages]
    if len(set(names)) != len(names) or not all(n.strip() and "/" not in n for n in names):
        raise ConfigError(f"stages: names {names} must be distinct, non-empty and free of '/'")
    for stage in cfg.stages:
        for o in stage.overrides:
            if str(o).lstrip("+~").split("=", 1)[0] in _OWN_KEYS:
                raise ConfigError(f"stages.{stage.name}: override {o!r} sets what the stage driver sets per stage "
                                  f"({', '.join(_OWN_KEYS)}); remove it")


def stage_overrides(base: List[str], stage, index: int, last: bool, out: Path, previous: Path = None) -> List[str]:
    """The overrides of stage `index`: the command's own (less what the driver sets), the stage's, and the hand-over
    from the stage before."""
    kept = [o for o in base if o.lstrip("+~").split("=", 1)[0] not in _OWN_KEYS]
    own = [f"output_dir={out}", "resume=auto", "stages=[]",
           f"tracking.run_name=stage{index + 1}_{stage.name}"]
    if not last:  # the next stage starts from this stage's saved student
        own.append("tracking.log_student=true")
    if previous is not None:
        own += [f"student.path={previous}", "student.name=null", "student.init=pretrained"]
    return kept + [str(o) for o in stage.overrides] + own


def run(cfg: DictConfig) -> Dict[str, object]:
    """Every stage in order, under one parent run; returns the last stage's result."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    from kdrun import pipeline
    from kdrun.names import enum_value

    check(cfg)
    out = Path(cfg.output_dir).resolve()
    base = list(HydraConfig.get().overrides.task)
    store = _store(cfg)
    parent = _parent(store, cfg, out)
    os.environ[ENV] = parent
    status, result = "FAILED", {}
    try:
        previous = None
        for i, stage in enumerate(cfg.stages):
            stage_dir = out / f"stage{i + 1}_{stage.name}"
            overrides = stage_overrides(base, stage, i, i == len(cfg.stages) - 1, stage_dir, previous)
            log.info("stage %d of %d (%s): kdrun %s", i + 1, len(cfg.stages), stage.name, " ".join(stage.overrides))
            result = pipeline.run(compose("config", overrides=overrides))
            if enum_value(cfg.mode) == "train":
                previous = stage_dir / "student"
            store.client.log_metric(parent, f"stage/{stage.name}/objective", float(result["objective"]), step=i + 1)
        for k, v in result.items():
            if k.startswith("eval/") and isinstance(v, (int, float)):
                store.client.log_metric(parent, k, float(v))
        status = "FINISHED"
        print(f"kdrun: stages parent run {parent}: {len(cfg.stages)} stages, each a child run; the last stage's "
              f"student is {previous}")
        return result
    except BaseException as e:
        status = "KILLED" if hasattr(e, "signum") else "FAILED"
        raise
    finally:
        store.client.set_terminated(parent, status)
        os.environ.pop(ENV, None)


def _store(cfg: DictConfig):
    from kdrun.names import enum_value
    from kdrun.tracking import open_store

    return open_store(cfg.tracking.uri or None, cfg.tracking.experiment, enum_value(cfg.tracking.fallback))


def _parent(store, cfg: DictConfig, out: Path) -> str:
    """The parent run of this output directory's chain: the one a previous attempt opened, else a new one."""
    from kdrun.tracking import command_line

    found = store.client.search_runs([store.experiment_id], f"tags.`{tags.STAGES_DIR}` = '{out}'", max_results=1)
    if found:
        log.info("stages: continuing the parent run %s of %s", found[0].info.run_id, out)
        store.client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = store.client.create_run(store.experiment_id, run_name=cfg.tracking.run_name or f"stages {out.name}",
                                  tags={tags.STAGES_PARENT: "1", tags.SWEEP_PARENT: "1", tags.STAGES_DIR: str(out),
                                        tags.COMMAND: command_line(),
                                        tags.STAGES: ", ".join(str(s.name) for s in cfg.stages)})
    for i, stage in enumerate(cfg.stages):
        store.client.log_param(run.info.run_id, f"stages.{i + 1}.{stage.name}", " ".join(stage.overrides)[:6000])
    return run.info.run_id
