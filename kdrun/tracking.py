"""MLflow: one run per job with the flattened resolved config as params, tags, metrics and artifacts.

With no `tracking.uri` and no MLFLOW_TRACKING_URI, MLflow's own default local store in the working
directory is used (no server needed); `make ui` browses the same store.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

from kdrun import tags as T
from kdrun.errors import KdrunError
from kdrun.secrets import redact, redact_arg, redact_text
from kdrun.signals import deferred_signals
from kdrun.tags import mark_model_training, runs_url

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
    workers) write to one local store, and SQLite lets one writer in at a time. Other errors raise at once. Each try
    runs whole: SIGTERM/SIGINT are handled when it returns (see Uninterrupted)."""
    for attempt in range(tries):
        try:
            with deferred_signals():
                return fn(*args, **kwargs)
        except Exception as e:  # MLflow wraps sqlite3.OperationalError in its own exception types
            if "database is locked" not in str(e) or attempt == tries - 1:
                raise
            log.info("tracking store busy (%s); retrying in %.1f s", str(e).splitlines()[0][:120], 0.25 * 2 ** attempt)
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


def _store_lock(uri: str):
    """A file lock beside a local SQLite store while it is first opened: MLflow creates and migrates a new store's
    tables on first use, and two processes doing that at once fail ("table already exists", "duplicate column")."""
    import contextlib

    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    db = Path(uri[len("sqlite:///"):].split("?")[0])
    return FileLock(str(db) + ".lock") if db.parent.is_dir() else contextlib.nullcontext()


def command_line() -> str:
    """This process's kdrun command, with credentials redacted (for the kdrun.command tag)."""
    return " ".join(["kdrun", *(redact_arg(a) for a in sys.argv[1:])])


LOCAL_STORE = "sqlite:///mlflow.db"  # MLflow's default store in the working directory (what `make ui` browses)
_RETRY_SECONDS = 30.0  # while the store is down, a new attempt at most this often (a 1 s probe first)


def _http_quick_fail() -> None:
    """MLflow retries a failed HTTP request 7 times with exponential backoff (minutes); kdrun buffers and retries
    metrics itself, so its requests give up after ~3 s (unless the environment sets these already)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


class Uninterrupted:
    """An MLflow client whose calls run whole: SIGTERM/SIGINT during a call are handled when it returns (a Stopped
    raised inside SQLAlchemy can leave a SQLite transaction open, and the store locked for every process; see
    signals.deferred_signals). Anything else is the client's own."""

    def __init__(self, client: Any):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        if name == "_client":  # (not set yet: a copy or an unpickling asks before __init__ has run)
            raise AttributeError(name)
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            with deferred_signals():
                return attr(*args, **kwargs)

        return call


@dataclass
class Store:
    """An open tracking store: its URI (after any fallback), a client, and the experiment asked for."""
    uri: str
    client: Any
    experiment_id: Optional[str] = None


def open_store(uri: Optional[str], experiment: Optional[str] = None, fallback: str = "none") -> Store:
    """The one way into the tracking store, for runs, sweep parents, kdrun-report, kdrun-rerun and kdrun-ui: `uri`,
    else MLFLOW_TRACKING_URI, else MLflow's local store in the working directory. A server that does not accept
    connections fails in seconds (MLflow's own HTTP retries take minutes); with fallback=local the local store is
    used instead, and the log says so. With `experiment`: that experiment, created if need be (a new SQLite store
    under a file lock) and marked as a model-training one."""
    import os

    import mlflow

    # MLFLOW_TRACKING_URI before mlflow.get_tracking_uri(): a Tracker sets MLflow's process-wide URI for its fluent
    # calls, so an earlier run in this process (pipeline.run twice, a notebook) would otherwise pull the next one
    # into its store whatever the environment now says
    resolved = absolute(uri or os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri())
    if resolved.startswith("http"):
        _http_quick_fail()
    try:
        _check_reachable(resolved)
        return _connect(resolved, experiment)
    except KdrunError as e:
        if fallback != "local":
            raise
        log.warning("%s. tracking.fallback=local: logging to the local store %s in %s instead (browse with "
                    "`make ui`)", e, LOCAL_STORE, Path.cwd())
        return _connect(absolute(LOCAL_STORE), experiment)


def absolute(uri: str) -> str:
    """A SQLite store named relative to the working directory (MLflow's default, `sqlite:///mlflow.db`) named by its
    absolute path: MLflow keeps one store object per URI for the life of the process, so a relative one would go on
    writing to the first directory's file after the working directory changed (a notebook, a second run in-process)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/") and ":memory:" not in uri:
        return prefix + str(Path.cwd() / uri[len(prefix):])
    return uri


def _connect(uri: str, name: Optional[str]) -> Store:
    """A client of the store and the id of experiment `name` (created if need be). The first client of a new SQLite
    store creates and migrates its tables, so it is made under the store's file lock: two processes doing that at
    once fail (parallel sweep jobs, a test's two runs)."""
    from mlflow import MlflowClient

    try:
        with _store_lock(uri):
            client = Uninterrupted(MlflowClient(uri))
            if name is None:
                return Store(uri, client)
            found = retry_locked(client.get_experiment_by_name, name)
            if found is None:
                try:
                    return Store(uri, client, retry_locked(client.create_experiment, name,
                                                           tags={T.KIND: T.MODEL_TRAINING}))
                except Exception:  # another job created it first (a server: no file lock across machines)
                    found = retry_locked(client.get_experiment_by_name, name)
                    if found is None:
                        raise
            # MLflow 3's UI opens a model-training experiment on its runs table (else on its GenAI pages)
            retry_locked(mark_model_training, client, found)
            return Store(uri, client, found.experiment_id)
    except Exception as e:  # the store is unreachable or unusable: say so before any training
        raise KdrunError(f"MLflow tracking store '{redact_text(uri)}' is not usable: "
                         f"{redact_text(str(e).splitlines()[0])}. "
                         "Check tracking.uri / MLFLOW_TRACKING_URI, or set tracking.fallback=local") from e


class Tracker:
    """One MLflow run. Metrics are buffered while the store cannot be reached and sent when it can again; what
    could never be sent ends in `<output_dir>/mlflow-unsent.jsonl` (named in the log; `kdrun-replay FILE` sends
    it later). Nothing is dropped silently."""

    def __init__(self, uri: Optional[str], experiment: str, fallback: str = "none", output_dir: str = ".",
                 system_metrics: bool = False):
        import mlflow

        self.mlflow = mlflow
        store = open_store(uri, experiment, fallback)
        mlflow.set_tracking_uri(store.uri)  # the fluent API (start_run, log_params) logs there too
        self.uri, self.client, self.experiment_id = store.uri, store.client, store.experiment_id
        self.run_id: Optional[str] = None
        self.held: Dict[str, int] = {}  # a resumed run: per metric key, the last step the store holds already
        self.pending: list = []  # (key, value, timestamp ms, step) not yet sent
        self.unsent: list = []  # other calls that failed (tags, artifacts, the final status)
        self.down_since: Optional[float] = None
        self.last_try = 0.0
        self.unsent_file = Path(output_dir) / "mlflow-unsent.jsonl"
        self.system_metrics = system_metrics  # MLflow samples them every 10 s in a thread while the run is active

    def start(self, run_name: Optional[str], params: Dict[str, str], tags: Dict[str, str],
              parent_run_id: Optional[str] = None) -> str:
        """A new run (a child of `parent_run_id`: a sweep job)."""
        tags = redact({k: str(v) for k, v in tags.items()})
        if parent_run_id:
            tags = {**tags, "mlflow.parentRunId": parent_run_id}
        run = retry_locked(self.mlflow.start_run, experiment_id=self.experiment_id,
                           run_name=redact_text(run_name) if run_name else run_name, tags=tags,
                           log_system_metrics=self.system_metrics)
        self.run_id = run.info.run_id
        params = redact({k: str(v) for k, v in params.items()})
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            retry_locked(self.mlflow.log_params, dict(items[i:i + 100]))
        commit = git_commit()
        retry_locked(self.mlflow.set_tags, {
            T.COMMAND: command_line(),
            T.HOST: socket.gethostname(), T.JOB_PID: str(os.getpid()),
            **({T.RERUN_OF: os.environ["KDRUN_RERUN_OF"]} if os.environ.get("KDRUN_RERUN_OF") else {}),
            **({"mlflow.source.git.commit": commit, T.GIT_COMMIT: commit} if commit else {}),
            **tags,
        })
        return self.run_id

    def resume(self, run_id: str, step: int) -> str:
        """Continue run `run_id` (a checkpoint's): it is RUNNING again, and metrics at steps it already holds are not
        sent twice."""
        try:
            run = self.client.get_run(run_id)
        except Exception:
            raise KdrunError(f"resume: the checkpoint's MLflow run {run_id} is not in the store "
                             f"'{redact_text(self.uri)}': set tracking.uri to the store that run was logged to") from None
        retry_locked(self.mlflow.start_run, run_id=run_id, log_system_metrics=self.system_metrics)
        self.run_id = run_id
        # per key: a run killed between two logging calls of one step (after its training metrics, before its
        # evaluation) holds some keys at that step and not others; those others are logged when the step is redone
        self.held = {k: max((m.step for m in self.client.get_metric_history(run_id, k)), default=-1)
                     for k in run.data.metrics}
        for stale in (T.FAILURE, T.CHECKPOINT_ERROR):  # from before the interruption: not this run's end
            if stale in run.data.tags:
                with contextlib.suppress(Exception):  # (the run's end status says the rest)
                    retry_locked(self.client.delete_tag, run_id, stale)
        resumes = int(run.data.tags.get(T.RESUMES, "0")) + 1
        self.tags({T.RESUMES: resumes, f"{T.RESUME}{resumes}": f"step {step}: {command_line()}"})
        return run_id

    def close_stale(self, run_id: str, successor: str) -> None:
        """A run of this output dir that died before its first checkpoint (SIGKILL, power loss) stays RUNNING; a
        new start in the same dir ends it KILLED and links the two."""
        try:
            run = self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - another store, or deleted: nothing to close
            return
        if run.info.status == "RUNNING":
            self.client.set_tag(run_id, T.SUPERSEDED_BY, successor)
            self.client.set_terminated(run_id, "KILLED")
            log.warning("MLflow run %s of this output dir was left RUNNING (killed before its first checkpoint); "
                        "marked KILLED, superseded by run %s", run_id, successor)

    def logged(self, prefix: str, step: int) -> Dict[str, float]:
        """The run's metrics named prefix* at `step`, without the prefix (a resumed run's evaluation before training)."""
        run = self.client.get_run(self.run_id)
        out = {}
        for key in run.data.metrics:
            if key.startswith(prefix):
                values = [m.value for m in self.client.get_metric_history(self.run_id, key) if m.step == step]
                if values:
                    out[key[len(prefix):]] = values[-1]
        return out

    def metrics(self, values: Dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.pending += [(k, float(v), now, step) for k, v in values.items() if step > self.held.get(k, -1)]
        self._flush()

    def _flush(self, final: bool = False) -> bool:
        """Send what is pending; True when nothing is left. While the store is down, a new try at most every 30 s
        (and at the end), after a quick TCP probe of a server, so that training never waits on it for long."""
        from mlflow.entities import Metric

        if not self.pending:
            return True
        if self.down_since is not None and not final and time.time() - self.last_try < _RETRY_SECONDS:
            return False
        self.last_try = time.time()
        try:
            if self.down_since is not None:
                _check_reachable(self.uri, timeout=1.0)
            while self.pending:
                chunk = self.pending[:1000]  # MLflow's limit per batch
                retry_locked(self.client.log_batch, self.run_id, metrics=[Metric(*m) for m in chunk])
                del self.pending[:len(chunk)]
        except Exception as e:
            if self.down_since is None:
                self.down_since = time.time()
                log.warning("MLflow store '%s' cannot be reached (%s): training goes on; metrics are buffered and "
                            "retried every %d s", redact_text(self.uri), redact_text(str(e).splitlines()[0][:300]),
                            _RETRY_SECONDS)
            return False
        if self.down_since is not None:
            log.warning("MLflow store reachable again after %.0f s: buffered metrics sent",
                        time.time() - self.down_since)
            self.down_since = None
        return True

    def _call(self, what: Dict, fn, *args, **kwargs) -> None:
        """An MLflow call other than metrics; if it fails for want of the store, it is kept for the unsent file."""
        try:
            if self.down_since is not None:
                _check_reachable(self.uri, timeout=1.0)
            retry_locked(fn, *args, **kwargs)
        except Exception as e:
            log.warning("MLflow call failed (%s): kept for %s", redact_text(str(e).splitlines()[0][:300]),
                        self.unsent_file)
            self.unsent.append(what)

    def text(self, text: str, artifact_file: str) -> None:
        self._call({"text": text, "artifact_file": artifact_file}, self.mlflow.log_text, text, artifact_file)

    def tags(self, tags: Dict[str, str]) -> None:
        if self.run_id is not None:
            from mlflow.entities import RunTag

            tags = redact({k: str(v) for k, v in tags.items()})
            self._call({"tags": tags}, self.client.log_batch, self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def artifacts(self, local_dir: str, artifact_path: str) -> None:
        self._call({"artifacts": str(Path(local_dir).resolve()), "artifact_path": artifact_path},
                   self.mlflow.log_artifacts, local_dir, artifact_path)

    def datasets(self, rows: list) -> None:
        """The run's data as MLflow dataset inputs: each {name, digest (kdrun's content fingerprint), source, rows,
        context: training | evaluation}. MLflow keeps 36 characters of a digest: the fingerprint's first 32 hex."""
        if self.run_id is not None:
            self._call({"datasets": rows}, self.client.log_inputs, self.run_id, datasets=_dataset_inputs(rows))

    def model(self, directory: str, examples: list, step: int, register_as: Optional[str] = None) -> Optional[str]:
        """The saved student as the run's MLflow logged model at `step` (kdrun.logged_model), registered as
        `register_as` when set; its model id, or None when the store could not take it (kept for kdrun-replay)."""
        from kdrun import logged_model

        self._flush(final=True)  # MLflow links the metrics the run holds at `step` to the model: send them first
        what = {"model": str(Path(directory).resolve()), "examples": examples, "step": step, "register_as": register_as}
        try:
            if self.down_since is not None:
                _check_reachable(self.uri, timeout=1.0)
            # runs whole on a store in this process's database (SQLite, ...): a SIGTERM raised inside MLflow's
            # SQLAlchemy calls broke its identity map and left a transaction open, the store locked for the next
            # process (found by the fault suite); over HTTP the server holds the transaction: handled at once
            remote = self.uri.startswith(("http:", "https:", "databricks"))
            with contextlib.nullcontext() if remote else deferred_signals():
                info = logged_model.log(directory, examples=examples, step=step, register_as=register_as)
        except Exception as e:  # noqa: BLE001 - the store (or its registry) refused: the files are on disk
            log.warning("could not log the student as an MLflow model (%s): kept for %s",
                        redact_text(str(e).splitlines()[0][:300]), self.unsent_file)
            self.unsent.append(what)
            return None
        version = f", registered as {register_as} version {info.registered_model_version}" if register_as else ""
        log.info("student logged as MLflow model %s (%s)%s", info.model_id, info.model_uri, version)
        return info.model_id

    def end(self, status: str = "FINISHED") -> None:
        """Flush, then end the run; anything that could not be sent goes to the unsent file, named in the log."""
        if self.mlflow.active_run() is None:
            return
        self._flush(final=True)
        self._call({"status": status}, self.mlflow.end_run, status=status)
        if self.pending or self.unsent:
            rows = [{"run_id": self.run_id, "key": k, "value": v, "timestamp": t, "step": st}
                    for k, v, t, st in self.pending] + [{"run_id": self.run_id, **u} for u in self.unsent]
            with open(self.unsent_file, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            log.error("MLflow store '%s' could not take %d metric values and %d other records of run %s; they are in "
                      "%s: send them with `kdrun-replay %s` once it is back", redact_text(self.uri), len(self.pending),
                      len(self.unsent), self.run_id, self.unsent_file, self.unsent_file)
            self.pending, self.unsent = [], []

    def run_url(self) -> str:
        uri = redact_text(self.uri)
        if uri.startswith("http"):
            return runs_url(uri, self.experiment_id, self.run_id)
        return (f"run {self.run_id} in {uri}; browse with `make ui` (or `kdrun-ui`): "
                f"{runs_url('http://127.0.0.1:5000', self.experiment_id, self.run_id)}")


class NullTracker:
    """What DDP ranks other than 0 log: nothing (rank 0 logs the run)."""
    run_id = None

    def start(self, *args, **kwargs) -> None:
        return None

    def metrics(self, *args, **kwargs) -> None:
        pass

    text = artifacts = end = tags = resume = datasets = model = metrics

    def logged(self, *args) -> Dict[str, float]:
        return {}

    def run_url(self) -> str:
        return "(logged by rank 0)"


def summary_table(rows: Iterable[tuple], header: tuple) -> str:
    """A small aligned text table for the console."""
    rows = [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), line("-" * w for w in widths), *(line(r) for r in rows)])


def replay(path: str, uri: Optional[str] = None) -> int:
    """Send what a run could not (an unsent file) to the tracking store; returns the number of records sent."""
    from mlflow.entities import Metric, RunTag

    client = open_store(uri).client  # a dead server fails in seconds, not after MLflow's minutes of retries
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for run_id in dict.fromkeys(r["run_id"] for r in rows):
        mine = [r for r in rows if r["run_id"] == run_id]
        metrics = [Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in mine if "key" in r]
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        for r in mine:
            if "tags" in r:
                client.log_batch(run_id, tags=[RunTag(k, v) for k, v in r["tags"].items()])
            elif "text" in r:
                client.log_text(run_id, r["text"], r["artifact_file"])
            elif "artifacts" in r:
                client.log_artifacts(run_id, r["artifacts"], r["artifact_path"])
            elif "model" in r:
                _replay_model(client, run_id, r)
            elif "datasets" in r:
                client.log_inputs(run_id, datasets=_dataset_inputs(r["datasets"]))
        for r in mine:
            if "status" in r:
                client.set_terminated(run_id, r["status"])
    return len(rows)


def _dataset_inputs(rows: list) -> list:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return [DatasetInput(Dataset(r["name"], r["digest"][:32], "local", json.dumps({"uri": r["source"]}),
                                 profile=json.dumps({"num_rows": r["rows"]})),
                         tags=[InputTag("mlflow.data.context", r["context"])]) for r in rows]


def _replay_model(client, run_id: str, r: Dict) -> None:
    """A logged model the store could not take at the end of run `run_id`: logged to that run now (its status kept)."""
    import mlflow

    from kdrun import logged_model

    status = client.get_run(run_id).info.status
    mlflow.set_tracking_uri(client.tracking_uri)
    with mlflow.start_run(run_id=run_id):
        logged_model.log(r["model"], examples=r["examples"], step=r["step"], register_as=r.get("register_as"))
    client.update_run(run_id, status=status)


def replay_main(argv=None) -> None:
    """`kdrun-replay FILE [--tracking-uri URI]`: send a run's unsent records once the store is back."""
    from kdrun.secrets import guard_output

    guard_output()  # nothing printed or logged carries a credential
    import argparse

    p = argparse.ArgumentParser(prog="kdrun-replay", description=replay_main.__doc__)
    p.add_argument("file", help="an mlflow-unsent.jsonl that kdrun wrote when the store could not be reached")
    p.add_argument("--tracking-uri", default=None, help="the store (default: MLFLOW_TRACKING_URI)")
    args = p.parse_args(argv)
    if not Path(args.file).is_file():
        sys.exit(f"kdrun-replay: error: {args.file}: no such file")
    try:
        n = replay(args.file, args.tracking_uri)
    except KdrunError as e:
        sys.exit(f"kdrun-replay: error: {e} (nothing was removed from {args.file})")
    except Exception as e:
        sys.exit(f"kdrun-replay: error: {redact_text(str(e).splitlines()[0])} (nothing was removed from {args.file})")
    print(f"kdrun-replay: sent {n} records from {args.file}")
