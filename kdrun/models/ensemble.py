"""Several teachers as one: each scores the batch with its own tokenizer; the outputs are averaged with
weights ("scores" for ranking, "logits" for classification), and each teacher's own outputs stay
available as "<key>@<name>" for loss terms that name a teacher (loss.terms.NAME.teacher)."""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn


def combine(outputs: Dict[str, Dict[str, torch.Tensor]], weights: Dict[str, float]) -> Dict[str, torch.Tensor]:
    """{name: {"scores"|"logits": tensor}} -> the weighted mean, plus every teacher's own as "<key>@<name>"."""
    first = next(iter(outputs.values()))
    key = "scores" if "scores" in first else "logits"
    total = sum(weights[name] for name in outputs)
    mean = sum(weights[name] * out[key].float() for name, out in outputs.items()) / total
    return {key: mean, **{f"{key}@{name}": out[key] for name, out in outputs.items()}}


class Ensemble(nn.Module):
    """Frozen teachers of one task; "teacher" (the main one) lends its source and tokenizer to the student."""

    def __init__(self, members: Dict[str, nn.Module], weights: Dict[str, float]):
        super().__init__()
        self.members = nn.ModuleDict(members)
        self.weights = dict(weights)
        main = members["teacher"]
        self.source, self.tokenizer, self.max_length = main.source, main.tokenizer, main.max_length
        self.num_labels = getattr(main, "num_labels", None)

    @property
    def main(self) -> nn.Module:
        return self.members["teacher"]

    def request(self, outputs: set) -> None:
        for m in self.members.values():
            m.request(outputs)

    def featurize(self, *args) -> Dict[str, dict]:
        return {name: m.featurize(*args) for name, m in self.members.items()}

    def forward(self, features: Dict[str, dict]) -> Dict[str, torch.Tensor]:
        return combine({name: m(features[name]) for name, m in self.members.items()}, self.weights)

    @torch.inference_mode()
    def score_lists(self, queries: List[str], candidates: List[List[str]], batch_size: int, device) -> List[torch.Tensor]:
        lists = {name: m.score_lists(queries, candidates, batch_size, device) for name, m in self.members.items()}
        total = sum(self.weights.values())
        return [sum(self.weights[name] * lists[name][i] for name in lists) / total for i in range(len(queries))]

    @torch.inference_mode()
    def predict_logits(self, texts: List[str], batch_size: int, device) -> torch.Tensor:
        outs = {name: {"logits": m.predict_logits(texts, batch_size, device)} for name, m in self.members.items()}
        return combine(outs, self.weights)["logits"]


def fold_of(query: str, folds: int) -> int:
    """The fold a query belongs to (a stable hash of its text): the same on every machine and run."""
    import zlib

    return zlib.crc32(query.encode("utf-8")) % folds


class OutOfFold(nn.Module):
    """k ranking teachers, teacher f fine-tuned on the training queries outside fold f, as one teacher: each query is
    scored by the teacher that never trained on it (fold_of). A teacher fine-tuned on the very queries it then scores
    gives in-sample scores: confident where it memorised, and students distil that memorisation (chatterbot,
    bi-encoder student, seed 1: listwise KL 0.4062 MRR@10 from in-sample scores, 0.4519 from 2-fold out-of-fold ones,
    0.4432 without a teacher). Held-out queries are routed the same way, so the teacher's own evaluation measures
    the scores the students learn from. Precomputed scores only (score_lists); one fold's model is what a query costs."""

    def __init__(self, folds: List[nn.Module]):
        super().__init__()
        self.folds = nn.ModuleList(folds)
        first = folds[0]
        self.source, self.tokenizer, self.max_length = first.source, first.tokenizer, first.max_length
        for k in ("pooling", "similarity", "label_index"):
            if hasattr(first, k):
                setattr(self, k, getattr(first, k))

    @property
    def main(self) -> nn.Module:
        return self.folds[0]

    @property
    def cost_model(self) -> nn.Module:  # parameters and FLOPs per query: one fold's model runs for each
        return self.folds[0]

    def request(self, outputs: set) -> None:
        for m in self.folds:
            m.request(outputs)

    @torch.inference_mode()
    def score_lists(self, queries: List[str], candidates: List[List[str]], batch_size: int, device) -> List[torch.Tensor]:
        k = len(self.folds)
        mine = [fold_of(q, k) for q in queries]
        out: List[torch.Tensor] = [None] * len(queries)  # type: ignore[list-item]
        for f, model in enumerate(self.folds):
            idx = [i for i, g in enumerate(mine) if g == f]
            if idx:
                rows = model.score_lists([queries[i] for i in idx], [candidates[i] for i in idx], batch_size, device)
                for i, r in zip(idx, rows):
                    out[i] = r
        return out

    @property
    def outputs(self) -> set:  # what the loss asked of the teachers (their cache key holds it)
        return self.folds[0].outputs

    @property
    def optional_outputs(self) -> frozenset:
        return getattr(self.folds[0], "optional_outputs", frozenset())

    @torch.inference_mode()
    def embed_lists(self, queries: List[str], candidates: List[List[str]], batch_size: int, device):
        """Bi-encoder folds, for in-batch scores (kdrun.models.encoders.in_batch_from_embeddings): (queries [B, H],
        each by its own fold's teacher; candidates [B, k, n, H], by every fold's teacher, since another query of the
        batch may be scored against them; fold [B])."""
        k = len(self.folds)
        mine = torch.tensor([fold_of(q, k) for q in queries], dtype=torch.int64)
        q_out, p_out = None, []
        for f, model in enumerate(self.folds):
            q, p, _ = model.embed_lists(queries, candidates, batch_size, device)
            q_out = q.clone() if q_out is None else q_out
            q_out[mine == f] = q[mine == f]
            p_out.append(p)
        return q_out, torch.cat(p_out, dim=1), mine

    def featurize(self, *args):
        raise NotImplementedError("out-of-fold teachers score precomputed lists only (teacher.mode=precompute)")

    forward = featurize
