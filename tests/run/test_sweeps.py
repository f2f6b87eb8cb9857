"""Sweeps in MLflow: one parent run per `kdrun -m`, its jobs as children (also from parallel joblib processes
into one SQLite store), the parent's summary table and plots, and `kdrun-report` over the same runs."""
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import offline_env, run_kdrun

SMALL = ["train.max_steps=3", "train.batch_size=4", "train.log_every=1", "data.max_train_queries=8",
         "data.max_eval_queries=4", "tracking.log_student=false", "tracking.experiment=sweep"]


@pytest.fixture(scope="module")
def parallel_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    # MLflow samples its system metrics every 10 s: a job shorter than that has none, so the jobs' metric sets would
    # depend on the machine's speed (found in a CI run under load); test_ecosystem.py checks that they are logged
    r = run_kdrun(["-m", *SMALL, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "tracking.system_metrics=false",
                   "optimizer.lr=1e-4,2e-4,3e-4,4e-4", f"hydra.sweep.dir={tmp / 'multirun'}"],
                  cwd=tmp, env=offline_env(tmp))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    return tmp, r, client, runs


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


def test_the_parent_holds_the_summary_table_and_plots(parallel_sweep):
    tmp, _, client, runs = parallel_sweep
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


def test_kdrun_report_rebuilds_the_table_from_an_experiment_or_a_parent(parallel_sweep, tmp_path):
    tmp, _, client, runs = parallel_sweep
    parent = next(x for x in runs if x.data.tags.get("kdrun.sweep_parent") == "1")
    exe = Path(sys.executable).with_name("kdrun-report")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    r = subprocess.run([str(exe), "--experiment", "sweep", "--tracking-uri", uri, "--out", str(tmp_path / "a")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "a" / "summary.csv").read_text().splitlines()) == 5  # the parent is left out
    r = subprocess.run([str(exe), "--parent", parent.info.run_id, "--tracking-uri", uri, "--out", str(tmp_path / "b")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "| optimizer.lr |" in r.stdout.replace("| run_name | status ", "| ")
    r = subprocess.run([str(exe), "--experiment", "nope", "--tracking-uri", uri], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "no MLflow experiment named 'nope'" in r.stderr


def _fake_run(seed, student, loss, mrr, ms, status="FINISHED"):
    from types import SimpleNamespace as NS

    metrics = {"eval/student/mrr_at_10": mrr, "eval/teacher/mrr_at_10": 0.6, "eval/student/ms_per_example": ms,
               "eval/teacher/ms_per_example": 10.0, "model/student_params": 20.0, "model/teacher_params": 40.0,
               "model/student_flops_per_token": 1.0, "model/teacher_flops_per_token": 3.0}
    return NS(info=NS(status=status, run_name=f"{student} {loss} {seed}", run_id=f"{student}{loss}{seed}"),
              data=NS(metrics=metrics, params={"train.seed": str(seed), "student.arch": student, "loss.terms": loss},
                      tags={"kdrun.choice.student": student, "kdrun.choice.loss": loss, "kdrun.choice.data": "x"}))


def test_results_average_over_seeds_per_student_and_loss_with_the_teacher_first():
    from kdrun import report

    runs = [_fake_run(s, st, lo, mrr, ms) for st, lo, base in (("bi", "ce", 0.3), ("colbert", "margin_mse", 0.5))
            for s, mrr, ms in ((1, base, 4.0), (2, base + 0.1, 6.0), (3, base + 0.2, 5.0))]
    runs.append(_fake_run(4, "bi", "ce", 0.99, 1.0, status="FAILED"))  # failed runs are left out
    assert report.factors(runs[:6]) == ["student", "loss"]  # the seed and the groups' own params are not factors
    runs[0].data.params["data/extraction_cache_hit"] = "0"  # what the data config produced (the first job built a
    for r in runs[1:6]:                                       # cache the others read) splits no group
        r.data.params["data/extraction_cache_hit"] = "1"
    assert report.factors(runs[:6]) == ["student", "loss"]
    for i, r in enumerate(runs[:6]):  # bookkeeping: a resumed sweep's jobs differ in resume=, the store in tracking.*
        r.data.params.update({"resume": "auto" if i % 2 else "None", "tracking.uri": f"sqlite:///{i}.db",
                              "tracking.experiment": f"e{i % 2}", "teacher.cache_dir": f"/c{i}"})
    assert report.factors(runs[:6]) == ["student", "loss"]
    csv_columns, csv_rows, md_columns, md_rows = report.results(runs)
    assert csv_columns[:6] == ["model", "student", "loss", "seeds", "mrr_at_10_mean", "mrr_at_10_std"]
    assert csv_rows[0][:6] == ["teacher", "", "", "3", "0.6", "0"]
    assert [r[:3] for r in csv_rows[1:]] == [["student", "bi", "ce", "3"][:3], ["student", "colbert", "margin_mse"]]
    bi = dict(zip(csv_columns, csv_rows[1]))
    assert float(bi["mrr_at_10_mean"]) == pytest.approx(0.4) and float(bi["mrr_at_10_std"]) == pytest.approx(0.1)
    assert float(bi["latency_vs_teacher_mean"]) == pytest.approx(0.5) and bi["seeds"] == "3"
    assert float(bi["flops_vs_teacher_mean"]) == pytest.approx(1 / 3) and float(bi["params_vs_teacher_mean"]) == 0.5
    assert md_rows[1][4] == "0.4000 ± 0.1000" and md_columns[-3:] == [
        "latency per query vs teacher", "FLOPs per token vs teacher", "params vs teacher"]


def test_sweep_jobs_are_ordered_by_job_number_not_by_start_time():
    """Parallel jobs start in no fixed order: tables list a sweep's jobs by number, whatever their start times."""
    from types import SimpleNamespace as NS

    from kdrun import report

    def run(num, start, parent="p1", name=None):
        tags = {"mlflow.parentRunId": parent} if parent else {}
        if num is not None and name is None:
            tags[report.JOB_TAG] = str(num)
        return NS(info=NS(start_time=start, run_id=f"id{num}{start}", run_name=name or f"#{num} x", status="FINISHED"),
                  data=NS(tags=tags, metrics={}, params={}))

    jobs = [run(3, 100), run(1, 101), run(0, 103), run(2, 102)]  # job 3 happened to start first
    assert [report.job_num(r) for r in report.run_order(jobs)] == [0, 1, 2, 3]
    old = run(None, 50, parent="p0", name="#1 lr=2")  # logged before the tag: its name says "#1"
    older = run(None, 60, parent="p0", name="#0 lr=1")
    single = run(None, 10, parent=None, name="kdrun-1129")
    ordered = report.run_order([*jobs, old, single, older])
    assert [r.info.run_name.split(" ")[0] for r in ordered] == ["kdrun-1129", "#0", "#1", "#0", "#1", "#2", "#3"]


def test_a_cost_panel_without_a_trade_off_says_so_instead_of_drawing_a_front():
    from kdrun.report import front_caveat

    assert "every student has 15.6M parameters" in front_caveat([15.6, 15.6, 15.6], "model/student_params", 0.0)
    assert "15.62-15.66M" in front_caveat([15.62, 15.66], "model/student_params", 0.0)  # a projection more
    assert front_caveat([15.6, 22.7], "model/student_params", 0.0) is None
    # 4.0 vs 4.2 ms: 5% apart, while one student timed twice varies by 10%: noise
    assert "within measurement noise" in front_caveat([4.0, 4.2], "eval/student/ms_per_example", 0.10)
    assert front_caveat([4.0, 8.0], "eval/student/ms_per_example", 0.10) is None


def test_loss_terms_get_panels_of_their_own_and_short_runs_log_often():
    from types import SimpleNamespace as NS

    from kdrun.pipeline import log_interval
    from kdrun.report import loss_panels

    def run(terms, metrics):
        params = {f"loss.terms.{name}.weight": str(w) for name, w in terms.items()}
        return NS(data=NS(params=params, metrics={k: 1.0 for k in metrics}))

    kd = run({"kd_kl": 0.5, "ce": 0.5}, ["train/loss", "train/kd_kl", "train/ce"])
    mse = run({"margin_mse": 1.0}, ["train/loss", "train/margin_mse"])
    old = NS(data=NS(params={"loss.terms": '[{"name": "kd_kl", "weight": 0.5}, {"name": "ce", "weight": 0.5}]'},
                     metrics={}))  # logged before terms were keyed by name
    from kdrun.report import term_names

    assert term_names(old) == ["kd_kl", "ce"] and term_names(kd) == ["kd_kl", "ce"]
    assert loss_panels([mse]) == ["train/loss"]  # one term of weight 1: it is the total
    assert loss_panels([mse, kd]) == ["train/loss", "train/kd_kl", "train/ce"]
    assert [log_interval(n) for n in (3, 20, 87, 249, 250, 10_000)] == [1, 1, 3, 9, 10, 10]


def test_pareto_front():
    from kdrun.report import pareto

    pts = [(1.0, 0.5), (2.0, 0.6), (2.0, 0.4), (3.0, 0.6), (0.5, 0.1)]
    assert pareto(pts, "max") == [0, 1, 4]
    assert pareto([(1.0, 10.0), (2.0, 5.0), (3.0, 7.0)], "min") == [0, 1]


@pytest.mark.parametrize("overrides,direction", [
    ([], "maximize"),  # no sweep.objective: the task's primary metric (ranking: MRR@10)
    (["experiment=classification_demo"], "maximize"),
    (["experiment=causal_lm_demo"], "minimize"),  # perplexity
    (["sweep.objective=eval/student/ms_per_example"], "minimize"),
    (["sweep.objective=eval/student/ndcg_at_10"], "maximize"),
    (["experiment=causal_lm_demo", "sweep.direction=maximize"], "maximize"),
])
def test_optuna_direction_is_one_optuna_accepts(overrides, direction):
    from hydra import compose, initialize_config_dir

    from conftest import CONF
    from hydra_plugins.kdrun_optuna_sweeper.optuna_sweeper import direction_of
    from kdrun import config

    config.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    assert direction_of(cfg) == direction


@pytest.mark.demo  # CI time; the named-objective Optuna test runs in CI
def test_optuna_sweeper_with_no_objective_optimises_the_primary_metric(tmp_path):
    r = run_kdrun(["-m", *SMALL, "train.max_steps=1", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
                   "optimizer.lr=tag(log,interval(1e-5,1e-3))", "tracking.experiment=optuna_default",
                   f"hydra.sweep.dir={tmp_path / 'multirun'}"], cwd=tmp_path, env=offline_env(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("optuna_default").experiment_id])
    children = [x for x in runs if "mlflow.parentRunId" in x.data.tags]
    best = OmegaConf.load(tmp_path / "multirun" / "optimization_results.yaml")
    assert best.direction == "maximize" and best.completed == 2
    assert best.best_value == pytest.approx(max(c.data.metrics["eval/student/mrr_at_10"] for c in children))


@pytest.mark.slow
def test_optuna_sweeper_maximises_the_named_objective(tmp_path):
    r = run_kdrun(["-m", *SMALL, "train.max_steps=2", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=3",
                   "optimizer.lr=tag(log,interval(1e-5,1e-3))", "sweep.objective=eval/student/ndcg_at_10",
                   "tracking.experiment=optuna", f"hydra.sweep.dir={tmp_path / 'multirun'}"],
                  cwd=tmp_path, env=offline_env(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
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
    r = run_kdrun(["sweep.objective=eval/student/accuracy"], cwd=tmp_path, env=offline_env(tmp_path))
    assert r.returncode == 2 and "eval/student/mrr_at_10" in r.stderr and "Traceback" not in r.stderr


def test_a_failed_sweep_leaves_its_parent_failed_not_running(tmp_path):
    r = run_kdrun(["-m", *SMALL, "optimizer.lr=1e-4", "student.path=/nonexistent", "student.init=pretrained",
                   "tracking.experiment=broken", f"hydra.sweep.dir={tmp_path / 'multirun'}"],
                  cwd=tmp_path, env=offline_env(tmp_path))
    assert r.returncode != 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("broken").experiment_id])
    assert [x.info.status for x in runs if x.data.tags.get("kdrun.sweep_parent")] == ["FAILED"]


@pytest.mark.slow
def test_kdrun_rerun_repeats_a_logged_run_from_its_stored_config(tmp_path):
    env = offline_env(tmp_path)
    r = run_kdrun([*SMALL, "optimizer.lr=3e-4", "data.negatives_per_query=2", "loss=listwise_kl",
                   "tracking.experiment=rerun", f"hydra.run.dir={tmp_path / 'first'}"], cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
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
        r = run_kdrun(["--cfg", "hydra", f"hydra/launcher={launcher}", "hydra.launcher.timeout_min=5"], cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert f"hydra_submitit_launcher.submitit_launcher.{cls}" in r.stdout


@pytest.mark.slow
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


@pytest.mark.demo  # CI time: test_faults' joblib sweep stopped and resumed to FINISHED checks most of it in CI
def test_a_sweep_stopped_by_sigterm_continues_with_resume_auto(tmp_path):
    """Pre-empted mid-sweep, then the same command with resume=auto: the stopped job continues its own MLflow run,
    the job that never ran starts, a finished job is not repeated, and the sweep keeps its one parent run."""
    import signal
    import time

    from mlflow.tracking import MlflowClient

    env = offline_env(tmp_path)
    sweep_dir = tmp_path / "multirun"
    args = ["-m", "train.max_steps=16", "train.checkpoint_every=2", "train.log_every=2", "tracking.log_student=false",
            "data.max_train_queries=200", "data.max_eval_queries=40", "train.batch_size=8", "tracking.experiment=presweep", "optimizer.lr=1e-4,2e-4", f"hydra.sweep.dir={sweep_dir}"]
    exe = Path(sys.executable).with_name("kdrun")
    proc = subprocess.Popen([str(exe), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (sweep_dir / "0" / "checkpoints" / "ckpt-00000004").is_dir():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
    assert not (sweep_dir / "1").exists()  # the second job never started
    hint = err.split("continue with: ")[1].splitlines()[0]  # the whole sweep, not the stopped job's checkpoint
    assert hint.startswith("kdrun -m ") and hint.endswith(f"hydra.sweep.dir={sweep_dir} resume=auto"), hint

    again = run_kdrun([*args, "resume=auto"], cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
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
        assert [m.step for m in client.get_metric_history(c.info.run_id, "train/loss")] == list(range(2, 17, 2))

    table = (sweep_dir / "summary" / "results.md").read_text()
    assert "resume" not in table and table.count("| student |") == 2, table  # one row per lr, not split by resume=
    once_more = run_kdrun([*args, "resume=auto"], cwd=tmp_path, env=env)  # everything finished: nothing to do
    assert once_more.returncode == 0 and once_more.stdout.count("resume=auto has nothing to do") == 2
    assert len(client.search_runs([client.get_experiment_by_name("presweep").experiment_id])) == 3


@pytest.mark.slow
def test_the_quick_reproduction_sweeps_leave_the_results_tables(tmp_path, kdrun_cache):
    """scripts/reproduce_margin_mse --quick (capped further here): a sweep per data set and student, 2 of the 6
    losses, 1 seed, the student's teacher fine-tuned first (the bi-encoder's a dot-product one, ColBERT's a cosine one);
    each parent's results.md has its teacher's row (its own held-out metrics) and one row per loss;
    hydra.sweep.dir=DIR puts the sweeps under DIR/<data set>/<student>."""
    from mlflow.tracking import MlflowClient

    env = offline_env(tmp_path, cache=kdrun_cache)
    script = Path(__file__).resolve().parent.parent / "scripts" / "reproduce_margin_mse"
    r = subprocess.run([str(script), "--quick", "loss=in_batch_kl_ce,ce", "train.max_steps=3", "train.batch_size=4",
                        "teacher.finetune.steps=3",
                        "data.max_train_queries=32", "data.max_eval_queries=8", f"hydra.sweep.dir={tmp_path / 'sw'}"],
                       cwd=tmp_path, env={**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"},
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    losses = ("ce", "in_batch_kl_ce")  # of the 6 (tests/test_config.py checks the presets sweep all 6)
    for data in ("chatterbot", "code_search"):
        runs = client.search_runs([client.get_experiment_by_name(f"reproduce_{data}").experiment_id])
        parents = [x for x in runs if x.data.tags.get("kdrun.sweep_parent") == "1"]
        assert len(runs) == 6 and len(parents) == 2 and all(x.info.status == "FINISHED" for x in runs)
        for student, similarity, flops in (("teacher_slice", "dot", (1 / 3, 1 / 3 + 1e-3)), ("colbert", "cos", (1 / 3, 0.36))):
            children = [x for x in runs if x not in parents and x.data.params["student.arch"] ==
                        {"teacher_slice": "bi_encoder", "colbert": "late_interaction"}[student]]
            assert len(children) == 2 and {x.data.params["teacher.similarity"] for x in children} == {similarity}
            child = children[0]
            assert child.data.params["data.negatives_per_query"] == "4" and "teacher/finetune_first_loss" in child.data.metrics
            # one teacher pass per sweep: in_batch_kl_ce's (ce reads no teacher: it skips the pass)
            assert sum(x.data.metrics.get("teacher/cache_misses", 0) for x in children) == 1
            assert (tmp_path / "sw" / data / student / "summary" / "results.md").is_file()
            [parent] = [p for p in parents if p.info.run_id in {x.data.tags.get("mlflow.parentRunId") for x in children}]
            local = Path(client.download_artifacts(parent.info.run_id, "summary/results.md", str(tmp_path / data / student)))
            lines = local.read_text().splitlines()
            # (one student per sweep: the table leaves out the column that does not vary)
            assert lines[0].startswith("| model | loss | seeds | mrr_at_10 (before → after) | ndcg_at_10 (before")
            assert "latency per query vs teacher" in lines[0] and "FLOPs per token vs teacher" in lines[0]
            rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
            assert rows[0][:3] == ["teacher", "", "1"] and float(rows[0][3].split()[0]) > 0  # its teacher's MRR@10
            assert sorted(row[1] for row in rows[1:]) == sorted(losses)
            assert all(row[2] == "1" for row in rows[1:])
            # 2 of the teacher's 6 layers (ColBERT: and its projection to 128 dimensions)
            assert all(flops[0] - 1e-3 < float(row[-2]) < flops[1] for row in rows[1:])
        assert lines[0] in r.stdout and "| student | in_batch_kl_ce | 1 |" in r.stdout  # printed at the end
