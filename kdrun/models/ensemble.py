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
