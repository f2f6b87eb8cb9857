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
    _check_lists("margin_mse", student_scores, teacher_scores)
    s, t = student_scores.float(), teacher_scores.float()
    s_margin = s[:, :1] - s[:, 1:]
    t_margin = t[:, :1] - t[:, 1:]
    return (s_margin - t_margin).pow(2).mean()


def listwise_kl(student_scores: torch.Tensor, teacher_scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Listwise KL (as in RocketQAv2 / Hofstaetter et al.'s listwise variants): per query, the KL
    divergence from the teacher's softmax over its n candidates to the student's:

        L = T^2 * mean_b sum_j p_t[b,j] * (log p_t[b,j] - log p_s[b,j]),
        p_t = softmax(t / T),  p_s = softmax(s / T)

    T^2 keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015). Like
    Margin-MSE it is invariant to a per-query constant added to either side's scores, but it also
    depends on the scale of score differences (softmax sharpness).
    """
    _check_lists("listwise_kl", student_scores, teacher_scores)
    log_p_s = torch.log_softmax(student_scores.float() / temperature, dim=-1)
    log_p_t = torch.log_softmax(teacher_scores.float() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return kl.mean() * temperature**2


def pointwise_mse(student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
    """Pointwise MSE: L = mean_{b,j} (s[b,j] - t[b,j])^2. The student must reproduce the teacher's
    absolute scores, scale and offset included: the baseline that Margin-MSE improves on when
    teacher and student architectures score on different scales."""
    _check_lists("pointwise_mse", student_scores, teacher_scores)
    return (student_scores.float() - teacher_scores.float()).pow(2).mean()


def _check_lists(name: str, s: torch.Tensor, t: torch.Tensor) -> None:
    if s.shape != t.shape or s.dim() != 2 or s.shape[1] < 2:
        raise ValueError(f"{name} expects [B, n>=2] scores of equal shape, got {tuple(s.shape)} and {tuple(t.shape)}")
