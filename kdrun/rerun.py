"""`kdrun-rerun RUN_ID [overrides...]`: run a logged run again from the resolved config it stored in MLflow.

The run's `config.yaml` artifact (every value, resolved) becomes the primary config of a new `kdrun` job, on top
of kdrun's typed schema, so the rerun uses the logged values even where kdrun's defaults have changed since.
Paths that belong to the old run (output_dir, scores_out) start afresh; extra overrides apply on top (e.g.
train.seed=2). The new run is tagged `kdrun.rerun_of=RUN_ID`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import yaml

from kdrun.config import DATA_SCHEMAS

ENV = "KDRUN_RERUN_OF"
_FRESH = ("output_dir", "scores_out")  # tied to the old run's folder


def _data_schema(data: dict) -> Optional[str]:
    target = data.get("_target_")
    return next((name for name, cls in DATA_SCHEMAS.items() if cls._target_ == target), None)


def rerun_config(stored: dict, run_name: str) -> dict:
    """The stored resolved config as a primary config: kdrun's schema, the data option's schema, the values."""
    cfg = {k: v for k, v in stored.items() if k not in _FRESH}
    if isinstance(cfg.get("loss", {}).get("terms"), list):  # logged before terms were keyed by name
        from kdrun.losses.specs import from_list

        cfg["loss"] = {**cfg["loss"], "terms": from_list(cfg["loss"]["terms"])}
    schema = _data_schema(cfg.get("data", {}))
    defaults = ["kdrun_schema", *([f"schema/data/{schema}@data"] if schema else []), "_self_"]
    cfg.setdefault("tracking", {})["run_name"] = f"rerun of {run_name}"[:250]
    return {"defaults": defaults, **cfg}


def main(argv: Optional[Sequence[str]] = None) -> int:
    from kdrun.secrets import guard_output

    guard_output()  # nothing printed or logged carries a credential
    ap = argparse.ArgumentParser(prog="kdrun-rerun", description=__doc__.splitlines()[0])
    ap.add_argument("run_id", help="the MLflow run to repeat")
    ap.add_argument("overrides", nargs="*", help="kdrun overrides applied on top, e.g. train.seed=2")
    ap.add_argument("--tracking-uri", help="where the run is (default: MLFLOW_TRACKING_URI or the local store); the "
                                           "rerun logs there too unless an override says otherwise")
    args = ap.parse_args(argv)
    from kdrun.tracking import open_store

    try:
        client = open_store(args.tracking_uri).client
        run = client.get_run(args.run_id)
        with tempfile.TemporaryDirectory() as tmp:
            stored = yaml.safe_load(Path(client.download_artifacts(args.run_id, "config.yaml", tmp)).read_text())
    except Exception as e:  # unknown run, no config.yaml artifact, unreachable store
        print(f"kdrun-rerun: error: cannot read the config of run {args.run_id}: {str(e).splitlines()[0]}",
              file=sys.stderr)
        return 2
    conf_dir = Path(tempfile.mkdtemp(prefix="kdrun-rerun-"))
    (conf_dir / "rerun.yaml").write_text(yaml.safe_dump(rerun_config(stored, run.info.run_name), sort_keys=False))
    env = dict(os.environ, **{ENV: args.run_id})
    if args.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = args.tracking_uri
    exe = Path(sys.executable).with_name("kdrun")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "kdrun"]
    print(f"kdrun-rerun: run {args.run_id} ({run.info.run_name}) again from its stored config ({conf_dir / 'rerun.yaml'})")
    return subprocess.call(cmd + ["--config-dir", str(conf_dir), "--config-name", "rerun", *args.overrides], env=env)


if __name__ == "__main__":
    sys.exit(main())
