"""Classification: texts -> class logits; accuracy, macro-F1, and the student's agreement with the teacher. The
teacher is a sequence classifier, fine-tuned by kdrun first when none ships for the data (finetune.py, cached by
content). The torch side is task.py."""
from __future__ import annotations

import importlib
from typing import Optional

from kdrun.errors import ConfigError
from kdrun.tasks.base import Family


class Classification(Family):
    name = "classification"
    metrics = ("accuracy", "macro_f1", "agreement")
    primary, direction = "accuracy", "max"
    teacher_kinds = ("classifier",)
    finetunes_teacher = True
    task_class = "kdrun.tasks.classification.task.ClassificationTask"

    def build_teacher(self, *, data=None, runtime=None, hardware=None, finetune: dict, **node):
        """The classifier teacher, fine-tuned on the training texts first when teacher.finetune.steps > 0 (cached
        by content); a classifier without a trained head, or with another number of classes, is refused."""
        from kdrun.models import has_trained_head, load_teacher
        from kdrun.models.hub import resolve_source

        info = {"teacher/finetune_cache_hit": 0.0, "teacher/finetune_seconds": 0.0}
        source = resolve_source("teacher", node["name"], node["path"], node.get("gguf_file"))
        if finetune["steps"] > 0:
            from kdrun.tasks.classification.finetune import finetuned_teacher

            settings = {k: v for k, v in finetune.items() if k not in ("folds", "negatives", "scale")}  # (ranking only, validated)
            source, info = finetuned_teacher(source, data, max_length=node["max_length"], runtime=runtime, **settings)
        teacher = load_teacher(**{**node, "name": None, "path": source})
        if finetune["steps"] == 0 and not has_trained_head(source, teacher.model):
            raise ConfigError(f"teacher '{source}' has no trained classification head (it would be random); set "
                              "teacher.finetune.steps=N so kdrun fine-tunes it first, or pass a fine-tuned classifier")
        n_classes = len(data.label_names)
        if teacher.num_labels != n_classes:
            raise ConfigError(f"teacher '{source}' has {teacher.num_labels} labels but the data has {n_classes} "
                              f"classes {list(data.label_names)}; set teacher.finetune.steps=N to fine-tune a head "
                              "for them")
        teacher.finetune_info = info
        return teacher

    def build_student(self, *, teacher, teacher_source: Optional[str] = None, dropout: Optional[float] = None, arch=None,
                      pooling=None, similarity=None, dim=None, projection_init=None, query_length=None, max_length: int = 128,
                      **node):
        """A sequence classifier with the teacher's classes: a slice of the teacher (its head included), resized,
        or a checkpoint given a head of that size (loss=dual_head gives it a second head)."""
        from kdrun.models import finish_student, hf_student
        from kdrun.models.classifier import SequenceClassifier

        model, tok = hf_student(**node, teacher=teacher, model_class="AutoModelForSequenceClassification",
                                num_labels=teacher.num_labels)
        return finish_student(SequenceClassifier(model, tok, max_length), dropout)


FAMILY = Classification()


def __getattr__(name: str):  # the torch side, on first use
    if name.startswith("__") or name in ("task", "finetune"):
        raise AttributeError(name)
    return getattr(importlib.import_module("kdrun.tasks.classification.task"), name)
