"""Distillation losses as pure functions of tensors: no config, no state, fp32 math.

Ranking convention: scores have shape [B, n], one row per query, column 0 the positive passage and
columns 1..n-1 negatives. Every function returns a 0-dim mean over the batch.
"""
from __future__ import annotations

from typing import Optional

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
    return forward_kl(student_scores, teacher_scores, temperature=temperature)


def pointwise_mse(student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
    """Pointwise MSE: L = mean_{b,j} (s[b,j] - t[b,j])^2. The student must reproduce the teacher's
    absolute scores, scale and offset included: the baseline that Margin-MSE improves on when
    teacher and student architectures score on different scales."""
    _check_lists("pointwise_mse", student_scores, teacher_scores)
    return (student_scores.float() - teacher_scores.float()).pow(2).mean()


def _check_lists(name: str, s: torch.Tensor, t: torch.Tensor) -> None:
    if s.shape != t.shape or s.dim() != 2 or s.shape[1] < 2:
        raise ValueError(f"{name} expects [B, n>=2] scores of equal shape, got {tuple(s.shape)} and {tuple(t.shape)}")


# ---- distributions over classes or vocabulary -------------------------------------------------
# Shapes: logits [..., V] (e.g. [B, C] for classification, [B, L, V] for language models) and an
# optional mask [...] (True/1 = counts; padding and ignored tokens 0). Every function returns the
# mean over the counted positions of a per-position divergence summed over the last dimension.


def masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean of `values` over positions where mask is true (all positions when mask is None)."""
    if mask is None:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1.0)


def _kl_from_logprobs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) summed over the last dim; 0 * log 0 taken as 0. The difference is zeroed where p = 0
    before multiplying, so -inf logits give neither a NaN value nor a NaN gradient."""
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(p))
    return (p * diff).sum(-1)


def _log_mix(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """log(w * p + (1 - w) * q), computed stably in log space. -inf entries (probability 0) are
    clamped to the lowest finite value first: logaddexp(-inf, -inf) has a NaN gradient."""
    w = torch.tensor(weight_p, dtype=log_p.dtype, device=log_p.device)
    low = torch.finfo(log_p.dtype).min
    return torch.logaddexp(torch.log(w) + log_p.clamp(min=low), torch.log1p(-w) + log_q.clamp(min=low))


def _logprobs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: Optional[torch.Tensor] = None,
               temperature: float = 1.0) -> torch.Tensor:
    """Forward KL, KL(p_teacher || p_student) * T^2 (Hinton et al. 2015, "Distilling the Knowledge in a
    Neural Network"; with T=1 the usual token-level KD of language models). Mode-covering: the student
    is pushed to put mass wherever the teacher does."""
    kl = _kl_from_logprobs(_logprobs(teacher_logits, temperature), _logprobs(student_logits, temperature))
    return masked_mean(kl, mask) * temperature**2


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: Optional[torch.Tensor] = None,
               temperature: float = 1.0) -> torch.Tensor:
    """Reverse KL, KL(p_student || p_teacher) * T^2 (as in MiniLLM, Gu et al. 2024). Mode-seeking: the
    student concentrates on the teacher's high-probability tokens."""
    kl = _kl_from_logprobs(_logprobs(student_logits, temperature), _logprobs(teacher_logits, temperature))
    return masked_mean(kl, mask) * temperature**2


def jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: Optional[torch.Tensor] = None,
        beta: float = 0.5) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence (GKD, Agarwal et al. 2024), m = beta*p_t + (1-beta)*p_s:

        JSD_beta = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)

    beta = 0.5 is the symmetric JSD, bounded by log 2. Requires 0 < beta < 1."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd: beta={beta} must be in (0, 1)")
    log_t, log_s = _logprobs(teacher_logits), _logprobs(student_logits)
    log_m = _log_mix(log_t, log_s, beta)
    per = beta * _kl_from_logprobs(log_t, log_m) + (1 - beta) * _kl_from_logprobs(log_s, log_m)
    return masked_mean(per, mask)


def skew_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: Optional[torch.Tensor] = None,
            alpha: float = 0.1) -> torch.Tensor:
    """Skew KL (DistiLLM, Ko et al. 2024): KL(p_t || alpha*p_t + (1-alpha)*p_s). alpha=0 is forward KL;
    mixing in the teacher keeps the divergence finite and its gradient bounded."""
    log_t, log_s = _logprobs(teacher_logits), _logprobs(student_logits)
    return masked_mean(_kl_from_logprobs(log_t, _log_mix(log_t, log_s, alpha)), mask)


def skew_rkl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: Optional[torch.Tensor] = None,
             alpha: float = 0.1) -> torch.Tensor:
    """Skew reverse KL (DistiLLM, Ko et al. 2024): KL(p_s || alpha*p_s + (1-alpha)*p_t). alpha=0 is reverse KL."""
    log_t, log_s = _logprobs(teacher_logits), _logprobs(student_logits)
    return masked_mean(_kl_from_logprobs(log_s, _log_mix(log_s, log_t, alpha)), mask)


def taid(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float,
         mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """TAID (Shing et al. 2025, "Temporally Adaptive Interpolated Distillation"): the student matches an
    intermediate target that moves from itself towards the teacher as the interpolation t goes to 1:

        p_t = (1 - t) * stopgrad(p_s) + t * p_teacher,   L = KL(p_t || p_s)

    t = 1 is forward KL; t = 0 gives zero loss and zero gradient. The schedule that raises t (from
    t_start to 1, adaptively) belongs to the caller; this function is the per-step math."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"taid: t={t} must be in [0, 1]")
    log_s = _logprobs(student_logits)
    log_target = _log_mix(log_s.detach(), _logprobs(teacher_logits), 1.0 - t)
    return masked_mean(_kl_from_logprobs(log_target, log_s), mask)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Hard-label cross-entropy in fp32, mean over labels that are not ignore_index."""
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=ignore_index)
