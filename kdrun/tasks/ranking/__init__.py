"""Ranking, the headline family: (query, [positive, negatives]) -> scores; MRR@10, nDCG@10, Recall@10 held out.
Teachers: a bi-encoder or cross-encoder, or a score file; students of another architecture (bi-encoder, late
interaction, cross-encoder): Hofstaetter et al.'s cross-architecture distillation. The torch side is task.py."""
from __future__ import annotations

import importlib
import logging
from typing import Any, Optional

from kdrun.errors import ConfigError
from kdrun.tasks.base import Family

log = logging.getLogger(__name__)


class Ranking(Family):
    name = "ranking"
    metrics = ("mrr_at_10", "ndcg_at_10", "recall_at_10")
    primary, direction = "mrr_at_10", "max"
    teacher_kinds = ("bi_encoder", "cross_encoder")
    student_archs = ("bi_encoder", "late_interaction", "cross_encoder")
    scores_file = True
    finetunes_teacher = True
    task_class = "kdrun.tasks.ranking.task.RankingTask"

    def run_metrics(self, data: Any) -> tuple:
        """A run re-ranked to a depth (data=triples: data.eval_depth) adds Recall at that depth, and RR(rel=2)@10 for
        graded qrels (reported where the qrels have a grade 2)."""
        depth = data.get("eval_depth")
        return self.metrics + ((f"recall_at_{depth}",) if depth and depth != 10 else ()) + \
            (("mrr_at_10_rel2",) if depth else ())

    def check(self, cfg: Any) -> None:
        d = cfg.data
        if d.negatives_per_query < 1 or d.get("examples_per_pair", 1) < 1:
            raise ConfigError("data.negatives_per_query and data.examples_per_pair must be >= 1")
        if d.get("eval_candidates", 2) < 2:
            raise ConfigError(f"data.eval_candidates={d.eval_candidates} must be >= 2")
        if d.get("eval_depth", 1) < 1:
            raise ConfigError(f"data.eval_depth={d.eval_depth} must be >= 1 (the candidates re-ranked per held-out query)")
        if cfg.student.dim < 1:
            raise ConfigError(f"student.dim={cfg.student.dim} must be >= 1")
        if "embedding_align" in (cfg.loss.terms or {}):
            arch, kind = str(getattr(cfg.student.arch, "value", cfg.student.arch)), str(getattr(cfg.teacher.kind, "value", cfg.teacher.kind))
            if arch != "bi_encoder" or kind != "bi_encoder":
                raise ConfigError(f"loss.terms.embedding_align aligns a bi-encoder student's embeddings with a "
                                  f"bi-encoder teacher's; here student.arch={arch} and teacher.kind={kind}")

    def build_teacher(self, *, data=None, runtime=None, hardware=None, finetune: dict, **node):
        """A frozen bi-encoder or cross-encoder teacher; with teacher.finetune.steps > 0 first fine-tuned on the training
        split from its base encoder (finetune.py, cached by content). A cross-encoder whose relevance head is not in
        its checkpoint (a base encoder) is refused: its scores would be random."""
        from kdrun.models import has_trained_head, load_teacher
        from kdrun.models.hub import resolve_source

        source = resolve_source("teacher", node["name"], node["path"], node.get("gguf_file"))
        info = {}
        finetune = dict(finetune)
        folds = finetune.pop("folds", 1)

        def finetuned(part):  # (directory of the teacher fine-tuned on these training examples, its metrics)
            from kdrun.tasks.ranking.finetune import finetuned_teacher

            return finetuned_teacher(source, part, kind=node["kind"], pooling=node["pooling"],
                                     similarity=node["similarity"], max_length=node["max_length"], runtime=runtime,
                                     hardware=hardware, **finetune)

        if finetune["steps"] > 0 and folds > 1:
            return self._out_of_fold(data, folds, node, finetuned)
        if finetune["steps"] > 0:
            source, info = finetuned(data)
            node = {**node, "label_index": 0}
        teacher = load_teacher(**{**node, "name": None, "path": source})
        if node["kind"] == "cross_encoder" and not has_trained_head(source, teacher.model):
            raise ConfigError(f"teacher '{source}' has no trained relevance head (a base encoder: its cross-encoder "
                              "scores would be random); set teacher.finetune.steps=N so kdrun fine-tunes it on the "
                              "training split first, or pass a fine-tuned cross-encoder")
        teacher.finetune_info = info
        return teacher

    def _out_of_fold(self, data, folds: int, node: dict, finetuned):
        """teacher.finetune.folds=k: k teachers, teacher f fine-tuned (and cached) on the training examples whose
        query is outside fold f, scoring the queries of fold f (models/ensemble.py, OutOfFold)."""
        import copy

        import numpy as np

        from kdrun.models import load_teacher
        from kdrun.models.ensemble import OutOfFold, fold_of

        queries = data.queries.texts(np.asarray(data.train_q))
        fold = np.fromiter((fold_of(q, folds) for q in queries), dtype=np.int64, count=len(queries))
        members, infos = [], []
        for f in range(folds):
            part = copy.copy(data)  # (keep() replaces the example arrays; the text columns are shared)
            part.keep(np.flatnonzero(fold != f))
            log.info("teacher: fold %d of %d: fine-tuning on %d of %d training examples (queries outside the fold)",
                     f + 1, folds, part.num_train, data.num_train)
            path, info = finetuned(part)
            members.append(load_teacher(**{**node, "name": None, "path": path, "label_index": 0}))
            infos.append(info)
        teacher = OutOfFold(members)
        teacher.finetune_info = {
            "teacher/finetune_cache_hit": min(i["teacher/finetune_cache_hit"] for i in infos),
            "teacher/finetune_seconds": sum(i["teacher/finetune_seconds"] for i in infos),
            "teacher/finetune_folds": float(folds),
            **{k: sum(i[k] for i in infos) / folds for k in infos[0] if k.endswith("_loss")}}
        return teacher

    def build_student(self, *, teacher, teacher_source: Optional[str] = None, dropout: Optional[float] = None, **node):
        """A bi-encoder, late-interaction or cross-encoder student (student.arch), from its own checkpoint or the
        source of the teacher's model (the scores file's model when there is no teacher)."""
        from kdrun.models import finish_student, ranking_student

        source = teacher.source if teacher is not None else teacher_source
        return finish_student(ranking_student(**node, teacher_source=source), dropout)


FAMILY = Ranking()


def __getattr__(name: str):  # the torch side, on first use: `from kdrun.tasks.ranking import RankingTask`
    if name.startswith("__") or name in ("task", "finetune"):
        raise AttributeError(name)
    return getattr(importlib.import_module("kdrun.tasks.ranking.task"), name)
