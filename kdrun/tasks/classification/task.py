"""Classification: texts -> class logits; accuracy, macro-F1 for student and teacher, and how often the
student predicts what the teacher predicts (agreement)."""
from __future__ import annotations

import hashlib
from typing import Dict, List, Sequence

import torch

from kdrun.errors import ConfigError
from kdrun.tasks.classification import FAMILY


class Collate:
    """(text, label[, teacher outputs]) -> student features, teacher features (online teacher) or the
    precomputed teacher logits, labels.
    For token-level terms (hidden states, attentions: `token_level`) one tokenisation serves both models, so
    positions line up; this needs a shared tokenizer (`shared`). Otherwise the teacher tokenizes on its own,
    batch-invariantly, so its logits equal its cached ones."""

    def __init__(self, teacher, student, teacher_outputs: bool = True, token_level: bool = False):
        self.teacher, self.student, self.teacher_outputs = teacher, student, teacher_outputs
        self.shared = (teacher is not None and not hasattr(teacher, "members")  # several teachers tokenize apart
                       and teacher.tokenizer.get_vocab() == student.tokenizer.get_vocab()
                       and teacher.max_length == student.max_length)
        self.token_level = token_level and self.shared

    def __call__(self, examples: Sequence) -> Dict:
        texts = [ex[0] for ex in examples]
        feats = self.student.featurize(texts)
        batch = {"student": feats, "labels": torch.tensor([ex[1] for ex in examples]),
                 "attention_mask": feats["attention_mask"], "size": len(examples)}
        if self.teacher is not None:
            batch["teacher"] = feats if self.token_level else self.teacher.featurize(texts)
        elif self.teacher_outputs:  # precomputed: the examples carry the teacher's logits
            batch["teacher_out"] = {k: torch.stack([ex[2][k] for ex in examples]) for k in examples[0][2]}
        else:  # no teacher at all (fine-tuning the teacher itself on labels)
            batch["teacher_out"] = {}
        return batch


def classification_metrics(pred: torch.Tensor, labels: torch.Tensor, n_classes: int) -> Dict[str, float]:
    """Accuracy and macro-F1: the unweighted mean of per-class F1 over the classes that occur in the labels
    or the predictions (a class absent from both is left out)."""
    acc = (pred == labels).float().mean().item()
    f1s = []
    for c in range(n_classes):
        tp = ((pred == c) & (labels == c)).sum().item()
        fp = ((pred == c) & (labels != c)).sum().item()
        fn = ((pred != c) & (labels == c)).sum().item()
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0}


class ClassificationTask:
    name, primary = FAMILY.name, FAMILY.primary

    def __init__(self, data, teacher, student, runtime, eval_batch_size: int):
        self.data, self.teacher, self.student = data, teacher, student
        self.rt, self.eval_batch_size = runtime, eval_batch_size
        self.teacher_pred = None  # the teacher's held-out predictions, for agreement
        names = list(data.label_names)
        student.model.config.id2label = dict(enumerate(names))  # the saved student names its classes
        student.model.config.label2id = {n: i for i, n in enumerate(names)}
        if student.num_labels != len(names):
            raise ConfigError(f"the student has {student.num_labels} output classes but the data has {len(names)} "
                              f"({names}); use a student with a matching head (student.init=teacher_layers)")

    def prepare_student(self, student, hardware: Dict) -> Dict[str, float]:
        """Padding to a multiple of 8/16; the training texts tokenised once."""
        from kdrun.data.tokens import tokenize_once

        student.pad_multiple = hardware["pad_to_multiple_of"]
        return tokenize_once(student, self.train_texts())

    def loss_context(self) -> Dict:
        """The teacher classifier's rows (class directions), for feature_norm_direction."""
        if self.teacher is None:
            return {}
        from kdrun.models.classifier import classifier_head

        teacher = getattr(self.teacher, "main", self.teacher)
        return {"class_centres": classifier_head(teacher.model).weight}

    def examples(self) -> list:
        return list(zip(self.data.train_texts, self.data.train_labels))

    def train_texts(self) -> List[str]:
        return list(self.data.train_texts)

    def lengths(self) -> List[int]:
        """Bucketing keys: tokens when the student's texts are tokenised already, else characters."""
        table = getattr(self.student, "token_table", None)
        if table is None:
            return [len(t) for t in self.data.train_texts]
        return [len(ids) for ids in table(self.data.train_texts)]

    def fingerprint(self) -> str:
        """SHA-256 of the training texts, in order (labels do not change the teacher's logits)."""
        h = hashlib.sha256()
        for t in self.data.train_texts:
            h.update((t + "\x1e").encode())
        return h.hexdigest()

    def teacher_outputs(self, teacher) -> Dict[str, torch.Tensor]:
        with self.rt.autocast():
            return {"logits": teacher.predict_logits(self.data.train_texts, self.eval_batch_size, self.rt.device).float().cpu()}

    def attach(self, outputs: Dict[str, torch.Tensor]) -> list:
        return [(t, y, {k: v[i] for k, v in outputs.items()})
                for i, (t, y) in enumerate(zip(self.data.train_texts, self.data.train_labels))]

    token_level = False  # set by the pipeline when a loss term compares hidden states or attentions

    def collate(self, online: bool) -> Collate:
        return Collate(self.teacher if online else None, self.student, token_level=self.token_level)

    def evaluate(self, model, who: str, final: bool = True) -> Dict[str, float]:
        was_training = model.training
        model.eval()
        with self.rt.autocast():
            pred = model.predict_logits(self.data.eval_texts, self.eval_batch_size, self.rt.device).argmax(-1)
        model.train(was_training)
        metrics = classification_metrics(pred, torch.tensor(self.data.eval_labels), len(self.data.label_names))
        if who == "teacher":
            self.teacher_pred = pred
        elif self.teacher_pred is not None:
            metrics["agreement"] = (pred == self.teacher_pred).float().mean().item()
        return metrics

    def eval_size(self) -> int:
        """Held-out examples one evaluation goes through (for the per-example latency metric)."""
        return len(self.data.eval_texts)

    def eval_fingerprint(self) -> str:
        """SHA-256 of the held-out texts and labels, in order."""
        h = hashlib.sha256()
        for t, y in zip(self.data.eval_texts, self.data.eval_labels):
            h.update(f"{t}\x1f{y}\x1e".encode())
        return h.hexdigest()

    def model_examples(self) -> list:
        """The logged model's input example: held-out texts."""
        return list(self.data.eval_texts[:2])

    def describe(self) -> str:
        return (f"held-out texts: {len(self.data.eval_texts)}, classes: {len(self.data.label_names)} "
                f"({', '.join(self.data.label_names)})")
