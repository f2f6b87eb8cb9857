"""Content-addressed teacher outputs on disk, reused across runs and every job of a sweep.

An entry is keyed by everything the outputs depend on: the teacher wrapper and its settings (kind, pooling,
similarity, label index, max length, top-k), a fingerprint of its weights (every tensor of the state dict),
its tokenizer, the training data as the teacher sees it, the device type and the precision. It holds the
task's stacked outputs (ranking: scores [N, n]; classification: logits [N, C]; causal LM: top-k logits,
their token ids and the log-normaliser per position) as one .npy file each, read memory-mapped (a batch costs
memory for its rows, not for the entry), plus meta.json with the key, the description the key was made from, each
file's SHA-256 and shape. An entry whose meta, checksums or shapes do not match is reported and rebuilt, never used.

A task that can run its teacher over a range of examples (ranking: `teacher_outputs_range`) is run chunk by chunk:
each chunk's outputs are written as a shard next to the entry (`<key>.partial/`), so a pass that is killed goes on
from its finished shards when run again, with a progress bar and examples/s; the shards are then copied into the
entry's files. Entries are written to a private staging directory and renamed into place, so concurrent sweep jobs
never read half an entry; one process computes an entry while the others wait for it (a lock file).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from kdrun.store import (cache_root, cached, file_sha256, locked, publish, remove, staging_dir, tokenizer_fingerprint,
                         weights_fingerprint, write_error)

log = logging.getLogger(__name__)
FORMAT = 2  # bump when the layout or the meaning of stored outputs changes (2: .npy files, memory-mapped; shards)


def describe(teacher, data_fingerprint: str, runtime, outputs=None) -> Dict[str, str]:
    """What a teacher's training outputs depend on: the description its cache key is made from (`outputs`: as if
    the loss had asked for these, default what it asked for)."""
    keys = ("pooling", "similarity", "label_index", "max_length", "query_length", "top_k")
    settings = {k: getattr(teacher, k) for k in keys if hasattr(teacher, k)}
    outputs = getattr(teacher, "outputs", None) if outputs is None else outputs
    if outputs:  # what the loss asked for beyond scores (in-batch: the embeddings too, which serve "embeddings")
        settings["outputs"] = sorted({"in_batch_scores" if o == "embeddings" else o for o in outputs})
    return {"format": str(FORMAT), "wrapper": type(teacher).__name__, "source": str(teacher.source),
            "settings": json.dumps(settings, sort_keys=True), "weights": weights_fingerprint(teacher),
            "tokenizer": tokenizer_fingerprint(teacher.tokenizer), "data": data_fingerprint,
            "device": runtime.device.type, "precision": runtime.precision}


def key_of(description: Dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:32]


def read(entry: Path, key: str, description: Dict[str, str], n: int) -> Tuple[Optional[Dict[str, np.ndarray]], str]:
    """(outputs, "") for a sound entry, each output memory-mapped (reading a batch's rows costs memory for those rows,
    not for the entry); (None, why) when it is missing, corrupt or for other inputs."""
    if not entry.exists():
        return None, "missing"
    if not entry.is_dir():
        return None, "not a directory"
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
            return None, "unreadable (meta.json is not kdrun's)"
        if not cached(entry):
            return None, "incomplete (no completion marker)"
        if meta.get("key") != key or meta.get("description") != description:
            return None, "made from other inputs than its key says"
        outputs = {}
        for name, info in meta["files"].items():
            f = entry / f"{name}.npy"
            if file_sha256(f) != info["sha256"]:
                return None, f"{f.name} does not match its checksum"
            outputs[name] = np.load(f, mmap_mode="r")
    except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable meta or arrays
        return None, f"unreadable ({type(e).__name__}: {e})"
    shapes = {k: list(v.shape) for k, v in outputs.items()}
    if shapes != {k: info["shape"] for k, info in meta["files"].items()} or any(v.shape[0] != n for v in outputs.values()):
        return None, f"shapes {shapes} do not fit {n} training examples"
    return outputs, ""


def _save(directory: Path, outputs: Dict[str, "torch.Tensor | np.ndarray"]) -> None:
    for k, v in outputs.items():
        np.save(directory / f"{k}.npy", v.detach().cpu().contiguous().numpy() if isinstance(v, torch.Tensor) else v)


def _publish(tmp: Path, entry: Path, key: str, description: Dict[str, str], seconds: float) -> None:
    files = {}
    for f in sorted(tmp.glob("*.npy")):
        a = np.load(f, mmap_mode="r")
        files[f.stem] = {"sha256": file_sha256(f), "shape": list(a.shape), "dtype": str(a.dtype)}
    meta = {"key": key, "description": description, "files": files, "teacher_seconds": seconds}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    publish(tmp, entry, key)


def write(entry: Path, key: str, description: Dict[str, str], outputs: Dict[str, torch.Tensor], seconds: float) -> None:
    """An entry from outputs held in memory: one .npy file per output (memory-mappable), meta.json with checksums."""
    tmp = staging_dir(entry)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _save(tmp, outputs)
    _publish(tmp, entry, key, description, seconds)


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
    computed_examples: int = 0  # examples the teachers ran over (sharded passes)
    resumed_examples: int = 0  # examples whose outputs an interrupted pass had written already
    cache_seconds: float = 0.0  # fingerprinting, reading and writing entries
    entries: Dict[str, str] = field(default_factory=dict)  # teacher name -> entry directory

    def metrics(self) -> Dict[str, float]:
        out = {"teacher/cache_hits": self.hits, "teacher/cache_misses": self.misses,
               "teacher/cache_rebuilt": self.rebuilt, "teacher/seconds": self.teacher_seconds,
               "teacher/cache_seconds": self.cache_seconds}
        # throughput of a sharded pass (0 where the teacher ran over nothing: a cache hit); every job of a sweep logs
        # the same keys
        out |= {"teacher/computed_examples": self.computed_examples, "teacher/resumed_examples": self.resumed_examples,
                "teacher/examples_per_s": self.computed_examples / self.teacher_seconds if self.computed_examples else 0.0}
        return out


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
    if outputs is None:
        wider = _wider(task, teacher, runtime, cache_dir, n)
        if wider is not None:
            entry, outputs = wider
            info.entries[name] = str(entry)
    if outputs is None and runtime.distributed and hasattr(task, "teacher_outputs_range"):
        info.cache_seconds += time.perf_counter() - t0
        return _for(task, _fill_together(task, teacher, entry, key, description, why, info, name, n, runtime))
    if outputs is None:  # one process computes an entry; parallel sweep jobs that miss it too wait, then read
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # e.g. teacher.cache_dir=/dev/null, or a file where a directory goes
            log.warning("teacher cache: cannot use %s (%s); the teacher runs without the cache (set "
                        "teacher.cache_dir to a writable directory)", entry.parent, write_error(e, entry.parent))
            info.cache_seconds += time.perf_counter() - t0
            return teacher_outputs(task, teacher, runtime, cache_dir, False, info, name)
        with locked(entry):
            outputs, why = read(entry, key, description, n)
            if outputs is None:
                info.cache_seconds += time.perf_counter() - t0
                return _for(task, _fill(task, teacher, entry, key, description, why, info, name, n))
    info.cache_seconds += time.perf_counter() - t0
    info.hits += 1
    log.info("teacher %s: outputs for %d training examples read from the cache (%s)", name, n, entry)
    return _for(task, outputs)


def _wider(task, teacher, runtime, cache_dir: Optional[str], n: int):
    """(entry, its outputs that were asked for) of an entry made for more outputs than this run asks of the teacher
    (a bi-encoder's pass for an in-batch loss keeps its scores beside its embeddings, so the other losses of a sweep
    read them there instead of running the teacher again), or None."""
    more = set(getattr(teacher, "optional_outputs", ()))
    if getattr(teacher, "outputs", None) or not more:  # (asked for scores alone: the only case so far)
        return None
    description = describe(teacher, task.fingerprint(), runtime, outputs=more)
    key = key_of(description)
    entry = Path(cache_dir or cache_root() / "teacher_outputs").expanduser() / task.name / key
    outputs, _ = read(entry, key, description, n)
    if outputs is None:
        return None
    return (entry, {"scores": outputs["scores"]}) if "scores" in outputs else None


def _for(task, outputs: Dict[str, np.ndarray]) -> Dict[str, "np.ndarray | torch.Tensor"]:
    """Memory-mapped arrays for a task that batches rows of them (ranking: `mapped_outputs`), tensors in memory
    otherwise."""
    if getattr(task, "mapped_outputs", False):
        return outputs
    return {k: torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v for k, v in outputs.items()}


def _fill(task, teacher, entry: Path, key: str, description: Dict[str, str], why: str, info: CacheInfo, name: str,
          n: int) -> Dict[str, np.ndarray]:
    if why != "missing":
        log.warning("teacher cache entry %s is %s; rebuilding it", entry, why)
        remove(entry)
        info.rebuilt += 1
    info.misses += 1
    t0 = time.perf_counter()
    tmp = staging_dir(entry)
    if hasattr(task, "teacher_outputs_range"):  # a shard that cannot be written stays in memory
        memory: Dict[Tuple[int, int], Dict[str, np.ndarray]] = {}
        seconds = _shards(task, teacher, entry, n, info, name, memory=memory)
        info.teacher_seconds += seconds
        held = lambda: _gathered(entry, _ranges(task, n), memory)
        if memory:
            return held()
    else:
        computed = task.teacher_outputs(teacher)
        seconds = time.perf_counter() - t0
        info.teacher_seconds += seconds
        held = lambda: {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
                        for k, v in computed.items()}
    t1 = time.perf_counter()
    try:
        if hasattr(task, "teacher_outputs_range"):
            tmp = _assemble(entry, n, _ranges(task, n))
        else:
            remove(tmp)
            tmp.mkdir(parents=True)
            _save(tmp, computed)
        _publish(tmp, entry, key, description, seconds)
    except OSError as e:  # a full disk: the outputs were computed, so training goes on with them, uncached
        remove(tmp)
        log.warning("teacher cache: cannot write the entry %s (%s); training goes on with the outputs in memory, "
                    "not cached", entry, write_error(e, entry.parent))
        return held()
    outputs, why = read(entry, key, description, n)
    if outputs is None:  # (not seen: publish lost the rename to something that is not an entry)
        log.warning("teacher cache: the entry %s was written but does not read back (%s); training goes on with the "
                    "outputs in memory", entry, why)
        outputs = held()
    else:
        log.info("teacher %s: outputs for %d training examples computed in %.1f s and cached (%s)", name, n, seconds,
                 entry)
    shutil.rmtree(_partial(entry), ignore_errors=True)
    info.cache_seconds += time.perf_counter() - t1
    return outputs


def _partial(entry: Path) -> Path:
    """Where a teacher pass keeps its finished shards: named by the entry's key, so a pass killed midway and run
    again (same teacher, same data) goes on from the shards that are there."""
    return entry.with_name(entry.name + ".partial")


def _fill_together(task, teacher, entry: Path, key: str, description: Dict[str, str], why: str, info: CacheInfo,
                   name: str, n: int, runtime) -> Dict[str, np.ndarray]:
    """DDP (torchrun): every rank runs the teacher over its share of the shards (shard i on rank i % world), rank 0
    copies them into the entry and publishes it, and every rank reads it back. The partial shards live next to the
    entry, so the cache directory must be one file system for all ranks (one node, or a shared one)."""
    if runtime.is_main and why != "missing":
        log.warning("teacher cache entry %s is %s; rebuilding it", entry, why)
        remove(entry)
        info.rebuilt += 1
    info.misses += 1
    runtime.barrier()
    seconds = _shards(task, teacher, entry, n, info, name, runtime.rank, runtime.world_size)
    info.teacher_seconds += seconds
    runtime.barrier()  # every shard is written
    if runtime.is_main:
        _publish(_assemble(entry, n, _ranges(task, n)), entry, key, description, seconds)
        shutil.rmtree(_partial(entry), ignore_errors=True)
        log.info("teacher %s: outputs for %d training examples computed by %d ranks and cached (%s)", name, n,
                 runtime.world_size, entry)
    runtime.barrier()  # the entry is published
    outputs, why = read(entry, key, description, n)
    if outputs is None:
        raise RuntimeError(f"teacher cache entry {entry} was written but does not read back: {why}")
    return outputs


def _ranges(task, n: int):
    chunk = max(1, int(getattr(task, "teacher_chunk", 50_000)))
    return [(start, min(start + chunk, n)) for start in range(0, n, chunk)]


def _shards(task, teacher, entry: Path, n: int, info: CacheInfo, name: str, rank: int = 0, world: int = 1,
            memory: Optional[Dict] = None) -> float:
    """The teacher over the training data `task.teacher_chunk` examples at a time (this rank's shards: every world-th
    from its rank), each chunk's outputs written as a shard, renamed into place when whole; shards already there (a
    pass that was killed) are kept. A shard that cannot be written (a full disk) goes into `memory` when given (else
    the error is raised). Returns the seconds spent in the teacher."""
    from kdrun import progress

    partial = _partial(entry)
    try:
        partial.mkdir(parents=True, exist_ok=True)
    except OSError:
        if memory is None:
            raise  # (with memory: each shard's write fails in turn and is kept in memory)
    ranges = _ranges(task, n)[rank::world]
    done = {r for r in ranges if _sound_shard(partial / f"{r[0]:012d}-{r[1]:012d}")}
    if done:
        info.resumed_examples += sum(b - a for a, b in done)
        log.info("teacher %s: %d of %d shards of an interrupted pass are reused (%s)", name, len(done), len(ranges),
                 partial)
    seconds = 0.0
    bar = progress.bar(total=sum(b - a for a, b in ranges), initial=sum(b - a for a, b in done), desc=f"teacher {name}",
                       unit="ex", show=rank == 0)
    for start, stop in ranges:
        if (start, stop) in done:
            continue
        t0 = time.perf_counter()
        outputs = task.teacher_outputs_range(teacher, start, stop)
        seconds += time.perf_counter() - t0
        info.computed_examples += stop - start
        shard = partial / f"{start:012d}-{stop:012d}"
        tmp = shard.with_name(shard.name + f".tmp{os.getpid()}")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            _save(tmp, outputs)
            (tmp / "sha256.json").write_text(json.dumps({f.name: file_sha256(f) for f in sorted(tmp.glob("*.npy"))}))
            tmp.rename(shard)  # a shard is there whole or not at all
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if memory is None:
                raise
            if not memory:
                log.warning("teacher cache: cannot write to %s (%s); the teacher's outputs stay in memory and are "
                            "not cached", partial, write_error(e, partial))
            memory[(start, stop)] = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
                                     for k, v in outputs.items()}
        bar.update(stop - start)
    bar.close()
    return seconds


def _sound_shard(shard: Path) -> bool:
    """Whether a finished shard of an interrupted pass can be reused: every file there and matching the checksums
    written with it. A damaged one is removed with a warning (and computed again)."""
    if not shard.exists():
        return False
    try:
        sums = json.loads((shard / "sha256.json").read_text())
        if isinstance(sums, dict) and sums and all(file_sha256(shard / name) == h for name, h in sums.items()):
            return True
        why = "not matching its checksums"
    except (OSError, ValueError) as e:
        why = f"unreadable ({type(e).__name__})"
    log.warning("teacher cache: the shard %s of an interrupted pass is %s; computing it again", shard, why)
    remove(shard)
    return False


def _gathered(entry: Path, ranges, memory: Dict) -> Dict[str, np.ndarray]:
    """The outputs of every range, in order, from the shards written or the chunks held in memory."""
    partial = _partial(entry)
    chunks = [memory.get(r) or {f.stem: np.load(f) for f in (partial / f"{r[0]:012d}-{r[1]:012d}").glob("*.npy")}
              for r in ranges]
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _assemble(entry: Path, n: int, ranges) -> Path:
    """The shards copied, slice by slice, into one memory-mapped .npy per output in a staging dir (returned)."""
    partial = _partial(entry)
    out = staging_dir(entry)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    first = partial / f"{ranges[0][0]:012d}-{ranges[0][1]:012d}"
    for f in sorted(first.glob("*.npy")):
        head = np.load(f, mmap_mode="r")
        whole = np.lib.format.open_memmap(out / f.name, mode="w+", dtype=head.dtype, shape=(n, *head.shape[1:]))
        for start, stop in ranges:
            whole[start:stop] = np.load(partial / f"{start:012d}-{stop:012d}" / f.name, mmap_mode="r")
        whole.flush()
        del whole
    return out
