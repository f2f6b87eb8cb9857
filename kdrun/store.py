"""Content-addressed caches on disk, from below: where kdrun's cache lives, an entry written in a staging directory
and published by one rename (complete or absent, never half), an exclusive lock per entry, a file's digest, and a
failed write told in a few words. The teacher-output cache, the token and column caches, tiny and de-quantised
models, the evaluation cache and checkpoints use these; of kdrun it imports only the errors."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

from kdrun.errors import ModelLoadError

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """kdrun's own cache (fine-tuned teachers, converted GGUF models): $KDRUN_CACHE or ~/.cache/kdrun."""
    return Path(os.environ.get("KDRUN_CACHE") or "~/.cache/kdrun").expanduser()


def cached(out: Path) -> bool:
    """Whether a cache entry was completely written (see `publish`)."""
    return (out / "kdrun_complete").is_file()


def built_by_rank_0(out: Path, timeout: float = 1800.0) -> bool:
    """Under torchrun, a model entry is written by rank 0 alone: once the process group is up, transformers'
    save_pretrained writes weights and config on rank 0 only, so another rank's copy would be a tokenizer and nothing
    else. True where this process is another rank and rank 0 has published `out` (waited for here)."""
    rank = int(os.environ.get("RANK", "0") or 0)
    if rank == 0:
        return False
    deadline = time.monotonic() + timeout
    while not cached(out):
        if time.monotonic() > deadline:
            raise ModelLoadError(f"rank {rank}: waited {timeout:.0f} s for rank 0 to write {out}")
        time.sleep(0.2)
    return True


def staging_dir(out: Path) -> Path:
    """Where to write a cache entry before `publish` moves it to `out` (private to this process)."""
    return out.with_name(out.name + f".tmp{os.getpid()}")


def publish(tmp: Path, out: Path, note: str) -> None:
    """Mark a filled staging directory complete and rename it to `out` in one step, so a reader never sees
    half an entry; when another process (a sweep job) published first, its copy is kept."""
    (tmp / "kdrun_complete").write_text(note)
    try:
        tmp.rename(out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks (cache entries, checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_fingerprint(module) -> str:
    """SHA-256 over every parameter and buffer of a torch module: name, dtype, shape and bytes."""
    import torch

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
        text = _canonical_definition(backend.to_str())
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([type(tokenizer).__name__, tokenizer.all_special_tokens], sort_keys=True)
    return hashlib.sha256((text + extra).encode()).hexdigest()


@functools.lru_cache(maxsize=16)
def _canonical_definition(serialised: str) -> str:
    """A fast tokenizer's definition as sorted JSON, without its truncation and padding. Kept per serialised form:
    parsing and re-sorting a 30k-50k-token vocabulary took 0.17 s, and a run asks for it six times."""
    definition = json.loads(serialised)
    definition.pop("truncation", None)
    definition.pop("padding", None)
    return json.dumps(definition, sort_keys=True)


@contextlib.contextmanager
def locked(entry: Path):
    """An exclusive lock file next to a cache entry (the teacher cache's, a token-cache file) (POSIX flock; where there
    is none, no lock: still correct, as entries are published by rename, but parallel jobs may compute the same one)."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock = entry.with_name(entry.name + ".lock")
    try:
        if lock.is_dir() and not lock.is_symlink():  # not kdrun's: a lock file goes there
            log.warning("cache: %s is a directory where the lock file goes; removing it", lock)
            shutil.rmtree(lock)
        f = open(lock, "w")
    except OSError as e:
        log.warning("cache: cannot open the lock file %s (%s); going on without it (parallel jobs may "
                    "compute the same entry)", lock, write_error(e, lock.parent))
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove(path: Path) -> None:
    """A cache path gone, whatever it is (a directory, or a file someone put where an entry goes)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def write_error(e: BaseException, where: Optional[Path] = None) -> str:
    """A write failure in a few words: the OS's reason where the library's text carries one; torch.save's ("unexpected
    pos 576 vs 534") carries none, so a nearly full file system at `where` is named as the likely one."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    if "StorageFull" in text or "No space left" in text or "os error 28" in text:
        return "No space left on device"
    if "QuotaExceeded" in text or "os error 122" in text:
        return "Disk quota exceeded"
    reason = text.splitlines()[0][:200] if text else type(e).__name__
    try:
        free = shutil.disk_usage(next(p for p in (where, *(where.parents if where else ())) if p and p.exists())).free
    except (OSError, StopIteration):
        return reason
    return f"No space left on device ({free / 2**20:.1f} MiB free; {reason})" if free < 64 * 2**20 else reason
