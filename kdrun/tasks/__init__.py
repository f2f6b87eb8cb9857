"""Task families. Each is a package here: its `Family` (kdrun/tasks/base.py: config checks, metrics, the teachers
and settings it takes; no torch) and its torch side (a Task: examples, batches, teacher outputs, held-out metrics;
how its teachers and students are built). The registry below is the one place that lists them."""
from __future__ import annotations

from typing import Dict, List

from kdrun.tasks.base import Family, registered, unknown_family

FAMILIES = {  # name -> the module that defines FAMILY; a new family is one line here and its package
    "ranking": "kdrun.tasks.ranking",
    "classification": "kdrun.tasks.classification",
    "causal_lm": "kdrun.tasks.causal_lm",
}

_loaded: Dict[str, Family] = {}


def family(name: str) -> Family:
    """The registered family of that name (ConfigError with the closest name otherwise)."""
    if not _loaded:
        _loaded.update(registered(FAMILIES))
    if name not in _loaded:
        raise unknown_family(name, list(FAMILIES))
    return _loaded[name]


def names() -> List[str]:
    return list(FAMILIES)


def family_of_kind(kind: str) -> List[str]:
    """The families that take a teacher of this kind."""
    return [n for n in FAMILIES if kind in family(n).teacher_kinds]


def task_class(name: str):
    """The torch-side Task class of a family (kept for code that builds tasks itself)."""
    from kdrun.tasks.base import _load

    return _load(family(name).task_class)


def build_teacher(*, task: str, **node):
    """`_target_` of conf/teacher: the family builds its teacher (e.g. classification fine-tunes one first)."""
    return family(task).build_teacher(**node)


def build_student(*, task: str, **node):
    """`_target_` of conf/student: the family builds its student (a slice of the teacher, a pretrained model, ...)."""
    return family(task).build_student(**node)
