"""`kdrun-report`: the table of what varied and what came out, the quality-vs-cost plot and the loss curves
(kdrun/summary.py) for an experiment or a sweep's parent run, written to a folder (and logged to the parent)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from kdrun.summary import runs_of, write_report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`kdrun-report`: a table and plots for an experiment or a sweep's parent run."""
    from kdrun.secrets import guard_output

    guard_output()  # nothing printed or logged carries a credential
    ap = argparse.ArgumentParser(prog="kdrun-report", description="a table and plots for an experiment or a sweep's parent run")
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--experiment", help="every run of this MLflow experiment (sweep parents left out)")
    which.add_argument("--parent", help="the children of this parent (sweep) run id")
    ap.add_argument("--out", default="report", help="folder for summary.csv/.md and the PNG plots (default: report)")
    ap.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or the local store)")
    ap.add_argument("--log", action="store_true", help="also log the files as artifacts of the parent run (--parent)")
    args = ap.parse_args(argv)
    from kdrun.tracking import open_store

    try:
        client = open_store(args.tracking_uri).client
        runs = runs_of(client, parent_run_id=args.parent, experiment=args.experiment)
    except Exception as e:  # an unknown run id or an unreachable store
        print(f"kdrun-report: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if not runs:
        print("kdrun-report: error: no runs found", file=sys.stderr)
        return 2
    files = write_report(client, runs, Path(args.out))
    if args.log:
        if not args.parent:
            print("kdrun-report: error: --log needs --parent (the run to log to)", file=sys.stderr)
            return 2
        for f in files.values():
            client.log_artifact(args.parent, str(f), "summary")
    print(files["summary.md"].read_text())
    print("kdrun-report: wrote " + ", ".join(str(f) for f in files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
