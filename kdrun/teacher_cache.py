"""Content-addressed teacher outputs on disk, reused across runs and every job of a sweep.

An entry is keyed by everything the outputs depend on: the teacher wrapper and its settings (kind, pooling,
similarity, label index, max length, top-k), a fingerprint of its weights (every tensor of the state dict),
its tokenizer, the training data as the teacher sees it, the device type and the precision. It holds the
task's stacked outputs (ranking: scores [N, n]; classification: logits [N, C]; causal LM: top-k logits,
their token ids and the log-normaliser per position) in safetensors, plus meta.json with the key, the
description the key was made from, the outputs file's SHA-256 and the shapes. An entry whose meta, checksum
or shapes do not match is reported and rebuilt, never used.

Entries are written to a private staging directory and renamed into place, so concurrent sweep jobs never
read half an entry; when two jobs compute the same entry, the first rename wins.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from kdrun.models.hub import cache_root, cached, publish, staging_dir

log = logging.getLogger(__name__)
FORMAT = 1  # bump when the layout or the meaning of stored outputs changes


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer: name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the full tokenizer definition (fast tokenizers) or of its vocabulary and special tokens. A fast
    tokenizer's serialised truncation and padding are left out: they are the last call's settings (a tokenizer
    that has been called once serialises differently), not the definition."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)
        definition.pop("padding", None)
        text = json.dumps(definition, sort_keys=True)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, tokenizer.all_special_tokens], sort_keys=True)
    return hashlib.sha256((text + extra).encode()).hexdigest()


def describe(teacher, data_fingerprint: str, runtime) -> Dict[str, str]:
    """What a teacher's training outputs depend on: the description its cache key is made from."""
    settings = {k: getattr(teacher, k) for k in ("pooling", "similarity", "label_index", "max_length", "top_k")
                if hasattr(teacher, k)}
    return {"format": str(FORMAT), "wrapper": type(teacher).__name__, "source": str(teacher.source),
            "settings": json.dumps(settings, sort_keys=True), "weights": weights_fingerprint(teacher),
            "tokenizer": tokenizer_fingerprint(teacher.tokenizer), "data": data_fingerprint,
            "device": runtime.device.type, "precision": runtime.precision}


def key_of(description: Dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks (cache entries, checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read(entry: Path, key: str, description: Dict[str, str], n: int) -> Tuple[Optional[Dict[str, torch.Tensor]], str]:
    """(outputs, "") for a sound entry; (None, why) when it is missing, corrupt or for other inputs."""
    from safetensors.torch import load_file

    if not entry.exists():
        return None, "missing"
    try:
        meta = json.loads((entry / "meta.json").read_text())
        outputs_file = entry / "outputs.safetensors"
        if not cached(entry):
            return None, "incomplete (no completion marker)"
        if meta.get("key") != key or meta.get("description") != description:
            return None, "made from other inputs than its key says"
        if file_sha256(outputs_file) != meta.get("sha256"):
            return None, "outputs file does not match its checksum"
        outputs = load_file(str(outputs_file))
    except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable meta or tensors
        return None, f"unreadable ({type(e).__name__}: {e})"
    shapes = {k: list(v.shape) for k, v in outputs.items()}
    if shapes != meta.get("shapes") or any(v.shape[0] != n for v in outputs.values()):
        return None, f"shapes {shapes} do not fit {n} training examples"
    return outputs, ""


def write(entry: Path, key: str, description: Dict[str, str], outputs: Dict[str, torch.Tensor], seconds: float) -> None:
    from safetensors.torch import save_file

    tmp = staging_dir(entry)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in outputs.items()}, str(tmp / "outputs.safetensors"))
    meta = {"key": key, "description": description, "sha256": file_sha256(tmp / "outputs.safetensors"),
            "shapes": {k: list(v.shape) for k, v in outputs.items()}, "teacher_seconds": seconds}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    publish(tmp, entry, key)


class ForwardCounter:
    """Counts forward calls of the teachers' transformer models while active (forward hooks)."""

    def __init__(self, modules):
        self.calls, self.active = 0, True
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, *_):
        self.calls += self.active

    @contextlib.contextmanager
    def paused(self):
        self.active = False
        try:
            yield
        finally:
            self.active = True


@dataclass
class CacheInfo:
    hits: int = 0
    misses: int = 0
    rebuilt: int = 0
    teacher_seconds: float = 0.0  # running the teachers over the training data
    cache_seconds: float = 0.0  # fingerprinting, reading and writing entries
    entries: Dict[str, str] = field(default_factory=dict)  # teacher name -> entry directory

    def metrics(self) -> Dict[str, float]:
        return {"teacher/cache_hits": self.hits, "teacher/cache_misses": self.misses,
                "teacher/cache_rebuilt": self.rebuilt, "teacher/seconds": self.teacher_seconds,
                "teacher/cache_seconds": self.cache_seconds}


def teacher_outputs(task, teacher, runtime, cache_dir: Optional[str], use_cache: bool, info: CacheInfo,
                    name: str = "teacher") -> Dict[str, torch.Tensor]:
    """The task's stacked training outputs of one teacher: from the cache when a sound entry exists, else
    computed (and stored when use_cache)."""
    n = len(task.examples())
    if not use_cache:
        t0 = time.perf_counter()
        outputs = task.teacher_outputs(teacher)
        info.teacher_seconds += time.perf_counter() - t0
        info.misses += 1
        return outputs
    t0 = time.perf_counter()
    description = describe(teacher, task.fingerprint(), runtime)
    key = key_of(description)
    entry = Path(cache_dir or cache_root() / "teacher_outputs").expanduser() / task.name / key
    outputs, why = read(entry, key, description, n)
    info.entries[name] = str(entry)
    if outputs is None:  # one process computes an entry; parallel sweep jobs that miss it too wait, then read
        with _locked(entry):
            outputs, why = read(entry, key, description, n)
            if outputs is None:
                info.cache_seconds += time.perf_counter() - t0
                return _fill(task, teacher, entry, key, description, why, info, name, n)
    info.cache_seconds += time.perf_counter() - t0
    info.hits += 1
    log.info("teacher %s: outputs for %d training examples read from the cache (%s)", name, n, entry)
    return outputs


@contextlib.contextmanager
def _locked(entry: Path):
    """An exclusive lock file next to the entry (POSIX flock; where there is none, no lock: still correct, as
    entries are published by rename, but parallel jobs may compute the same entry)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(entry.with_name(entry.name + ".lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fill(task, teacher, entry: Path, key: str, description: Dict[str, str], why: str, info: CacheInfo, name: str,
          n: int) -> Dict[str, torch.Tensor]:
    if why != "missing":
        log.warning("teacher cache entry %s is %s; rebuilding it", entry, why)
        shutil.rmtree(entry, ignore_errors=True)
        info.rebuilt += 1
    info.misses += 1
    t0 = time.perf_counter()
    outputs = task.teacher_outputs(teacher)
    seconds = time.perf_counter() - t0
    info.teacher_seconds += seconds
    t0 = time.perf_counter()
    write(entry, key, description, outputs, seconds)
    info.cache_seconds += time.perf_counter() - t0
    log.info("teacher %s: outputs for %d training examples computed in %.1f s and cached (%s)", name, n, seconds, entry)
    return outputs
