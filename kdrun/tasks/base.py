"""The task-family interface. A family (ranking, classification, causal LM, ...) is one package under kdrun/tasks/:
its `__init__.py` holds a `Family` (no torch: what it checks in the config, its metrics, which teachers and settings
it takes), and its own modules the torch side: a `Task` that turns data into examples, batches, teacher outputs and
held-out metrics, and how its teachers and students are built. A new family is its package plus one registry line in
kdrun/tasks/__init__.py; nothing else in kdrun names the families.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

from kdrun.errors import ConfigError


class Task(Protocol):
    """What a family's task object does for a run (the pipeline calls these, in this order)."""
    name: str  # the family's name
    primary: str  # the headline held-out metric

    def prepare_student(self, student, hardware: Dict[str, Any]) -> Dict[str, float]:
        """Pre-tokenising and batching settings of the student (metrics: seconds, cache hits)."""

    def examples(self) -> list:
        """Training examples (what the sampler indexes)."""

    def lengths(self) -> List[int]:
        """Each example's length, for length bucketing."""

    def fingerprint(self) -> str:
        """SHA-256 of the training data as a teacher sees it (the teacher-output cache's key)."""

    def teacher_outputs(self, teacher) -> Dict[str, Any]:
        """A teacher's outputs over every training example, as stacked tensors."""

    def attach(self, outputs: Dict[str, Any]) -> list:
        """The examples with precomputed teacher outputs attached."""

    def collate(self, online: bool):
        """examples -> a batch: model features, labels, masks, teacher features or outputs."""

    def loss_context(self) -> Dict[str, Any]:
        """What the family gives loss terms beyond widths and depths (classification: the class centres)."""

    def evaluate(self, model, who: str, final: bool = True) -> Dict[str, float]:
        """Held-out metrics of the student or the teacher ("teacher" first: agreement needs it). `final`: an evaluation
        the run reports (before and after training), not a periodic one; a family may compute those apart (ranking:
        by ir_measures)."""

    def eval_files(self, directory) -> list:
        """Optional: files of the reported evaluations to log as the run's artifacts under eval/ (ranking: TREC runs
        and qrels). The pipeline calls it only where a task has it."""

    def eval_size(self) -> int:
        """Held-out examples one evaluation goes through (for the per-example latency)."""

    def describe(self) -> str:
        """One line on the held-out data, for the run's printed summary."""

    def eval_fingerprint(self) -> str:
        """SHA-256 of the held-out data as a model sees it (the digest of the run's evaluation dataset in MLflow)."""

    def model_examples(self) -> list:
        """A few held-out inputs for the student's logged model's input example (kdrun.logged_model): (query,
        passage) pairs for a ranking student, texts otherwise."""


class Family:
    """A task family's description and builders. Subclasses set the attributes and override what they need."""
    name: str = ""
    metrics: Tuple[str, ...] = ()  # held-out metrics, logged as eval/student/<m> and eval/teacher/<m>
    primary: str = ""  # the headline metric: printed, optimised by sweeps
    direction: str = "max"  # which way `primary` is better
    teacher_kinds: Tuple[str, ...] = ()  # teacher.kind values the family takes
    student_archs: Tuple[str, ...] = ("bi_encoder",)  # student.arch values (the default is the only one outside ranking)
    several_teachers: bool = True  # teachers.NAME: outputs averaged
    scores_file: bool = False  # teacher.mode=scores_file, and mode=score writes such a file
    sparse_teacher: bool = False  # teacher.top_k: the teacher's top-k log-probs only
    finetunes_teacher: bool = False  # teacher.finetune.*: kdrun fine-tunes the teacher first
    task_class: str = ""  # the torch side: "kdrun.tasks.<family>.task.<Class>"

    def run_metrics(self, data: Any) -> Tuple[str, ...]:
        """The held-out metrics a run over this data option reports (default: `metrics`)."""
        return self.metrics

    def check(self, cfg: Any) -> None:
        """The family's own config checks, beyond the capabilities above (raise ConfigError naming the key)."""

    def task(self, data, teacher, student, runtime, eval_batch_size: int) -> Task:
        return _load(self.task_class)(data, teacher, student, runtime, eval_batch_size)

    def step_hook(self, task, train: Any, runtime) -> Optional[Any]:
        """What the training step runs on each batch before the models (causal LM: the student's own continuations,
        train.on_policy), or None."""
        return None

    def build_teacher(self, *, data=None, runtime=None, hardware=None, **node):
        """A frozen teacher from its config node (teacher.*): loaded by kind."""
        from kdrun.models import load_teacher

        node.pop("finetune", None)
        return load_teacher(**node)

    def build_student(self, *, teacher, teacher_source: Optional[str], **node):
        raise NotImplementedError(f"the {self.name} family builds no students")


def _load(path: str):
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def registered(families: Dict[str, str]) -> Dict[str, Family]:
    """{name: Family} from {name: module}: each module's FAMILY (importing no torch)."""
    return {name: importlib.import_module(module).FAMILY for name, module in families.items()}


def unknown_family(name: str, known: Sequence[str]) -> ConfigError:
    from kdrun.names import closest

    guess = closest(name, list(known))
    return ConfigError(f"data.task={name}: no such task family" + (f"; did you mean {guess}?" if guess else "")
                       + f" Families: {', '.join(known)}")
