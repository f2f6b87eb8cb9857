"""Teachers that kdrun fine-tunes before distilling from them, cached by content.

No fine-tuned teacher for the offline data ships with any package, so kdrun makes one from a base encoder: a task
family (classification: a classifier head; ranking: a cross-encoder or a bi-encoder) trains it on the task's training
split through the same loop the students train in (kdrun/train.py). The result is stored under
`teacher.finetune.cache_dir/<key>`, where the key hashes the base weights and tokenizer files, the training data (as
the family digests it: never the held-out split), every fine-tuning setting and the device type and precision it
trains in (a bf16 fine-tune is another teacher than an fp32 one): a sweep over student settings
fine-tunes once, and any change retrains. Loading the directory back is the family's (a teacher of its kind).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

log = logging.getLogger(__name__)
_VERSION = "3"  # bump when a fine-tuning procedure changes (2: ranking teachers; 3: device and precision in the key)


def source_digest(source: str) -> str:
    """SHA-256 of a local model directory's weights, config and tokenizer files (a hub name: the name itself)."""
    h = hashlib.sha256()
    src = Path(source)
    if not src.is_dir():
        h.update(f"hub:{source}".encode())
        return h.hexdigest()
    for f in sorted(src.rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".txt", ".model"):
            h.update(f.relative_to(src).as_posix().encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def key_of(family: str, source: str, data_digest: str, settings: Dict) -> str:
    h = hashlib.sha256(f"kdrun-finetune-{_VERSION}|{family}|{json.dumps(settings, sort_keys=True)}".encode())
    h.update(source_digest(source).encode())
    h.update(data_digest.encode())
    return h.hexdigest()[:20]


def cached(family: str, source: str, data_digest: str, settings: Dict, cache_dir: Optional[str],
           train: Callable[[], Tuple[object, Dict[str, float]]], what: str, runtime) -> Tuple[str, Dict[str, float]]:
    """(directory of the fine-tuned teacher, its metrics): `train()` -> (model with .save(dir), metrics) runs on a
    cache miss only; it trains on `runtime`'s device and precision, which the key holds. Metrics: teacher/finetune_cache_hit, teacher/finetune_seconds and the training's own (its
    first and last loss), which a cache hit reads back from the entry."""
    from kdrun.store import cache_root
    from kdrun.store import cached as is_cached
    from kdrun.store import locked

    root = Path(cache_dir).expanduser() if cache_dir else cache_root() / "teachers"
    settings = {**settings, "device": runtime.device.type, "precision": runtime.precision}
    out = root / key_of(family, source, data_digest, settings)
    if not is_cached(out):
        with locked(out):  # parallel sweep jobs that miss the entry: one fine-tunes, the others wait and read it
            if not is_cached(out):
                return _train_and_publish(family, source, settings, out, train, what)
    log.info("teacher: fine-tuned %s from the cache: %s", what, out)
    saved = _read_info(out)
    return str(out), {**saved.get("metrics", {}), "teacher/finetune_cache_hit": 1.0, "teacher/finetune_seconds": 0.0}


def _train_and_publish(family: str, source: str, settings: Dict, out: Path, train, what: str):
    from kdrun.store import publish, staging_dir

    t0 = time.perf_counter()
    log.info("teacher: fine-tuning %s from %s for %d steps (cached afterwards in %s)", what, source,
             settings.get("steps", 0), out)
    model, metrics = train()
    seconds = time.perf_counter() - t0
    tmp = staging_dir(out)
    model.save(tmp)
    publish(tmp, out, json.dumps({"family": family, "source": source, **settings, "seconds": seconds,
                                  "metrics": metrics}))
    return str(out), {**metrics, "teacher/finetune_cache_hit": 0.0, "teacher/finetune_seconds": seconds}


def _read_info(entry: Path) -> Dict:
    """What `publish` wrote into the entry's completion mark (its settings and the training's metrics)."""
    try:
        return json.loads((entry / "kdrun_complete").read_text())
    except (OSError, ValueError):
        return {}
