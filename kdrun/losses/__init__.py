"""Loss terms: config names -> functions in losses.functional, combined as a weighted sum."""
from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import torch

from kdrun.losses import functional

LOSSES: Dict[str, Callable[..., torch.Tensor]] = {
    "margin_mse": functional.margin_mse,
    "listwise_kl": functional.listwise_kl,
    "pointwise_mse": functional.pointwise_mse,
}
TAKES_TEMPERATURE = {"listwise_kl"}


class WeightedLoss:
    """loss(student_scores, teacher_scores) -> {"loss": sum_i w_i * term_i, "<term_i>": term_i, ...}.

    terms: (name, weight) or (name, weight, temperature); the temperature goes to terms that take one.
    """

    def __init__(self, terms: Sequence[Tuple]):
        unknown = [t[0] for t in terms if t[0] not in LOSSES]
        if unknown:
            raise KeyError(f"unknown loss terms {unknown}; known: {sorted(LOSSES)}")
        self.terms = [(t[0], t[1], t[2] if len(t) > 2 else 1.0) for t in terms]

    def __call__(self, student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        total = None
        for name, weight, temperature in self.terms:
            extra = {"temperature": temperature} if name in TAKES_TEMPERATURE else {}
            value = LOSSES[name](student_scores, teacher_scores, **extra)
            out[name] = value.detach()
            total = weight * value if total is None else total + weight * value
        out["loss"] = total
        return out
