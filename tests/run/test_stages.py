"""Staged distillation (kdrun/stages.py, experiment=staged_tinybert): one command, each stage a child run of one
MLflow parent, the student handed from one stage to the next, and the same command again reads both stages back.
On the tiny BERT: the chain's mechanics."""
from mlflow.tracking import MlflowClient

from support import kdrun, offline_env, ok


def test_a_staged_run_chains_child_runs_hands_the_student_over_and_resumes_as_a_whole(tmp_path, kdrun_cache):
    args = ["experiment=staged_tinybert", "teacher.path=null", "teacher.name=kdrun-tiny/bert", "teacher.finetune.steps=4",
            "teacher.finetune.lr=1e-3", "teacher.max_length=32", "student.max_length=32", "data.max_train=48",
            "data.max_eval=24", "train.batch_size=8", "train.max_steps=2", "train.log_every=1",
            f"hydra.run.dir={tmp_path / 'chain'}"]
    env = offline_env(tmp_path, kdrun_cache)
    ok(kdrun(args, tmp_path, env))
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("staged_tinybert").experiment_id
    runs = client.search_runs([exp])
    parent = next(x for x in runs if x.data.tags.get("kdrun.stages_parent") == "1")
    children = {x.info.run_name: x for x in runs if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"stage1_general", "stage2_task"} and parent.info.status == "FINISHED"
    general, task = children["stage1_general"], children["stage2_task"]
    assert "train/hidden_mse" in general.data.metrics and "train/attention_mse" in general.data.metrics
    assert "train/kd_kl" in task.data.metrics and "train/hidden_mse" not in task.data.metrics
    assert task.data.params["student.path"] == str(tmp_path / "chain" / "stage1_general" / "student")
    assert task.data.params["student.init"] == "pretrained"
    assert parent.data.metrics["eval/student/accuracy"] == task.data.metrics["eval/student/accuracy"]
    # the same command again: both stages are read back, under the same parent run
    again = kdrun([*args, "resume=auto"], tmp_path, env)
    assert again.returncode == 0 and again.stdout.count("resume=auto has nothing to do") == 2, again.stderr[-2000:]
    assert len(client.search_runs([exp])) == 3
