"""kdrun's vocabulary in MLflow: the tags it sets on runs and experiments (one place for every `kdrun.*` key, imported
from below by tracking, the pipeline, sweeps, stages, reports and the UI), MLflow 3's experiment kind, and the UI's
address of an experiment's runs."""
from __future__ import annotations

from typing import Optional

# every run
COMMAND = "kdrun.command"  # the command line that made it (secrets redacted); kdrun's runs are found by it
TASK = "kdrun.task"  # its task family
HOST, JOB_PID = "kdrun.host", "kdrun.job_pid"
GIT_COMMIT = "kdrun.git_commit"  # (and MLflow's own mlflow.source.git.commit)
RERUN_OF = "kdrun.rerun_of"  # kdrun-rerun: the run it repeats
CHOICE = "kdrun.choice."  # + group: a run's config-group choices (kdrun.choice.student = colbert, ...)
# how a run ended or went on
FAILURE = "kdrun.failure"  # why it failed, for the UI
CHECKPOINT_ERROR = "kdrun.checkpoint_error"  # a checkpoint that could not be written (the run went on)
RESUMES = "kdrun.resumes"  # how many times it was resumed; RESUME + n: from which step, by which command
RESUME = "kdrun.resume."
SUPERSEDED_BY = "kdrun.superseded_by"  # a run replaced by another (resume into a new run)
# sweeps and staged runs
SWEEP_PARENT = "kdrun.sweep_parent"  # set ("1") on a sweep's parent run (and a staged run's)
SWEEP_DIR = "kdrun.sweep_dir"  # the sweep's directory: how a resumed sweep finds its parent
JOB_NUM = "kdrun.job_num"  # a sweep job's number (Hydra's hydra.job.num): tables list jobs in this order
STAGES_PARENT, STAGES_DIR, STAGES = "kdrun.stages_parent", "kdrun.stages_dir", "kdrun.stages"

# MLflow 3's experiment kind: its UI picks the experiment page's view by it
KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"  # the kind whose page shows the runs table
WORKFLOW = "workflowType=machine_learning"  # the UI's own switch, in the URL: the "Model training" side


def mark_model_training(client, experiment) -> None:
    """Tag an experiment as a model-training one, unless it has a kind already (someone chose it)."""
    if experiment is not None and KIND not in (experiment.tags or {}):
        client.set_experiment_tag(experiment.experiment_id, KIND, MODEL_TRAINING)


def runs_url(base: str, experiment_id: str, run_id: Optional[str] = None) -> str:
    """The experiment's runs view (or one run's page) in the MLflow UI at `base`."""
    root = f"{base.rstrip('/')}/#/experiments/{experiment_id}"
    return f"{root}/runs/{run_id}" if run_id else f"{root}/runs?{WORKFLOW}"
