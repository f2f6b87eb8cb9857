"""`make ui` (`kdrun-ui`): MLflow's UI over the local store, opened where kdrun's runs are.

MLflow 3's experiment page starts on its GenAI side (traces, evaluation runs, an assistant panel), where kdrun's runs
do not show; they are behind its "Model training" switch. kdrun marks its experiments as model-training experiments
(MLflow's experiment kind tag, set when kdrun creates or first uses an experiment, and here for experiments logged
before kdrun did so) and prints each experiment's runs view, the URL with `workflowType=machine_learning`.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence

from kdrun import tags
from kdrun.tags import mark_model_training, runs_url


def kdrun_experiments(client) -> List:
    """Experiments that hold kdrun runs, most recently used first (marked as model-training ones on the way)."""
    found = []
    for exp in client.search_experiments():
        runs = client.search_runs([exp.experiment_id], f"tags.`{tags.COMMAND}` != ''", max_results=1,
                                  order_by=["attributes.start_time DESC"])
        if runs:
            mark_model_training(client, exp)
            found.append((runs[0].info.start_time or 0, exp))
    return [exp for _, exp in sorted(found, key=lambda x: (-x[0], x[1].name))]


def main(argv: Optional[Sequence[str]] = None) -> None:
    from kdrun.secrets import guard_output

    guard_output()  # nothing printed or logged carries a credential
    ap = argparse.ArgumentParser(prog="kdrun-ui",
                                 description="MLflow's UI over the local store, opened on kdrun's runs")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--backend-store-uri", default=None,
                    help="the store to browse (default: MLflow's local store in this directory, what kdrun logs to)")
    ap.add_argument("--no-serve", action="store_true", help="print the URLs only; do not start the UI")
    args = ap.parse_args(argv)
    from kdrun.tracking import LOCAL_STORE, open_store

    store = args.backend_store_uri or LOCAL_STORE
    base = f"http://{args.host}:{args.port}"
    experiments = kdrun_experiments(open_store(store).client) if _store_exists(store) else []
    if experiments:
        print(f"kdrun: runs in {store}, by experiment (most recent first):")
        for exp in experiments:
            print(f"  {exp.name:<24} {runs_url(base, exp.experiment_id)}")
    else:
        print(f"kdrun: no kdrun runs in {store} yet (run `kdrun` first); the UI starts at {base}")
    sys.stdout.flush()
    if args.no_serve:
        return
    mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
    cmd = [mlflow, "ui", "--host", args.host, "--port", str(args.port)]
    if args.backend_store_uri:
        cmd += ["--backend-store-uri", args.backend_store_uri]
    os.execv(mlflow, cmd)


def _store_exists(uri: str) -> bool:
    """Reading a local SQLite store that does not exist would create it; a server is asked."""
    if uri.startswith("sqlite:///"):
        return os.path.isfile(uri[len("sqlite:///"):].split("?")[0])
    return True


if __name__ == "__main__":
    main()
