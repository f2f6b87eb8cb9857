"""torch.compile (hardware.compile=true): the compiled student trains as the eager one does, through the real entry
point on the tiny models."""
import pytest

from support import kdrun, offline_env, ok

SMALL = ["experiment=smoke", "train.max_steps=2", "train.batch_size=4", "train.log_every=1", "data.max_train_queries=8",
         "data.max_eval_queries=8", "tracking.log_student=false", "student.dropout=0", "tracking.experiment=kdrun"]


def _losses(env, name):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    run = client.search_runs([client.get_experiment_by_name("kdrun").experiment_id],
                             filter_string=f"attributes.run_name = '{name}'")[0]
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]


@pytest.mark.slow(seconds=42)  # torch.compile's inductor builds C++ kernels for the student's graph: over a minute on 2 cores
def test_compiled_student_trains_like_the_eager_one(tmp_path):
    env = offline_env(tmp_path)
    for name, extra in (("eager", []), ("compiled", ["hardware.compile=true"])):
        ok(kdrun(SMALL + extra + [f"tracking.run_name={name}", f"hydra.run.dir={tmp_path / name}"], tmp_path, env))
    eager, compiled = _losses(env, "eager"), _losses(env, "compiled")
    assert len(compiled) == 2 and compiled == pytest.approx(eager, rel=1e-3)
