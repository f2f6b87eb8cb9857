"""`kdrun`: Hydra entry point. Thin: compose, validate, call pipeline.run.

Nothing heavy is imported at module level (no torch, transformers or mlflow), so `kdrun --help`,
`kdrun --cfg job` and config errors answer fast.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from kdrun import config
from kdrun.errors import KdrunError


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
        from kdrun import pipeline  # heavy imports start here, after validation

        result = pipeline.score(cfg) if config.enum_value(cfg.mode) == "score" else pipeline.run(cfg)
    except KdrunError as e:
        if hasattr(e, "signum"):  # checkpoint.Interrupted: SIGTERM/SIGINT, checkpointed
            if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 speaks for all
                print(f"kdrun: {e}", file=sys.stderr)
                if e.path:
                    print(f"kdrun: continue with: {_resume_command(e.path)}", file=sys.stderr)
            sys.exit(128 + e.signum)
        print(f"kdrun: error: {e}", file=sys.stderr)
        sys.exit(2)
    except OmegaConfBaseException as e:
        print(f"kdrun: error: {e}", file=sys.stderr)
        sys.exit(2)
    # for sweepers: sweep.objective (checked against the task's metrics at validation), else the primary metric
    return result[cfg.sweep.objective] if cfg.sweep.objective else result["objective"]


def _resume_command(path) -> str:
    """This command again, with resume=PATH (credentials redacted: fill them in)."""
    import shlex

    from kdrun.secrets import redact_arg

    args = [redact_arg(a) for a in sys.argv[1:] if not a.startswith("resume=")]
    return shlex.join(["kdrun", *args, f"resume={path}"])


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
