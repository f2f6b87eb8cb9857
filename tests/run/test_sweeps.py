"""Sweeps (kdrun/sweep.py, Hydra's launchers and sweepers): one MLflow parent run per `kdrun -m`, its jobs as
children, from Hydra's basic launcher in this process and from joblib's and submitit's worker processes; the Optuna
sweeper optimising the objective kdrun returns; a failed or stopped sweep's parent; `kdrun-rerun`. On the tiny models
(experiment=smoke) unless a test says why not; the summary table and plots a parent holds and `kdrun-report` over
them (the tables' rules on runs made by hand: tests/tracking/test_report.py)."""
import subprocess
import sys
from pathlib import Path

import pytest

from support import (SWEEP as SMALL, client, compose, entry, kdrun, offline_env, ok, parallel_sweep_in, run_kdrun,
                     start_kdrun, wait_until)


@pytest.fixture(scope="module")
def parallel_sweep(tmp_path_factory):
    return parallel_sweep_in(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="module")
def basic_sweep(tmp_path_factory):
    """The same 4 jobs by Hydra's basic launcher, in this process: (tmp, result, client, runs)."""
    tmp = tmp_path_factory.mktemp("basic")
    r = ok(kdrun(["-m", *SMALL, "tracking.system_metrics=false", "optimizer.lr=1e-4,2e-4,3e-4,4e-4",
                  f"hydra.sweep.dir={tmp / 'multirun'}"], tmp))
    c = client(tmp)
    return tmp, r, c, c.search_runs([c.get_experiment_by_name("sweep").experiment_id])


@pytest.mark.slow  # joblib's two worker processes (a launcher's: what needs processes)
def test_four_parallel_jobs_land_as_children_of_one_parent(parallel_sweep):
    _, r, client, runs = parallel_sweep
    parents = [x for x in runs if x.data.tags.get("kdrun.sweep_parent") == "1"]
    children = [x for x in runs if x not in parents]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert all(c.info.status == "FINISHED" for c in children)
    assert sorted(float(c.data.params["optimizer.lr"]) for c in children) == [1e-4, 2e-4, 3e-4, 4e-4]
    assert len({c.data.tags["kdrun.job_pid"] for c in children}) == 2  # two worker processes
    assert len({c.info.run_name for c in children}) == 4  # every child named by its swept values only
    assert all(c.info.run_name.split(" ", 1)[1].startswith("optimizer.lr=") and "max_steps" not in c.info.run_name
               for c in children)
    keys = set().union(*(c.data.metrics for c in children))
    assert {"train/loss", "train/margin_mse", "train/lr", "train/grad_norm", "eval/student/mrr_at_10",
            "eval/teacher/mrr_at_10", "model/student_params"} <= keys
    for c in children:  # nothing lost: every metric of every job, every step of every training metric
        assert set(c.data.metrics) == keys
        for key in (k for k in keys if k.startswith("train/") and k != "train/max_steps"):
            assert [m.step for m in client.get_metric_history(c.info.run_id, key)] == [1, 2, 3], key
    assert "optimizer.lr=1e-4,2e-4,3e-4,4e-4" in parent.data.params["sweep.overrides"]
    assert parent.data.metrics["sweep/finished"] == 4
    assert parent.data.metrics["best/eval/student/mrr_at_10"] == max(c.data.metrics["eval/student/mrr_at_10"]
                                                                     for c in children)


def test_the_parent_holds_the_summary_table_and_plots(basic_sweep):
    tmp, _, client, runs = basic_sweep
    parent = next(x for x in runs if x.data.tags.get("kdrun.sweep_parent") == "1")
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert names == {"summary/summary.csv", "summary/summary.md", "summary/pareto.png", "summary/loss_curves.png",
                     "summary/results.csv", "summary/results.md"}
    local = Path(client.download_artifacts(parent.info.run_id, "summary", str(tmp / "dl")))
    csv = (local / "summary.csv").read_text().splitlines()
    header = csv[0].split(",")
    assert "optimizer.lr" in header and "eval/student/mrr_at_10" in header and "model/student_params" in header
    assert "train.max_steps" not in header  # the same in every job: not a varied param
    assert len(csv) == 5
    assert (local / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp / "multirun" / "summary" / "summary.md").is_file()
    results = (local / "results.csv").read_text().splitlines()  # grouped by the swept lr, the teacher first
    assert results[0].startswith("model,optimizer.lr,seeds,mrr_at_10_mean,mrr_at_10_std")
    assert [r.split(",")[:3] for r in results[1:]] == [["teacher", "", "1"]] + [
        ["student", lr, "1"] for lr in ("0.0001", "0.0002", "0.0003", "0.0004")]
    assert "before/eval/student/mrr_at_10" in header and "run_id" in header  # the CSV keeps everything
    md = (local / "summary.md").read_text().splitlines()  # for reading: before -> after, rounded, no run ids
    assert "| mrr_at_10 (before → after) |" in md[0].replace("student mrr_at_10", "mrr_at_10")
    assert "run_id" not in md[0] and len(md) == 6
    row = lambda line: [c.strip() for c in line.strip("|").split("|")]
    cells = dict(zip(row(md[0]), row(md[2])))
    assert cells["student params"].endswith("M") and " → " in cells["student mrr_at_10 (before → after)"]
    first, last = cells["student mrr_at_10 (before → after)"].split(" → ")
    assert len(first.split(".")[1]) == 4 and len(last.split(".")[1]) == 4
    assert " → " in (local / "results.md").read_text().splitlines()[3]  # a student row: before → after ± std


def test_kdrun_report_rebuilds_the_table_from_an_experiment_or_a_parent(basic_sweep, tmp_path):
    tmp, _, client, runs = basic_sweep
    parent = next(x for x in runs if x.data.tags.get("kdrun.sweep_parent") == "1")
    from kdrun import report

    report_main = lambda args: entry(report.main, args, tmp_path, prog="kdrun-report")  # (its console script's main)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    r = report_main(["--experiment", "sweep", "--tracking-uri", uri, "--out", str(tmp_path / "a")])
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "a" / "summary.csv").read_text().splitlines()) == 5  # the parent is left out
    r = report_main(["--parent", parent.info.run_id, "--tracking-uri", uri, "--out", str(tmp_path / "b")])
    assert r.returncode == 0 and "| optimizer.lr |" in r.stdout.replace("| run_name | status ", "| ")
    r = report_main(["--experiment", "nope", "--tracking-uri", uri])
    assert r.returncode != 0 and "no MLflow experiment named 'nope'" in r.stderr


@pytest.mark.parametrize("overrides,direction", [
    ([], "maximize"),  # no sweep.objective: the task's primary metric (ranking: MRR@10)
    (["experiment=classification_demo"], "maximize"),
    (["experiment=causal_lm_demo"], "minimize"),  # perplexity
    (["sweep.objective=eval/student/ms_per_example"], "minimize"),
    (["sweep.objective=eval/student/ndcg_at_10"], "maximize"),
    (["experiment=causal_lm_demo", "sweep.direction=maximize"], "maximize"),
])
def test_optuna_direction_is_one_optuna_accepts(overrides, direction):
    from hydra_plugins.kdrun_optuna_sweeper.optuna_sweeper import direction_of

    assert direction_of(compose(overrides)) == direction


def test_optuna_sweeper_with_no_objective_optimises_the_primary_metric(tmp_path):
    ok(kdrun(["-m", *SMALL, "train.max_steps=1", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
              "optimizer.lr=tag(log,interval(1e-5,1e-3))", "tracking.experiment=optuna_default",
              f"hydra.sweep.dir={tmp_path / 'multirun'}"], tmp_path))
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("optuna_default").experiment_id])
    children = [x for x in runs if "mlflow.parentRunId" in x.data.tags]
    best = OmegaConf.load(tmp_path / "multirun" / "optimization_results.yaml")
    assert best.direction == "maximize" and best.completed == 2
    assert best.best_value == pytest.approx(max(c.data.metrics["eval/student/mrr_at_10"] for c in children))


def test_optuna_sweeper_maximises_the_named_objective(tmp_path):
    ok(kdrun(["-m", *SMALL, "train.max_steps=2", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3",
              "optimizer.lr=tag(log,interval(1e-5,1e-3))", "sweep.objective=eval/student/ndcg_at_10",
              "tracking.experiment=optuna", f"hydra.sweep.dir={tmp_path / 'multirun'}"], tmp_path))
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("optuna").experiment_id])
    children = [x for x in runs if "mlflow.parentRunId" in x.data.tags]
    assert len(runs) == 4 and len(children) == 3
    lrs = [float(c.data.params["optimizer.lr"]) for c in children]
    assert len(set(lrs)) == 3 and all(1e-5 <= lr <= 1e-3 for lr in lrs)  # sampled, not a grid
    best = OmegaConf.load(tmp_path / "multirun" / "optimization_results.yaml")
    values = [c.data.metrics["eval/student/ndcg_at_10"] for c in children]
    assert best.direction == "maximize" and best.completed == 3
    assert best.best_value == pytest.approx(max(values))  # kdrun returned the named metric to the sweeper
    parent = next(x for x in runs if x not in children)
    assert "summary/optimization_results.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}


def test_unknown_sweep_objective_lists_the_metrics(tmp_path):
    r = kdrun(["sweep.objective=eval/student/accuracy"], tmp_path)
    assert r.returncode == 2 and "eval/student/mrr_at_10" in r.stderr and "Traceback" not in r.stderr


def test_a_failed_sweep_leaves_its_parent_failed_not_running(tmp_path):
    r = kdrun(["-m", *SMALL, "optimizer.lr=1e-4", "student.path=/nonexistent", "student.init=pretrained",
               "tracking.experiment=broken", f"hydra.sweep.dir={tmp_path / 'multirun'}"], tmp_path)
    assert r.returncode != 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("broken").experiment_id])
    assert [x.info.status for x in runs if x.data.tags.get("kdrun.sweep_parent")] == ["FAILED"]


@pytest.mark.slow(seconds=40)  # kdrun-rerun starts kdrun as a process of its own, as it does for a user
def test_kdrun_rerun_repeats_a_logged_run_from_its_stored_config(tmp_path):
    env = offline_env(tmp_path)
    ok(kdrun([*SMALL, "optimizer.lr=3e-4", "data.negatives_per_query=2", "loss=listwise_kl",
              "tracking.experiment=rerun", f"hydra.run.dir={tmp_path / 'first'}"], tmp_path, env))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("rerun").experiment_id
    first = client.search_runs([exp])[0]
    exe = Path(sys.executable).with_name("kdrun-rerun")
    r = subprocess.run([str(exe), first.info.run_id, f"hydra.run.dir={tmp_path / 'again'}"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    again = next(x for x in client.search_runs([exp]) if x.info.run_id != first.info.run_id)
    assert again.data.tags["kdrun.rerun_of"] == first.info.run_id
    differ = {k for k in first.data.params if first.data.params[k] != again.data.params.get(k)}
    assert differ == {"output_dir", "tracking.run_name", "scores_out"}, differ
    terms = lambda run: {k: v for k, v in run.data.params.items() if k.startswith("loss.terms.")}
    assert terms(again) == terms(first) and terms(first)
    losses = lambda run: [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"),
                                                  key=lambda m: m.step)]
    assert losses(again) == pytest.approx(losses(first), abs=1e-6)
    r = subprocess.run([str(exe), "0" * 32], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot read the config of run" in r.stderr


def test_cluster_launchers_compose_with_kdrun(tmp_path):
    for launcher, cls in (("submitit_slurm", "SlurmLauncher"), ("slurm_gpu", "SlurmLauncher"),
                          ("submitit_local", "LocalLauncher")):
        r = kdrun(["--cfg", "hydra", f"hydra/launcher={launcher}", "hydra.launcher.timeout_min=5"], tmp_path)
        assert r.returncode == 0, r.stderr
        assert f"hydra_submitit_launcher.submitit_launcher.{cls}" in r.stdout


@pytest.mark.slow(seconds=36)  # submitit starts each job as a process of its own
def test_submitit_local_jobs_are_children_of_the_sweep(tmp_path):
    """Jobs started by submitit in their own processes find the parent run (the slurm launcher works the same way)."""
    r = run_kdrun(["-m", *SMALL, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                   "optimizer.lr=1e-4,2e-4", "tracking.experiment=submitit", f"hydra.sweep.dir={tmp_path / 'multirun'}"],
                  cwd=tmp_path, env=offline_env(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("submitit").experiment_id])
    parent = next(x for x in runs if x.data.tags.get("kdrun.sweep_parent") == "1")
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2 and all(x.info.status == "FINISHED" for x in runs)


def test_a_locked_sqlite_store_is_retried_not_lost():
    from kdrun.tracking import retry_locked

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert retry_locked(flaky) == "ok" and len(calls) == 3
    with pytest.raises(ValueError):
        retry_locked(lambda: (_ for _ in ()).throw(ValueError("another error")))


@pytest.mark.slow(seconds=45)  # a signal to a process (the console script) in its first job's training
def test_a_sweep_stopped_by_sigterm_continues_with_resume_auto(tmp_path):
    """Pre-empted mid-sweep, then the same command with resume=auto: the stopped job continues its own MLflow run,
    the job that never ran starts, a finished job is not repeated, and the sweep keeps its one parent run."""
    import signal

    from mlflow.tracking import MlflowClient

    env = offline_env(tmp_path)
    sweep_dir = tmp_path / "multirun"
    args = ["-m", "experiment=smoke", "train.max_steps=48", "train.checkpoint_every=4", "train.log_every=4",
            "tracking.log_student=false",
            "data.max_train_queries=200", "data.max_eval_queries=40", "train.batch_size=8", "tracking.experiment=presweep", "optimizer.lr=1e-4,2e-4", f"hydra.sweep.dir={sweep_dir}"]
    proc = start_kdrun(args, tmp_path, env)
    wait_until(proc, lambda: (sweep_dir / "0" / "checkpoints" / "ckpt-00000004").is_dir(), every=0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
    assert not (sweep_dir / "1").exists()  # the second job never started
    hint = err.split("continue with: ")[1].splitlines()[0]  # the whole sweep, not the stopped job's checkpoint
    assert hint.startswith("kdrun -m ") and hint.endswith(f"hydra.sweep.dir={sweep_dir} resume=auto"), hint

    ok(kdrun([*args, "resume=auto"], tmp_path, env))
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("presweep").experiment_id])
    parents = [r for r in runs if r.data.tags.get("kdrun.sweep_parent") == "1"]
    children = sorted((r for r in runs if r not in parents), key=lambda r: r.data.params["optimizer.lr"])
    assert len(parents) == 1 and len(children) == 2, [r.info.run_name for r in runs]
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["kdrun.resumes"] == "1"
    assert parents[0].data.metrics["sweep/finished"] == 2
    assert children[0].data.tags["kdrun.resumes"] == "1" and "kdrun.resumes" not in children[1].data.tags
    for c in children:
        assert c.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(c.info.run_id, "train/loss")] == list(range(4, 49, 4))

    table = (sweep_dir / "summary" / "results.md").read_text()
    assert "resume" not in table and table.count("| student |") == 2, table  # one row per lr, not split by resume=
    once_more = kdrun([*args, "resume=auto"], tmp_path, env)  # everything finished: nothing to do
    assert once_more.returncode == 0 and once_more.stdout.count("resume=auto has nothing to do") == 2
    assert len(client.search_runs([client.get_experiment_by_name("presweep").experiment_id])) == 3


