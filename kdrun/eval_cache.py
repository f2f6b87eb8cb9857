"""Held-out evaluations of unchanged models, computed once: a sweep of 30 runs over one teacher evaluates it once,
and the student before training once per starting point.

The key hashes what an evaluation's result depends on: the model's class, settings and every weight, its tokenizer,
the held-out data as the task digests it (`task.eval_digest()`: queries, candidates, judgments, depth), the device,
precision and evaluation batch size. An entry holds the metrics, the time per held-out example measured when it was
computed, and what the task keeps of a reported evaluation (`task.eval_state(who)`: ranking's run, for the TREC
files), so a hit leaves the run with the same metrics and artifacts as a miss. Only families whose task has
`eval_digest` are cached (ranking); entries live under $KDRUN_CACHE/evals (train.eval_cache=false: never read or
written). The model's weights are hashed on each lookup (about 0.1 s for MiniLM).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional

log = logging.getLogger(__name__)
FORMAT = 1  # bump when an entry's layout or a metric's definition changes


def key_of(task, model, runtime, batch_size: int) -> Optional[str]:
    """The entry's key, or None where the task cannot be cached (no eval_digest)."""
    if not hasattr(task, "eval_digest"):
        return None
    from kdrun.store import tokenizer_fingerprint, weights_fingerprint

    members = dict(model.members) if hasattr(model, "members") else {"": model}
    keys = ("pooling", "similarity", "label_index", "max_length", "query_length", "exact")
    settings = {name: {k: getattr(m, k) for k in keys if hasattr(m, k)}
                | {"wrapper": type(m).__name__, "tokenizer": tokenizer_fingerprint(m.tokenizer)}
                for name, m in members.items()}
    description = {"format": FORMAT, "family": task.name, "models": settings,
                   "weights": weights_fingerprint(model), "ensemble": getattr(model, "weights", None),
                   "eval": task.eval_digest(), "device": runtime.device.type, "precision": runtime.precision,
                   "batch_size": batch_size}
    variant = task.eval_variant() if hasattr(task, "eval_variant") else ""
    if variant:  # (e.g. ranking's asymmetric evaluation; absent otherwise, so other keys stay as they were)
        description["variant"] = variant
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _path(key: str) -> Path:
    from kdrun.store import cache_root

    return cache_root() / "evals" / f"{key}.json"


def load(key: str) -> Optional[Dict[str, Any]]:
    """{"metrics", "ms_per_example", "state"} of a cached evaluation, or None (absent or unreadable)."""
    path = _path(key)
    try:
        entry = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("evaluation cache: %s is unreadable (%s); evaluating again", path, e)
        return None
    return entry if {"metrics", "ms_per_example", "state"} <= set(entry) else None


def store(key: str, metrics: Dict[str, float], ms_per_example: float, state: Any) -> None:
    """Write an entry whole (a temporary file renamed into place: a reader never sees half of one)."""
    import os

    path = _path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"metrics": metrics, "ms_per_example": ms_per_example, "state": state}))
        tmp.replace(path)
    except OSError as e:  # a full or read-only cache costs the next run an evaluation, nothing more
        log.warning("evaluation cache: cannot write %s (%s)", path, e)
