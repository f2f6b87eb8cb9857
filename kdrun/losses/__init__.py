"""Loss terms: config names -> functions in losses.functional, combined as a weighted sum."""
from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import torch

from kdrun.losses import functional

LOSSES: Dict[str, Callable[..., torch.Tensor]] = {
    "margin_mse": functional.margin_mse,
}


class WeightedLoss:
    """loss(student_scores, teacher_scores) -> {"loss": sum_i w_i * term_i, "<term_i>": term_i, ...}."""

    def __init__(self, terms: Sequence[Tuple[str, float]]):
        unknown = [n for n, _ in terms if n not in LOSSES]
        if unknown:
            raise KeyError(f"unknown loss terms {unknown}; known: {sorted(LOSSES)}")
        self.terms = list(terms)

    def __call__(self, student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        total = None
        for name, weight in self.terms:
            value = LOSSES[name](student_scores, teacher_scores)
            out[name] = value.detach()
            total = weight * value if total is None else total + weight * value
        out["loss"] = total
        return out
