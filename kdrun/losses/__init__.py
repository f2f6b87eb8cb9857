"""Loss terms: config names -> functions in losses.functional, combined as a weighted sum."""
from __future__ import annotations

import inspect
from typing import Callable, Dict, Sequence, Tuple

import torch

from kdrun.losses import functional

LOSSES: Dict[str, Callable[..., torch.Tensor]] = {
    "margin_mse": functional.margin_mse,
    "listwise_kl": functional.listwise_kl,
    "pointwise_mse": functional.pointwise_mse,
}


def _takes_temperature(name: str) -> bool:
    return "temperature" in inspect.signature(LOSSES[name]).parameters


class WeightedLoss:
    """loss(student_scores, teacher_scores) -> {"loss": sum_i w_i * term_i, "<term_i>": term_i, ...}.

    terms: (name, weight) or (name, weight, temperature); the temperature goes to terms that take one.
    """

    def __init__(self, terms: Sequence[Tuple]):
        unknown = [t[0] for t in terms if t[0] not in LOSSES]
        if unknown:
            raise KeyError(f"unknown loss terms {unknown}; known: {sorted(LOSSES)}")
        # (name, weight, keyword arguments), resolved once: the temperature goes where the function takes one
        self.terms = [(t[0], t[1], {"temperature": t[2] if len(t) > 2 else 1.0} if _takes_temperature(t[0]) else {})
                      for t in terms]

    def __call__(self, student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        total = None
        for name, weight, kwargs in self.terms:
            value = LOSSES[name](student_scores, teacher_scores, **kwargs)
            out[name] = value.detach()
            total = weight * value if total is None else total + weight * value
        out["loss"] = total
        return out
