"""Ranking: batches of (query, [positive, negatives]) -> [B, n] scores; held-out MRR@10, nDCG@10, Recall (metrics.py)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from kdrun.data.ranking import Example
from kdrun.tasks.ranking import FAMILY
from kdrun.tasks.ranking.metrics import as_run, fast_metrics, library_metrics, write_qrels, write_run


class Collate:
    """Raw examples -> each model's own features (teacher and student may tokenize differently).

    With `teacher=None` the examples carry precomputed teacher outputs ({"scores": [n]}) as a third item,
    which are batched into "teacher_out" instead of teacher features.
    """

    def __init__(self, teacher, student):
        self.teacher, self.student = teacher, student

    def __call__(self, examples: Sequence) -> Dict:
        queries = [ex[0] for ex in examples]
        passages = [ex[1] for ex in examples]
        batch = {"student": self.student.featurize(queries, passages), "size": len(examples)}
        if self.teacher is None:  # every output the examples carry: "scores" (and each teacher's "scores@<name>")
            batch["teacher_out"] = {k: torch.stack([ex[2][k] for ex in examples]) for k in examples[0][2]}
        else:
            batch["teacher"] = self.teacher.featurize(queries, passages)
        return batch


def example_length(example: Example) -> int:
    """Sort key for length bucketing (characters: a cheap proxy for tokens)."""
    query, passages = example[0], example[1]
    return len(query) + max(len(p) for p in passages)


def token_lengths(table, examples: Sequence) -> List[int]:
    """Bucketing keys from a student's token table: the query's tokens + the longest passage's."""
    return [len(table([ex[0]])[0]) + max(len(ids) for ids in table(ex[1])) for ex in examples]


def precompute_teacher_scores(teacher, examples: Sequence[Example], batch_size: int, runtime) -> torch.Tensor:
    """[N, n] teacher scores for every example, computed once (a bi-encoder embeds each distinct text once)."""
    with runtime.autocast():
        rows = teacher.score_lists([q for q, _ in examples], [ps for _, ps in examples], batch_size, runtime.device)
    return torch.stack(rows).float()


def ranking_metrics(scores: Sequence[torch.Tensor], labels: Sequence[Sequence[int]], k: int = 10) -> Dict[str, float]:
    """MRR@k, nDCG@k and Recall@k of score lists against their candidates' labels (kdrun/tasks/ranking/metrics.py)."""
    return fast_metrics(scores, labels, k=k)


def score_lists(model, queries: List[str], candidates: List[List[str]], batch_size: int, runtime) -> List[torch.Tensor]:
    """Every candidate list scored by `model` (student or teacher alike) in eval mode."""
    was_training = model.training
    model.eval()
    with runtime.autocast():
        scores = model.score_lists(queries, candidates, batch_size, runtime.device)
    model.train(was_training)
    return [s.float() for s in scores]


class RankingTask:
    """(query, [positive, negatives]) examples; models score them; MRR@10, nDCG@10, Recall@10 held out."""
    name, primary = FAMILY.name, FAMILY.primary

    def __init__(self, data, teacher, student, runtime, eval_batch_size: int):
        self.data, self.teacher, self.student = data, teacher, student
        self.rt, self.eval_batch_size = runtime, eval_batch_size
        self.runs: Dict[str, Dict[str, Dict[str, float]]] = {}  # who -> the last reported evaluation's run

    def prepare_student(self, student, hardware: Dict) -> Dict[str, float]:
        """Padding to a multiple of 8/16; the student's queries and passages tokenised once and, per batch, split
        into up to `length_groups` groups padded apart. A cross-encoder reads pairs: nothing to tokenise ahead."""
        from kdrun.data.tokens import tokenize_once
        from kdrun.models.encoders import CrossEncoder

        student.pad_multiple = hardware["pad_to_multiple_of"]
        if isinstance(student, CrossEncoder):
            return {}
        student.max_groups = hardware["length_groups"]
        return tokenize_once(student, self.train_texts())

    def loss_context(self) -> Dict:
        return {}

    def examples(self) -> list:
        return self.data.train

    def train_texts(self) -> List[str]:
        """Every text the student encodes in training (queries and passages), for tokenising once."""
        return [t for q, ps in self.data.train for t in (q, *ps)]

    def lengths(self) -> List[int]:
        """Bucketing keys: query tokens + longest passage's tokens when the student's texts are tokenised already,
        else characters."""
        table = getattr(self.student, "token_table", None)
        if table is None:
            return [example_length(ex) for ex in self.data.train]
        return token_lengths(table, self.data.train)

    def fingerprint(self) -> str:
        """SHA-256 of the training examples as a teacher sees them: query and passage texts, in order."""
        h = hashlib.sha256()
        for q, ps in self.data.train:
            h.update(("\x1f".join([q, *ps]) + "\x1e").encode())
        return h.hexdigest()

    def teacher_outputs(self, teacher) -> Dict[str, torch.Tensor]:
        return {"scores": precompute_teacher_scores(teacher, self.data.train, self.eval_batch_size, self.rt).cpu()}

    def attach(self, outputs: Dict[str, torch.Tensor]) -> list:
        """The training examples with the teacher's outputs (a row of each tensor) as their third item."""
        return [(q, ps, {k: v[i] for k, v in outputs.items()}) for i, (q, ps) in enumerate(self.data.train)]

    def collate(self, online: bool) -> Collate:
        return Collate(self.teacher if online else None, self.student)

    def evaluate(self, model, who: str, final: bool = True) -> Dict[str, float]:
        """The held-out metrics: by ir_measures for the reported evaluations (`final`: before and after training),
        by kdrun's own equal computation for the periodic ones. The run of a reported evaluation is kept for
        `eval_files`."""
        d = self.data
        scores = score_lists(model, d.eval_queries, d.eval_candidates, self.eval_batch_size, self.rt)
        if not final:
            judged = [list(d.qrels.get(q, {}).values()) for q in d.eval_qids]
            return fast_metrics(scores, d.eval_labels, pids=d.eval_pids, judged=judged, depth=d.eval_depth)
        run = as_run(d.eval_qids, d.eval_pids, scores)
        self.runs[who] = run
        return library_metrics(run, d.qrels, depth=d.eval_depth)

    def eval_files(self, directory: Path) -> List[Path]:
        """The last reported evaluations as TREC run files (run.student.trec, run.teacher.trec) and the held-out
        qrels (qrels.trec): any trec_eval or ir_measures reproduces the logged metrics from them."""
        d = self.data
        files = [write_run(Path(directory) / f"run.{who}.trec", run, f"kdrun-{who}") for who, run in self.runs.items()]
        return files + [write_qrels(Path(directory) / "qrels.trec", {q: d.qrels.get(q, {}) for q in d.eval_qids})]

    def eval_size(self) -> int:
        """Held-out examples one evaluation goes through (for the per-example latency metric)."""
        return len(self.data.eval_queries)

    def describe(self) -> str:
        return (f"held-out queries: {len(self.data.eval_queries)}, candidates per query: "
                f"{self.data.stats['eval_candidates_per_query']:.0f}")
