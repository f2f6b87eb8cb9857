"""Distillation losses as pure functions of tensors: no config, no state, fp32 math.

Ranking convention: scores have shape [B, n], one row per query, column 0 the positive passage and
columns 1..n-1 negatives. Every function returns a 0-dim mean over the batch.
"""
from __future__ import annotations

import torch


def margin_mse(student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
    """Margin-MSE (Hofstaetter et al. 2020, "Improving Efficient Neural Ranking Models with
    Cross-Architecture Knowledge Distillation"):

        L = mean_{b, j>=1} ( (s[b,0] - s[b,j]) - (t[b,0] - t[b,j]) )^2

    Only margins are matched, so a constant added to all scores of a query (by student or teacher)
    changes nothing: teacher and student may live on different score scales. With one negative
    per query this is exactly the paper's MSE(s(q,p+) - s(q,p-), t(q,p+) - t(q,p-)).
    """
    if student_scores.shape != teacher_scores.shape or student_scores.dim() != 2 or student_scores.shape[1] < 2:
        raise ValueError(f"margin_mse expects [B, n>=2] scores of equal shape, got "
                         f"{tuple(student_scores.shape)} and {tuple(teacher_scores.shape)}")
    s, t = student_scores.float(), teacher_scores.float()
    s_margin = s[:, :1] - s[:, 1:]
    t_margin = t[:, :1] - t[:, 1:]
    return (s_margin - t_margin).pow(2).mean()
