"""Sweeps as first-class MLflow objects: a Hydra callback opens one parent run per multirun, every job logs as
its child (MLflow's `mlflow.parentRunId` tag, so the UI nests them), and when the sweep ends the parent gets
the summary (kdrun/summary.py): a table of every child's varied params and final metrics (CSV, Markdown),
the quality-vs-cost plot with the Pareto front, and the loss curves.

Jobs find their parent through KDRUN_PARENT_RUN_ID (set before any job starts, inherited by launcher worker
processes), or else by the sweep directory recorded on the parent (launchers that start jobs elsewhere).
Registered in conf/config.yaml under hydra.callbacks.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from kdrun.errors import KdrunError
from kdrun.signals import on_stop_signals
from kdrun import tags

log = logging.getLogger(__name__)
_WORKER_GRACE_S = 120  # what a sweep's workers get to checkpoint and end their runs after SIGTERM
ENV = "KDRUN_PARENT_RUN_ID"
SWEPT_ENV = "KDRUN_SWEPT_KEYS"
BOARD_ENV = "KDRUN_SWEEP_BOARD"
MAIN_PID_ENV = "KDRUN_SWEEP_PID"  # the sweep's main process: a job elsewhere (a launcher's worker) is not it
_STOPPED: list = []  # the signal that stopped this sweep (a job's, in this process), if any
_OPEN_PARENTS: list = []  # (callback, config) of this process's sweeps whose parent run is still open

ARGV_ENV = "KDRUN_ARGV"  # the command line of a sweep (set by the CLI): its jobs print resume hints with it


def resume_command(sweep_dir: str) -> str:
    """The sweep's command again, continuing in its directory (credentials redacted: fill them in)."""
    import json
    import shlex

    from kdrun.secrets import redact_arg

    argv = json.loads(os.environ.get(ARGV_ENV, "null")) or sys.argv[1:]
    args = [redact_arg(a) for a in argv if not a.startswith(("resume=", "hydra.sweep.dir="))]
    return shlex.join(["kdrun", *args, f"hydra.sweep.dir={sweep_dir}", "resume=auto"])


def end_open_parents() -> None:
    """A sweep that ended without Hydra's on_multirun_end (it skips it when a job raises): its parent run ends FAILED
    (KILLED after a signal) now, when the kdrun command returns, and not only at the interpreter's exit, which for
    kdrun called in a long-lived process (a notebook, a test suite) comes much later."""
    while _OPEN_PARENTS:
        callback, config = _OPEN_PARENTS.pop()
        callback._fail_if_open(config)


def stopped_by(signum: int) -> None:
    """A job in this process was stopped by a signal: the sweep ends KILLED, not FAILED."""
    _STOPPED.append(signum)


def job_running(running: bool) -> None:
    """A launcher's worker marks on the sweep's board that it runs a job (or no longer does)."""
    board = os.environ.get(BOARD_ENV)
    if board and in_worker():
        mark = Path(board) / f"{os.getpid()}.running"
        with contextlib.suppress(OSError):
            mark.touch() if running else mark.unlink(missing_ok=True)


def stopped_in_worker() -> None:
    """A worker's job stopped by the sweep's signal has ended its run: say so on the board, then wait to be ended
    by the sweep's main process (exiting here would make the launcher kill the other workers mid-checkpoint)."""
    board = os.environ.get(BOARD_ENV)
    if board:
        with contextlib.suppress(OSError):
            (Path(board) / f"{os.getpid()}.stopped").touch()
    while True:
        time.sleep(3600)


def in_worker() -> bool:
    """Whether this process is a launcher's worker (joblib/loky) running a job of a sweep started elsewhere."""
    main = os.environ.get(MAIN_PID_ENV)
    return bool(main) and main != str(os.getpid())


def _store(config: DictConfig, experiment: Optional[str] = None):
    """The sweep's tracking store, reached as its jobs reach it (tracking.uri, the probe, tracking.fallback)."""
    from kdrun.names import enum_value
    from kdrun.tracking import open_store

    return open_store(config.tracking.uri or None, experiment, enum_value(config.tracking.fallback))


def _client(config: DictConfig):
    return _store(config).client


def _sweep_dir(config: DictConfig) -> str:
    return str(Path(config.hydra.sweep.dir).resolve())


def swept_keys(overrides, config: Optional[DictConfig] = None) -> list:
    """The keys a sweep varies: its overrides with several values (a,b / range / interval / choice), and the
    sweeper's own `params` (a preset such as experiment=reproduce_chatterbot sets them) that the command line does
    not pin to one value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = dict(OmegaConf.select(config, "hydra.sweeper.params", default={}) or {}) if config is not None else {}
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        from_params = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    except Exception:  # noqa: BLE001 - a name is cosmetic; Hydra reports bad overrides itself
        return []
    pinned = {o.key_or_group for o in parsed if not o.is_sweep_override()}
    keys = [o.key_or_group for o in parsed if o.is_sweep_override()]
    return keys + [o.key_or_group for o in from_params
                   if o.is_sweep_override() and o.key_or_group not in pinned and o.key_or_group not in keys]


def job_name() -> Optional[str]:
    """A sweep job's name: "#N" and the values of the swept keys ("#2 loss=listwise_kl optimizer.lr=3e-5")."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    hc = HydraConfig.get()
    swept = set(filter(None, os.environ.get(SWEPT_ENV, "").split(",")))
    mine = [o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") in swept] if swept else list(hc.overrides.task)
    from kdrun.secrets import redact_arg

    return f"#{hc.job.num} {' '.join(redact_arg(o) for o in mine)}"[:250]


def job_number() -> Optional[int]:
    """This job's number in its sweep (Hydra's hydra.job.num), else None: what sweep tables are ordered by."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return int(HydraConfig.get().job.num)


def parent_run_id() -> Optional[str]:
    """The parent run of this job when it is part of a kdrun sweep (or a stage of a staged run), else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if os.environ.get("KDRUN_STAGES_PARENT"):  # (kdrun/stages.py: ENV)
        return os.environ["KDRUN_STAGES_PARENT"]
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    if os.environ.get(ENV):
        return os.environ[ENV]
    import mlflow

    sweep_dir = str(Path(HydraConfig.get().sweep.dir).resolve())
    found = mlflow.search_runs(search_all_experiments=True, output_format="list", max_results=1,
                               filter_string=f"tags.`{tags.SWEEP_DIR}` = '{sweep_dir}'")
    return found[0].info.run_id if found else None


def writable_dir(path: str, key: str) -> None:
    """Create `path` if need be and check that files can be written in it; else one message naming `key`, and the
    fix (before Hydra or kdrun write anything there)."""
    import tempfile

    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise KdrunError(f"{key}={path} is not a writable directory ({e.strerror or e}); point {key} at a "
                         "directory you can write to") from None


def _checked_dir(path: str, key: str) -> None:
    """writable_dir in a Hydra callback: Hydra would print a traceback for an exception, so print and exit."""
    try:
        writable_dir(path, key)
    except KdrunError as e:
        print(f"kdrun: error: {e}", file=sys.stderr)
        sys.exit(2)


class MlflowSweep(Callback):
    """kdrun's Hydra callback: the output directory checked before a run, and a sweep's MLflow parent run."""

    def __init__(self) -> None:
        self.run_id: Optional[str] = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _checked_dir(config.hydra.run.dir, "hydra.run.dir")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """In the job's process (a launcher's worker too): its output redacted, and the config files Hydra has just
        written (.hydra/*.yaml, the sweep's multirun.yaml) rewritten without credentials."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from kdrun.secrets import guard_output, redact_yaml_file

        guard_output()
        job_running(True)
        if in_worker():  # a signal before the run's own handlers: nothing of it to keep; wait to be ended
            on_stop_signals(lambda *_: stopped_in_worker())
        if not HydraConfig.initialized():
            return
        hc = HydraConfig.get()
        out = Path(hc.runtime.output_dir)
        if hc.output_subdir:
            for f in sorted((out / hc.output_subdir).glob("*.yaml")):
                redact_yaml_file(f)
        if hc.mode == RunMode.MULTIRUN:
            redact_yaml_file(Path(hc.sweep.dir) / "multirun.yaml")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _checked_dir(config.hydra.sweep.dir, "hydra.sweep.dir")
        try:
            self._open_parent(config)
        except KdrunError as e:  # Hydra would warn and launch every job against the same dead store
            print(f"kdrun: error: {e}", file=sys.stderr)
            sys.exit(2)

    def _open_parent(self, config: DictConfig) -> None:
        from kdrun.secrets import redact_arg
        from kdrun.tracking import command_line, git_commit

        name = config.tracking.experiment
        store = _store(config, name)
        client, exp_id = store.client, store.experiment_id
        given = list(OmegaConf.select(config, "hydra.overrides.task", default=[]) or [])
        overrides = [redact_arg(o) for o in given]  # credentials never reach the store
        if any(o.startswith("resume=") for o in given) and self._continue(client, exp_id, config, given):
            return
        commit = git_commit()
        run = client.create_run(exp_id, run_name=f"sweep {Path(_sweep_dir(config)).name}", tags={
            tags.SWEEP_PARENT: "1", tags.SWEEP_DIR: _sweep_dir(config), tags.COMMAND: command_line(),
            **({tags.GIT_COMMIT: commit} if commit else {})})
        self.run_id = run.info.run_id
        client.log_param(self.run_id, "sweep.overrides", " ".join(overrides)[:6000])
        client.log_param(self.run_id, "sweep.sweeper", OmegaConf.select(config, "hydra.sweeper._target_", default=""))
        client.log_param(self.run_id, "sweep.launcher", OmegaConf.select(config, "hydra.launcher._target_", default=""))
        client.log_text(self.run_id, "\n".join(overrides) + "\n", "sweep_overrides.txt")
        os.environ[ENV] = self.run_id
        os.environ[SWEPT_ENV] = ",".join(swept_keys(given, config))  # jobs name themselves by these
        atexit.register(self._fail_if_open, config)  # Hydra skips on_multirun_end when a job raises
        _OPEN_PARENTS.append((self, config))  # (kdrun.cli ends it when the command returns: end_open_parents)
        self._stop_on_signals(config)
        log.info("MLflow sweep parent run %s (experiment '%s')", self.run_id, name)

    def _continue(self, client, exp_id: str, config: DictConfig, given: list) -> bool:
        """A sweep run again with resume=...: its jobs continue their own runs (finished ones are not repeated), so
        the parent run of the same sweep directory continues too, rather than a new, childless one."""

        found = client.search_runs([exp_id], max_results=1, filter_string=f"tags.`{tags.SWEEP_DIR}` = "
                                   f"'{_sweep_dir(config)}' and tags.`{tags.SWEEP_PARENT}` = '1'")
        if not found:
            return False
        self.run_id = found[0].info.run_id
        client.update_run(self.run_id, status="RUNNING")
        resumes = int(found[0].data.tags.get(tags.RESUMES, "0")) + 1
        client.set_tag(self.run_id, tags.RESUMES, str(resumes))
        os.environ[ENV] = self.run_id
        os.environ[SWEPT_ENV] = ",".join(swept_keys(given, config))
        atexit.register(self._fail_if_open, config)
        _OPEN_PARENTS.append((self, config))
        self._stop_on_signals(config)
        log.info("MLflow sweep parent run %s continues (resume %d)", self.run_id, resumes)
        return True

    def _fail_if_open(self, config: DictConfig) -> None:
        if self.run_id:
            try:
                _client(config).set_terminated(self.run_id, "KILLED" if _STOPPED else "FAILED")
            except Exception:  # noqa: BLE001 - at exit, the store may be gone; nothing more to do
                pass
            self.run_id = None

    def _stop_on_signals(self, config: DictConfig) -> None:
        """SIGTERM/SIGINT to the sweep's main process: the launcher's workers that run a job (joblib; marked on the
        sweep's board) get SIGTERM, so each job checkpoints and ends its run KILLED; then every worker is ended, the
        parent run ends KILLED and the command that continues the sweep is printed. (Jobs run in this process have
        their own handlers while they run; this one holds between them.)"""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        os.environ[MAIN_PID_ENV] = str(os.getpid())
        board = Path(_sweep_dir(config)) / ".kdrun-jobs"  # which worker runs a job, which has stopped
        board.mkdir(parents=True, exist_ok=True)
        os.environ[BOARD_ENV] = str(board)

        def handle(signum, frame):
            import psutil

            for s in (signal.SIGTERM, signal.SIGINT):
                signal.signal(s, signal.SIG_IGN)
            name = signal.Signals(signum).name
            children = psutil.Process().children(recursive=True)
            board = Path(os.environ[BOARD_ENV])
            running = [c for c in children if (board / f"{c.pid}.running").exists()]
            if running:
                print(f"kdrun: {name}: stopping the sweep's {len(running)} running jobs (each writes a checkpoint "
                      "first)", file=sys.stderr, flush=True)
            for w in running:  # (only workers with a job: the launcher kills every worker when an idle one dies)
                with contextlib.suppress(psutil.Error):
                    w.send_signal(signal.SIGTERM)  # (SIGTERM, not a second SIGINT: that would skip the checkpoint)
            deadline = time.time() + _WORKER_GRACE_S
            while time.time() < deadline and any(w.is_running() and not (board / f"{w.pid}.stopped").exists()
                                                 for w in running):
                time.sleep(0.1)
            children += [c for c in psutil.Process().children(recursive=True) if c not in children]
            for w in children:  # every job has ended its run: the workers (and the launcher's helpers) go
                with contextlib.suppress(psutil.Error):
                    w.kill()
            # and are gone before this process exits: SIGKILL is not instant (a worker frees its memory first), and a
            # scheduler that sees the sweep end must find its cores and memory free (found in CI: one worker was still
            # running when the main process had exited)
            psutil.wait_procs(children, timeout=30)
            shutil.rmtree(board, ignore_errors=True)
            stopped_by(signum)
            self._fail_if_open(config)
            print(f"kdrun: sweep stopped by {name}; continue with: {resume_command(_sweep_dir(config))}",
                  file=sys.stderr, flush=True)
            logging.shutdown()
            os._exit(128 + signum)  # not through joblib's shutdown, which would wait for the workers it lost

        on_stop_signals(handle)

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        job_running(False)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from kdrun import summary

        if not self.run_id:
            return
        client = _client(config)
        runs = summary.runs_of(client, parent_run_id=self.run_id)
        status = "FINISHED" if runs and all(r.info.status == "FINISHED" for r in runs) else "FAILED"
        files = {}
        try:
            if runs:
                files = summary.write_report(client, runs, Path(_sweep_dir(config)) / "summary")
                for f in files.values():
                    client.log_artifact(self.run_id, str(f), "summary")
                key, direction = summary.primary(runs)
                values = [r.data.metrics[key] for r in runs if key in r.data.metrics]
                if values:
                    client.log_metric(self.run_id, f"best/{key}", max(values) if direction == "max" else min(values))
            optimized = Path(_sweep_dir(config)) / "optimization_results.yaml"  # the optuna sweeper's best trial
            if optimized.is_file():
                client.log_artifact(self.run_id, str(optimized), "summary")
            client.log_metric(self.run_id, "sweep/jobs", len(runs))
            client.log_metric(self.run_id, "sweep/finished", sum(r.info.status == "FINISHED" for r in runs))
            if runs and "results.md" in files:  # mean +- std over seeds per group, the teacher first
                print("\n" + files["results.md"].read_text(), end="")
            print(f"\nkdrun: sweep parent run {self.run_id}: {len(runs)} jobs, summary under "
                  f"{Path(_sweep_dir(config)) / 'summary'} and in the run's artifacts (summary/)")
        finally:
            client.set_terminated(self.run_id, status)
            if os.environ.get(BOARD_ENV):
                shutil.rmtree(os.environ.pop(BOARD_ENV), ignore_errors=True)
            os.environ.pop(ENV, None)
            os.environ.pop(SWEPT_ENV, None)
            self.run_id = None
