"""`kdrun`: Hydra entry point. Thin: compose, validate, call pipeline.run.

Nothing heavy is imported at module level (no torch, transformers or mlflow), so `kdrun --help`,
`kdrun --cfg job` and config errors answer fast.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from kdrun.errors import KdrunError
from kdrun.signals import Stopped, held_signals, on_stop_signals, raise_lost


def _stop_while_starting(signum, frame):
    """SIGTERM/SIGINT from the start (imports, config composition) end in one line and 128 + the signal, not a
    KeyboardInterrupt traceback or a silent death; the run's own handlers take over once it has begun."""
    raise Stopped(signum)


if Path(sys.argv[0]).name in ("kdrun", "__main__.py"):  # the command itself (not a program importing kdrun)
    on_stop_signals(_stop_while_starting, command=True)  # before the imports below: they take most of the start

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from kdrun import config  # noqa: E402
from kdrun.names import enum_value  # noqa: E402


def _conf_dir() -> str:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "conf", here / "conf"):  # source checkout, then a packaged copy
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise SystemExit(f"kdrun: error: no conf/config.yaml next to {here}; reinstall kdrun (`make install`)")


config.register()


@hydra.main(version_base="1.3", config_path=_conf_dir(), config_name="config")
def _main(cfg: DictConfig):
    try:
        config.validate(cfg)
        raise_lost()  # a signal while starting that a finalizer swallowed
        with held_signals():  # a signal inside torch's import would abort the interpreter: raised after it
            from kdrun import pipeline  # heavy imports start here, after validation

        if cfg.stages:  # a chain of runs under one parent run (kdrun/stages.py)
            from kdrun import stages

            result = stages.run(cfg)
        else:
            result = pipeline.score(cfg) if enum_value(cfg.mode) == "score" else pipeline.run(cfg)
    except Stopped as e:  # SIGTERM/SIGINT outside the training loop
        _stopped(e)
    except KdrunError as e:
        if hasattr(e, "signum"):  # checkpoint.Interrupted: SIGTERM/SIGINT in the loop, checkpointed
            _stopped(e)
        print(f"kdrun: error: {e}", file=sys.stderr)
        _discard_empty_run_dir()
        sys.exit(2)
    except OmegaConfBaseException as e:
        print(f"kdrun: error: {e}", file=sys.stderr)
        _discard_empty_run_dir()
        sys.exit(2)
    # for sweepers: sweep.objective (checked against the task's metrics at validation), else the primary metric
    return result[cfg.sweep.objective] if cfg.sweep.objective else result["objective"]


def _discard_empty_run_dir() -> None:
    """A single run that failed before writing anything: remove the run directory Hydra made for it (its .hydra/
    and job log only), and the dated folders above it that this leaves empty, up to the working directory."""
    import shutil

    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.RUN:
        return
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    hydra_files = {".hydra", f"{HydraConfig.get().job.name}.log"}
    if not run_dir.is_dir() or {p.name for p in run_dir.iterdir()} - hydra_files:
        return
    logging.shutdown()  # the job log is closed before it goes
    shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
    (run_dir / f"{HydraConfig.get().job.name}.log").unlink(missing_ok=True)
    cwd, run_dir = Path.cwd().resolve(), run_dir.resolve()
    for d in (run_dir, *run_dir.parents):
        if d != run_dir and cwd not in d.parents:  # parents only below the working directory
            break
        try:
            d.rmdir()  # only while empty
        except OSError:
            break


def _stopped(e) -> None:
    """A run stopped by a signal: what happened, how to continue, exit 128 + the signal."""
    from kdrun import sweep

    if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 speaks for all
        print(f"kdrun: {e}", file=sys.stderr)
        if e.path or _in_sweep():
            print(f"kdrun: continue with: {_resume_command(e.path)}", file=sys.stderr)
        else:
            print("kdrun: no checkpoint was written yet; run the same command again to start over (a teacher "
                  "pass goes on from its finished shards)", file=sys.stderr)
    if sweep.in_worker():  # a launcher's worker: the sweep's main process ends it once every job has stopped
        sys.stdout.flush()
        sys.stderr.flush()
        sweep.stopped_in_worker()
    if _in_sweep():
        sweep.stopped_by(e.signum)
    sys.exit(128 + e.signum)


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _resume_command(path) -> str:
    """This command again, with resume=PATH; in a sweep, the sweep's command in its directory with resume=auto
    (credentials redacted: fill them in)."""
    import shlex

    from hydra.core.hydra_config import HydraConfig

    from kdrun.secrets import redact_arg

    if _in_sweep():  # the whole sweep continues
        from kdrun.sweep import resume_command as sweep_resume_command

        return sweep_resume_command(HydraConfig.get().sweep.dir)
    args = [redact_arg(a) for a in sys.argv[1:] if not a.startswith("resume=")]
    return shlex.join(["kdrun", *args, f"resume={path}"])


def main() -> None:
    """Mistakes on the command line get one line and exit status 2, as kdrun's own config checks do; `--help` and
    `--cfg job` are answered here (Hydra's own help recomposes the config once per group option: seconds)."""
    from kdrun.secrets import guard_output

    guard_output()  # nothing printed or logged carries a credential
    from kdrun import usage

    argv = sys.argv[1:]
    conf = _conf_dir()
    user_full_error = bool(os.environ.get("HYDRA_FULL_ERROR"))
    try:
        flags, overrides = usage.split_args(argv)
        usage.check_group_options(overrides, conf)
        multirun = "-m" in flags or "--multirun" in flags
        if "--version" in flags:  # Hydra's own would print Hydra's version
            print(usage.versions())
            return
        own_config = not ({"--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn"} & set(flags))
        if ("--help" in flags or "-h" in flags) and "--hydra-help" not in flags and own_config:
            print(usage.help_text(conf, overrides, "--resolve" in flags))
            return
        cfg_flag = flags.get("--cfg", flags.get("-c"))
        if cfg_flag == "job" and own_config and not multirun and not ({"--package", "-p", "--info", "-i"} & set(flags)):
            print(usage.job_config(conf, overrides, "--resolve" in flags), end="")
            if "--resolve" not in flags:
                print("kdrun: interpolations (${...}) are shown as written; add --resolve to see their values",
                      file=sys.stderr)
            return
        from kdrun.sweep import ARGV_ENV

        os.environ[ARGV_ENV] = json.dumps(argv)  # sweep jobs (joblib's worker processes) print resume hints with it
        if not user_full_error:  # Hydra raises its composition errors to us instead of printing them in many lines
            os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            _main()
        finally:
            if multirun:
                from kdrun import sweep

                sweep.end_open_parents()  # a sweep whose job failed: its parent run ends FAILED now
    except Stopped as e:  # while starting, or between a sweep's jobs: nothing of a run to resume
        print(f"kdrun: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except KdrunError as e:
        print(f"kdrun: error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - config mistakes get one line; anything else is re-raised as it is
        message = None if user_full_error else usage.explain(e)
        if message is None:
            raise
        print(f"kdrun: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
