"""Ranking: batches of (query, [positive, negatives]) -> [B, n] scores; MRR@10, nDCG@10, Recall@10."""
from __future__ import annotations

import hashlib
import math
from typing import Dict, List, Sequence

import torch

from kdrun.data.ranking import Example
from kdrun.tasks.ranking import FAMILY


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
    """Mean over queries of MRR@k, nDCG@k (binary gains, log2 discount) and Recall@k.

    Candidates are ranked by descending score; ties keep candidate order (stable sort), which is
    why the eval candidate lists are shuffled when built.
    """
    if len(scores) != len(labels) or not scores:
        raise ValueError(f"ranking_metrics: {len(scores)} score lists for {len(labels)} label lists")
    mrr = ndcg = recall = 0.0
    for s, y in zip(scores, labels):
        order = torch.argsort(torch.as_tensor(s, dtype=torch.float32), descending=True, stable=True).tolist()
        ranked = [y[i] for i in order]
        n_rel = sum(y)
        top = ranked[:k]
        first = next((r for r, rel in enumerate(top, 1) if rel), None)
        mrr += 1.0 / first if first else 0.0
        dcg = sum(rel / math.log2(r + 1) for r, rel in enumerate(top, 1))
        ideal = sum(1.0 / math.log2(r + 1) for r in range(1, min(n_rel, k) + 1))
        ndcg += dcg / ideal if ideal else 0.0
        recall += sum(top) / n_rel if n_rel else 0.0
    n = len(scores)
    return {f"mrr_at_{k}": mrr / n, f"ndcg_at_{k}": ndcg / n, f"recall_at_{k}": recall / n}


def evaluate(model, queries: List[str], candidates: List[List[str]], labels: List[List[int]],
             batch_size: int, runtime) -> Dict[str, float]:
    """Score every candidate list with `model` (student or teacher alike) and compute the metrics."""
    was_training = model.training
    model.eval()
    with runtime.autocast():
        scores = model.score_lists(queries, candidates, batch_size, runtime.device)
    model.train(was_training)
    return ranking_metrics(scores, labels)


class RankingTask:
    """(query, [positive, negatives]) examples; models score them; MRR@10, nDCG@10, Recall@10 held out."""
    name, primary = FAMILY.name, FAMILY.primary

    def __init__(self, data, teacher, student, runtime, eval_batch_size: int):
        self.data, self.teacher, self.student = data, teacher, student
        self.rt, self.eval_batch_size = runtime, eval_batch_size

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

    def evaluate(self, model, who: str) -> Dict[str, float]:
        d = self.data
        return evaluate(model, d.eval_queries, d.eval_candidates, d.eval_labels, self.eval_batch_size, self.rt)

    def eval_size(self) -> int:
        """Held-out examples one evaluation goes through (for the per-example latency metric)."""
        return len(self.data.eval_queries)

    def describe(self) -> str:
        return (f"held-out queries: {len(self.data.eval_queries)}, candidates per query: "
                f"{self.data.stats['eval_candidates_per_query']:.0f}")
