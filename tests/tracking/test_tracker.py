"""One MLflow run (kdrun/tracking.py's Tracker and open_store): a resumed run logs what its interruption left out and
drops the failure tag it had, and a store named relative to the working directory is the working directory's at
each run."""
import pytest

from kdrun import tracking


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield f"sqlite:///{tmp_path / 'store.db'}"
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


def test_a_resumed_run_logs_the_final_evaluation_it_was_killed_before(store, tmp_path):
    """Killed after its last checkpoint (step 20) and before its final evaluation: the store holds train/* at step 20
    and eval/* at step 0 only. The resumed run redoes the evaluation at step 20 and it must land (it was dropped as
    'already logged' because *some* metric held step 20), while train/* at step 20 is not logged twice."""
    first = tracking.Tracker(store, "resume", output_dir=str(tmp_path))
    run_id = first.start("r", {}, {})
    first.metrics({"eval/student/mrr_at_10": 0.27}, step=0)
    first.metrics({"train/loss": 1.0}, step=20)
    first.end("KILLED")

    again = tracking.Tracker(store, "resume", output_dir=str(tmp_path))
    again.resume(run_id, step=20)
    again.metrics({"train/loss": 1.0}, step=20)  # the loop's last log, repeated by the resumed run
    again.metrics({"eval/student/mrr_at_10": 0.46}, step=20)
    again.end("FINISHED")
    history = lambda k: [(m.step, m.value) for m in again.client.get_metric_history(run_id, k)]
    assert history("eval/student/mrr_at_10") == [(0, 0.27), (20, 0.46)]
    assert history("train/loss") == [(20, 1.0)]


def test_a_resumed_run_drops_the_failure_tag_of_its_interruption(store, tmp_path):
    first = tracking.Tracker(store, "stale", output_dir=str(tmp_path))
    run_id = first.start("r", {}, {})
    first.tags({"kdrun.failure": "RuntimeError: out of memory"})
    first.end("FAILED")
    again = tracking.Tracker(store, "stale", output_dir=str(tmp_path))
    again.resume(run_id, step=3)
    again.end("FINISHED")
    run = again.client.get_run(run_id)
    assert run.info.status == "FINISHED" and "kdrun.failure" not in run.data.tags


def test_a_relative_local_store_is_the_working_directory_s_at_each_run(tmp_path, monkeypatch):
    """MLflow's default store is `sqlite:///mlflow.db`, relative to the working directory; MLflow keeps one store
    object per URI for the life of the process, so a second in-process run in another directory (a notebook, a test
    suite) wrote into the first directory's file (found when the tests moved in-process). kdrun names it absolutely."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        store = tracking.open_store(None, f"exp_{name}")
        assert store.uri == f"sqlite:///{tmp_path / name / 'mlflow.db'}"
    for name, other in (("a", "b"), ("b", "a")):
        names = {e.name for e in MlflowClient(f"sqlite:///{tmp_path / name / 'mlflow.db'}").search_experiments()}
        assert f"exp_{name}" in names and f"exp_{other}" not in names
    assert tracking.absolute("http://host:5000") == "http://host:5000"
    assert tracking.absolute("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
