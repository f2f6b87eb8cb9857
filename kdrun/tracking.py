"""MLflow: one run per job with the flattened resolved config as params, tags, metrics and artifacts.

With no `tracking.uri` and no MLFLOW_TRACKING_URI, MLflow's own default local store in the working
directory is used (no server needed); `make ui` browses the same store.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

from kdrun.errors import KdrunError
from kdrun.secrets import redact, redact_arg, redact_text

log = logging.getLogger(__name__)
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


def flatten(tree: Any, prefix: str = "") -> Dict[str, str]:
    """{"a": {"b": 1, "c": [1, 2]}} -> {"a.b": "1", "a.c": "[1, 2]"}; None -> "null"."""
    out: Dict[str, str] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    value = tree if isinstance(tree, str) else json.dumps(tree)
    out[key] = value[:_MAX_PARAM_CHARS]
    return out


def git_commit() -> Optional[str]:
    """Commit of the kdrun source tree in use (with '-dirty' when it has uncommitted changes)."""
    src = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def retry_locked(fn, *args, tries: int = 8, **kwargs):
    """fn(*args) again after a pause while SQLite reports "database is locked": parallel sweep jobs (joblib
    workers) write to one local store, and SQLite lets one writer in at a time. Other errors raise at once."""
    for attempt in range(tries):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # MLflow wraps sqlite3.OperationalError in its own exception types
            if "database is locked" not in str(e) or attempt == tries - 1:
                raise
            log.info("tracking store busy (database is locked); retrying in %.1f s", 0.25 * 2 ** attempt)
            time.sleep(0.25 * 2 ** attempt)


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    """A tracking server that does not accept a TCP connection fails at once, with the URI (redacted) and the fix."""
    from urllib.parse import urlparse

    url = urlparse(uri)
    if url.scheme not in ("http", "https") or not url.hostname:
        return
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise KdrunError(f"MLflow tracking server '{redact_text(uri)}' cannot be reached ({e.strerror or e}). Start it "
                         "(`make server`), check tracking.uri / MLFLOW_TRACKING_URI, or drop tracking.uri to log to "
                         "the local store in this directory") from None


def command_line() -> str:
    """This process's kdrun command, with credentials redacted (for the kdrun.command tag)."""
    return " ".join(["kdrun", *(redact_arg(a) for a in sys.argv[1:])])


class Tracker:
    """A thin wrapper over MLflow's fluent API; everything logged goes to one active run."""

    def __init__(self, uri: Optional[str], experiment: str):
        import mlflow

        self.mlflow = mlflow
        if uri:
            mlflow.set_tracking_uri(uri)
        self.uri = mlflow.get_tracking_uri()
        _check_reachable(self.uri)  # seconds, not MLflow's minutes of HTTP retries
        try:
            self.experiment_id = mlflow.set_experiment(experiment).experiment_id
        except Exception as e:  # the store is unreachable or unusable: say so before any training
            raise KdrunError(f"MLflow tracking store '{redact_text(self.uri)}' is not usable: "
                             f"{redact_text(str(e).splitlines()[0])}. "
                             "Check tracking.uri / MLFLOW_TRACKING_URI") from e
        self.run_id: Optional[str] = None

    def start(self, run_name: Optional[str], params: Dict[str, str], tags: Dict[str, str],
              parent_run_id: Optional[str] = None) -> str:
        """A new run (a child of `parent_run_id`: a sweep job)."""
        tags = redact({k: str(v) for k, v in tags.items()})
        if parent_run_id:
            tags = {**tags, "mlflow.parentRunId": parent_run_id}
        run = retry_locked(self.mlflow.start_run, experiment_id=self.experiment_id,
                           run_name=redact_text(run_name) if run_name else run_name, tags=tags)
        self.run_id = run.info.run_id
        params = redact({k: str(v) for k, v in params.items()})
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            retry_locked(self.mlflow.log_params, dict(items[i:i + 100]))
        commit = git_commit()
        retry_locked(self.mlflow.set_tags, {
            "kdrun.command": command_line(),
            "kdrun.host": socket.gethostname(), "kdrun.job_pid": str(os.getpid()),
            **({"kdrun.rerun_of": os.environ["KDRUN_RERUN_OF"]} if os.environ.get("KDRUN_RERUN_OF") else {}),
            **({"mlflow.source.git.commit": commit, "kdrun.git_commit": commit} if commit else {}),
            **tags,
        })
        return self.run_id

    def metrics(self, values: Dict[str, float], step: int) -> None:
        retry_locked(self.mlflow.log_metrics, {k: float(v) for k, v in values.items()}, step=step)

    def text(self, text: str, artifact_file: str) -> None:
        retry_locked(self.mlflow.log_text, text, artifact_file)

    def tags(self, tags: Dict[str, str]) -> None:
        if self.mlflow.active_run() is not None:
            retry_locked(self.mlflow.set_tags, redact({k: str(v) for k, v in tags.items()}))

    def artifacts(self, local_dir: str, artifact_path: str) -> None:
        retry_locked(self.mlflow.log_artifacts, local_dir, artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self.mlflow.active_run() is not None:
            retry_locked(self.mlflow.end_run, status=status)

    def run_url(self) -> str:
        uri = redact_text(self.uri)
        if uri.startswith("http"):
            return f"{uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"run {self.run_id} in {uri} (browse with `make ui`)"


class NullTracker:
    """What DDP ranks other than 0 log: nothing (rank 0 logs the run)."""
    run_id = None

    def start(self, *args, **kwargs) -> None:
        return None

    def metrics(self, *args, **kwargs) -> None:
        pass

    text = artifacts = end = tags = metrics

    def run_url(self) -> str:
        return "(logged by rank 0)"


def summary_table(rows: Iterable[tuple], header: tuple) -> str:
    """A small aligned text table for the console."""
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), line("-" * w for w in widths), *(line(r) for r in rows)])
