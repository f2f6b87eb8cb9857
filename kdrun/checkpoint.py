"""Checkpoints: atomic saves, the last K kept, the newest valid one found again, everything restored.

A checkpoint is a directory `<output_dir>/checkpoints/ckpt-<step>/`:

    student.safetensors   the student's weights (safetensors: no code runs when they are read)
    loss.safetensors      the loss terms' weights (TinyBERT projections), when there are any
    state.pt              optimizer, scheduler, GradScaler and the loss terms' other state (TAID's schedule); read
                          back with torch.load(weights_only=True), as every .pt here
    rank-<rank>.pt        each process's python, numpy, torch and CUDA RNG states and its loop's unlogged window
    meta.json             step, data position, MLflow run id, the run's config, and every file's size and SHA-256;
                          written last

Everything is written into a `.tmp-` sibling directory, each file fsynced, and the directory renamed into place
(then its parent fsynced): a crash or a full disk leaves the previous checkpoints as they were and no half-written
checkpoint under a final name. Older checkpoints are pruned only after the new one is in place. On resume, a
checkpoint whose files do not match meta.json (truncated, missing, altered) is skipped with a warning.

Under DDP every rank writes its own rank file into the same directory (a shared filesystem); rank 0 the rest.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from kdrun.errors import ConfigError, KdrunError
from kdrun.store import file_sha256, write_error

log = logging.getLogger(__name__)
FORMAT = 1
_NAME = re.compile(r"^ckpt-(\d+)$")
# config keys that may differ between a run and its resumption: where things go and how they are shown, not what
# is trained
_MAY_DIFFER = ("resume", "output_dir", "scores_out", "tracking.", "hardware.num_workers", "train.log_every",
               "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints", "hydra")


class CheckpointError(KdrunError):
    """A checkpoint cannot be written (the previous ones are intact) or read."""


class Interrupted(KdrunError):
    """SIGTERM/SIGINT: the run checkpointed at `step` and stopped."""

    def __init__(self, signum: int, step: int, path: Optional[Path]):
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}" +
                         (f"; checkpoint {path}" if path else ""))


def root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


# ---------------------------------------------------------------------------------------------- writing

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> Dict:
    """This process's RNG states, as plain values and tensors (loadable with weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: Dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _split_state(module: torch.nn.Module) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """(tensors, everything else) of a state dict: tensors go to safetensors, the rest (extra state) to state.pt."""
    tensors, other = {}, {}
    for k, v in module.state_dict().items():
        (tensors if isinstance(v, torch.Tensor) else other)[k] = v
    return tensors, other


def _write_errors() -> tuple:
    try:
        from safetensors import SafetensorError
    except ImportError:  # older safetensors
        return (OSError, RuntimeError)
    return (OSError, RuntimeError, SafetensorError)


# what a failed write raises: OSError from Python's own files, RuntimeError from torch.save ("PytorchStreamWriter
# failed writing file ..."), SafetensorError from safetensors ("IoError(... StorageFull ...)")
WRITE_ERRORS = _write_errors()


def save(directory: Path, step: int, *, student, loss_fn, optim, loop_state: Dict, position: Dict, run_id,
         config: Dict, rt, keep: int) -> Path:
    """Write checkpoint `step` atomically under `directory` and prune all but the newest `keep`. A failed write
    (e.g. a full disk) removes its partial files and raises CheckpointError; earlier checkpoints are untouched."""
    from safetensors.torch import save_file, save_model

    final = directory / f"ckpt-{step:08d}"
    tmp = directory / f".tmp-ckpt-{step:08d}"
    try:
        if rt.is_main:
            directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left over by a crash
            tmp.mkdir()
        rt.barrier()
        _torch_save({"rng": rng_state(), "loop": loop_state}, tmp / f"rank-{rt.rank}.pt")
        rt.barrier()
        if rt.is_main:
            save_model(student, str(tmp / "student.safetensors"))  # handles tied weights
            loss_tensors, loss_extra = _split_state(loss_fn)
            if loss_tensors:
                save_file({k: v.contiguous() for k, v in loss_tensors.items()}, str(tmp / "loss.safetensors"))
            _torch_save({"optimizer": optim.optimizer.state_dict(), "scheduler": optim.scheduler.state_dict(),
                         "scaler": optim.scaler.state_dict(), "loss_extra": loss_extra},
                        tmp / "state.pt")
            files = sorted(p.name for p in tmp.iterdir())
            for name in files:
                _fsync(tmp / name)
            meta = {"format": FORMAT, "step": step, "position": position, "run_id": run_id,
                    "world_size": rt.world_size, "config": config,
                    "files": {n: {"bytes": (tmp / n).stat().st_size, "sha256": file_sha256(tmp / n)} for n in files}}
            with open(tmp / "meta.json", "w") as f:
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            shutil.rmtree(final, ignore_errors=True)  # the same step again (a resumed run re-stopping)
            os.replace(tmp, final)
            _fsync(directory)
            prune(directory, keep)
    except WRITE_ERRORS as e:
        if rt.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        last = latest_name(directory, exclude=final)
        raise CheckpointError(f"could not write checkpoint {final} ({write_error(e, directory)}); "
                              + (f"the previous one, {last}, is intact" if last else "no earlier checkpoint exists")
                              + ". Free space there or point output_dir somewhere else") from None
    rt.barrier()
    return final


def _steps(directory: Path) -> List[Tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def latest_name(directory: Path, exclude: Optional[Path] = None) -> Optional[Path]:
    return next((p for _, p in _steps(directory) if p != exclude), None)


def prune(directory: Path, keep: int, protect: Optional[Path] = None) -> None:
    """All but the newest `keep` checkpoints removed (and never `protect`: the one a run resumed from)."""
    for _, p in _steps(directory)[max(keep, 1):]:
        if protect is None or Path(p).resolve() != Path(protect).resolve():
            shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- finding

def check(path: Path) -> Dict:
    """meta.json of a complete checkpoint; raises CheckpointError saying what is wrong otherwise."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no meta.json (an unfinished write)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}/meta.json is unreadable ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')}, this kdrun reads {FORMAT}")
    for name, want in meta["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if f.stat().st_size != want["bytes"]:
            raise CheckpointError(f"{path}: {name} has {f.stat().st_size} bytes, expected {want['bytes']} (truncated)")
        if file_sha256(f) != want["sha256"]:
            raise CheckpointError(f"{path}: {name} does not match its SHA-256 in meta.json")
    return meta


def find(path: Path) -> Optional[Tuple[Path, Dict]]:
    """The newest valid checkpoint at `path`: a checkpoint directory itself, a checkpoints/ directory, or an output
    directory holding checkpoints/. Invalid ones are skipped with a warning."""
    if (path / "meta.json").exists() or _NAME.match(path.name):
        candidates = [path]
    else:
        candidates = [p for _, p in _steps(path / "checkpoints" if (path / "checkpoints").is_dir() else path)]
    for c in candidates:
        try:
            return c, check(c)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
    return None


def locate(resume: Optional[str], output_dir: str) -> Optional[Tuple[Path, Dict]]:
    """resume=auto: the newest valid checkpoint in this output dir, or None (a fresh start); resume=PATH: the newest
    valid checkpoint there, or a ConfigError."""
    if not resume:
        return None
    if resume == "auto":
        found = find(root(output_dir))
        if found is None:
            log.info("resume=auto: no checkpoint in %s; starting from scratch", root(output_dir))
        return found
    path = Path(resume).expanduser()
    if not path.exists():
        raise ConfigError(f"resume={resume}: no such file or directory (give a checkpoint directory, or the output "
                          "directory of the run to continue)")
    found = find(path)
    if found is None:
        raise ConfigError(f"resume={resume}: no valid checkpoint there (see the warnings above)")
    return found


def config_differences(saved: Dict[str, str], now: Dict[str, str]) -> List[str]:
    """Keys of two flattened configs that differ, ignoring the ones a resumed run may change."""
    keys = sorted(set(saved) | set(now))
    return [k for k in keys if not k.startswith(_MAY_DIFFER) and saved.get(k) != now.get(k)]


# ---------------------------------------------------------------------------------------------- restoring

def restore(path: Path, *, student, loss_fn, optim, rt) -> Dict:
    """Load a checkpoint's weights and optimizer, scheduler and scaler states into the run; returns this rank's loop
    state (its RNG is restored separately, just before training, by `restore_rng`)."""
    from safetensors.torch import load_file, load_model

    load_model(student, str(path / "student.safetensors"), device=str(rt.device))
    state = torch.load(path / "state.pt", map_location=rt.device, weights_only=True)
    loss_state = dict(state["loss_extra"])
    if (path / "loss.safetensors").exists():
        loss_state.update(load_file(str(path / "loss.safetensors"), device=str(rt.device)))
    loss_fn.load_state_dict(loss_state)
    optim.optimizer.load_state_dict(state["optimizer"])
    optim.scheduler.load_state_dict(state["scheduler"])
    optim.scaler.load_state_dict(state["scaler"])
    return _rank_state(path, rt.rank, rt.device)["loop"]


def _rank_state(path: Path, rank: int, device=None) -> Dict:
    f = path / f"rank-{rank}.pt"
    if not f.exists():
        raise CheckpointError(f"{path} has no state for rank {rank}: it was written by fewer processes; resume "
                              "with the same number of processes")
    return torch.load(f, map_location=device, weights_only=True)


def restore_rng(path: Path, rank: int) -> None:
    set_rng_state(_rank_state(path, rank)["rng"])


