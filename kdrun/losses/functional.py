"""Distillation losses as pure functions of tensors: no config, no state, fp32 math.

Ranking convention: scores have shape [B, n], one row per query, column 0 the positive passage and
columns 1..n-1 negatives. Every function returns a 0-dim mean over the batch.
"""
from __future__ import annotations

import math
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


def listwise_kl(student_scores: torch.Tensor, teacher_scores: torch.Tensor, temperature: float = 1.0,
                standardize: bool = False, teacher_scale: float = 1.0) -> torch.Tensor:
    """Listwise KL (as in RocketQAv2 / Hofstaetter et al.'s listwise variants): per query, the KL
    divergence from the teacher's softmax over its n candidates to the student's:

        L = T^2 * mean_b sum_j p_t[b,j] * (log p_t[b,j] - log p_s[b,j]),
        p_t = softmax(t / T),  p_s = softmax(s / T)

    T^2 keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015). Like
    Margin-MSE it is invariant to a per-query constant added to either side's scores, but it also
    depends on the scale of score differences (softmax sharpness). standardize=True matches the
    z-scored rows instead (see `standardize_rows`), so that a scale factor on either side changes nothing.
    teacher_scale multiplies the teacher's scores first: a cosine teacher's logits are its cosines times the
    scale it was trained at (its softmax over cosines alone is near uniform).
    """
    _check_lists("listwise_kl", student_scores, teacher_scores)
    teacher_scores = teacher_scores.float() * teacher_scale
    if standardize:
        student_scores, teacher_scores = standardize_rows(student_scores), standardize_rows(teacher_scores)
    return forward_kl(student_scores, teacher_scores, temperature=temperature)


def standardize_rows(scores: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each row z-scored, (x - mean) / std (Sun et al. 2024, "Logit Standardization in Knowledge Distillation"):
    a softmax over the result depends on neither a shift nor a positive scale of the row. For students that
    score on another scale than their teacher (ColBERT's sum of cosines against a bi-encoder's dot products:
    the student cannot reach the teacher's sharpness at any temperature shared by both sides), the KL then
    reads only the teacher's relative preferences."""
    x = scores.float()
    return (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True, correction=0) + eps)


def in_batch_ce(student_in_batch: torch.Tensor) -> torch.Tensor:
    """Hard labels, no teacher (the baseline of ranking distillation; DPR-style): per query b, cross-entropy over
    every passage of the batch, [B, B*n] with query b's own list (positive, then its sampled negatives) in columns
    b*n .. b*n+n-1, so the positive is column b*n and the other queries' passages are in-batch negatives:

        L = mean_b ( -s[b, b*n] + log sum_j exp s[b, j] )
    """
    s = student_in_batch.float()
    b = s.shape[0]
    if s.ndim != 2 or s.shape[1] % b:
        raise ValueError(f"in_batch_ce: expected [B, B*n] in-batch scores, got {tuple(s.shape)}")
    n = s.shape[1] // b
    return torch.nn.functional.cross_entropy(s, torch.arange(b, device=s.device) * n)


def list_ce(student_scores: torch.Tensor) -> torch.Tensor:
    """Hard labels over each query's own list only, [B, n] with the positive in column 0 (the cross-encoder's
    usual fine-tuning loss): L = mean_b ( -s[b, 0] + log sum_j exp s[b, j] )."""
    s = student_scores.float()
    if s.ndim != 2 or s.shape[1] < 2:
        raise ValueError(f"list_ce: expected [B, n >= 2] scores, got {tuple(s.shape)}")
    return torch.nn.functional.cross_entropy(s, s.new_zeros(s.shape[0], dtype=torch.long))


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
    """TAID (Shing et al. 2025, "TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge
    Transfer in Language Models"): the student matches an intermediate target that moves from itself towards
    the teacher as t goes to 1. As in the paper, the interpolation is in logit space:

        p_t = softmax((1 - t) * stopgrad(z_s) + t * z_teacher),   L = KL(p_t || p_s)

    t = 1 is forward KL; t = 0 gives zero loss and zero gradient. The schedule that raises t (from t_start
    to 1, adaptively) is state, so it lives in the loss term (kdrun.losses.Taid); this is the per-step math."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"taid: t={t} must be in [0, 1]")
    log_s = _logprobs(student_logits)
    # log-probabilities are logits shifted by a per-position constant, which softmax ignores; they are
    # finite-clamped so that -inf entries (ruled-out tokens) interpolate without NaN
    low = torch.finfo(log_s.dtype).min / 4
    mixed = (1.0 - t) * log_s.detach().clamp(min=low) + t * _logprobs(teacher_logits).clamp(min=low)
    return masked_mean(_kl_from_logprobs(torch.log_softmax(mixed, dim=-1), log_s), mask)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Hard-label cross-entropy in fp32, mean over labels that are not ignore_index."""
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=ignore_index)


def bd_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: Optional[torch.Tensor] = None,
          temperature: float = 1.0) -> torch.Tensor:
    """Balanced forward + reverse KL with per-sample weights (BD-KD, Amara et al. 2022, "BD-KD: Balancing
    the Divergences for Online Knowledge Distillation"). Each sample's weights follow the entropy gap
    between student and teacher: an under-confident student (H_s > H_t) gets more mode-seeking reverse
    KL, an over-confident one more mode-covering forward KL:

        w_rev = H_s / (H_s + H_t),  w_fwd = 1 - w_rev   (weights detached, per sample)
        L = T^2 * mean_b [ w_fwd * KL(p_t || p_s) + w_rev * KL(p_s || p_t) ]

    (The paper's sample-wise weighting is driven by the same entropy gap; this normalised form keeps the
    loss on the scale of one KL.) Equal distributions give w = 1/2 and zero loss."""
    log_t, log_s = _logprobs(teacher_logits, temperature), _logprobs(student_logits, temperature)
    h_t = -(log_t.exp() * torch.where(log_t.exp() > 0, log_t, torch.zeros_like(log_t))).sum(-1)
    h_s = -(log_s.exp() * torch.where(log_s.exp() > 0, log_s, torch.zeros_like(log_s))).sum(-1)
    w_rev = (h_s / (h_s + h_t).clamp(min=1e-12)).detach()
    per = (1 - w_rev) * _kl_from_logprobs(log_t, log_s) + w_rev * _kl_from_logprobs(log_s, log_t)
    return masked_mean(per, mask) * temperature**2


def dkd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, alpha: float = 1.0,
        beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022, "Decoupled Knowledge Distillation"): classical KD split at the target class y,
    the two parts weighted apart (logits [B, C], labels [B]; softmax at temperature T):

        TCKD = KL([p_t(y), 1 - p_t(y)] || [p_s(y), 1 - p_s(y)])        (target vs the rest, binary)
        NCKD = KL(p_t(. | not y) || p_s(. | not y))                     (among the non-target classes)
        L = T^2 * mean_b (alpha * TCKD + beta * NCKD)

    Classical KD is TCKD + (1 - p_t(y)) * NCKD: its non-target part is damped where the teacher is confident, which
    DKD undoes with its own weight beta (the paper: alpha=1, beta=8 on CIFAR-100, T=4)."""
    log_s, log_t = _logprobs(student_logits, temperature), _logprobs(teacher_logits, temperature)
    y = labels.long().unsqueeze(-1)
    target = torch.zeros_like(log_s, dtype=torch.bool).scatter_(-1, y, True)
    low = torch.finfo(log_s.dtype).min

    def binary(log_p):  # [log p(y), log (1 - p(y))]
        log_y = log_p.gather(-1, y)
        return torch.cat([log_y, torch.log1p(-log_y.exp().clamp(max=1 - 1e-7))], dim=-1)

    def others(logits):  # log-softmax over the non-target classes
        return torch.log_softmax(logits.float().masked_fill(target, low) / temperature, dim=-1)

    tckd = _kl_from_logprobs(binary(log_t), binary(log_s))
    nckd = _kl_from_logprobs(others(teacher_logits), others(student_logits))
    return (alpha * tckd + beta * nckd).mean() * temperature**2


def sinkhorn_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: Optional[torch.Tensor] = None,
                temperature: float = 2.0, epsilon: float = 0.1, iterations: int = 20) -> torch.Tensor:
    """SinKD (Cui et al. 2024, "SinKD: Sinkhorn Distance Minimization for Knowledge Distillation"), in the paper's
    batch-wise form: the batch's N student distributions p_s and N teacher distributions p_t (softmax at T of each
    row of logits [..., C]; masked positions left out) are two sets of points of equal mass 1/N; the cost of moving
    mass from student row i to teacher row j is C_ij = ||p_s,i - p_t,j||_1, and the loss is the entropic optimal
    transport cost

        L = <P, C>,   P = argmin_{P 1 = 1/N, P^T 1 = 1/N} <P, C> - epsilon H(P)

    with P found by `iterations` Sinkhorn scalings of exp(-C / epsilon) (rows, then columns), in the log domain, in
    fp32 (finite under fp16/bf16 autocast; no exp(-C/eps) underflow). Gradients flow through P and C, as in the
    paper's code, whose loss is this one x N x 0.002 (it scales rows and columns to 1, then weights the term)."""
    s, t = student_logits.float(), teacher_logits.float()
    s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1).bool()
        s, t = s[keep], t[keep]
    n = s.shape[0]
    if n == 0:
        return student_logits.float().sum() * 0.0
    p_s, p_t = torch.softmax(s / temperature, dim=-1), torch.softmax(t / temperature, dim=-1)
    cost = torch.cdist(p_s, p_t, p=1)  # [N, N]
    log_k = -cost / epsilon
    log_mass = -math.log(n)
    f = torch.zeros(n, device=cost.device)
    g = torch.zeros(n, device=cost.device)
    for _ in range(iterations):
        f = log_mass - torch.logsumexp(log_k + g[None, :], dim=1)
        g = log_mass - torch.logsumexp(log_k + f[:, None], dim=0)
    plan = torch.exp(f[:, None] + log_k + g[None, :])
    return (plan * cost).sum()


def pld(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
        temperature: float = 1.0) -> torch.Tensor:
    """Plackett-Luce distillation (PLD, Bassam, Zhu and Bian 2025, "PLD: A Choice-Theoretic List-Wise Knowledge
    Distillation"): the
    teacher's ranking of the classes as a Plackett-Luce target for the student, the true label first, then the other
    classes by the teacher's confidence, each choice weighted by the teacher's probability of that class:

        pi = [y, the other classes by p_t descending],   p_t = softmax(t / T)
        L = - mean_b sum_k p_t(pi_k) [ z_pi_k - log sum_{j >= k} exp z_pi_j ]

    z the student's logits (fp32). One loss, no separate cross-entropy and KD weights: the first choice is the
    label's cross-entropy weighted by p_t(y), the rest teach the teacher's order."""
    z, t = student_logits.float(), teacher_logits.float()
    p_t = torch.softmax(t / temperature, dim=-1)
    y = labels.long().unsqueeze(-1)
    by_teacher = p_t.scatter(-1, y, float("inf")).argsort(dim=-1, descending=True)  # the label first
    z_pi, w = z.gather(-1, by_teacher), p_t.gather(-1, by_teacher)
    suffix = torch.logcumsumexp(z_pi.flip(-1), dim=-1).flip(-1)  # log sum_{j >= k} exp z_pi_j
    return -(w * (z_pi - suffix)).sum(-1).mean()


def topk_distributions(student_logits: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                       teacher_topk_ids: torch.Tensor):
    """Teacher top-k -> both sides as (k+1)-way log-probabilities: the teacher's k tokens plus one "rest"
    bucket holding the remaining mass. Shapes: student_logits [..., V], teacher_topk_* [..., k] (log-probs
    already normalised over the full vocabulary, e.g. logits - logsumexp). Every divergence above applied
    to these is the exact divergence between the coarse-grained distributions, a lower bound on the
    full-vocabulary one (data-processing inequality) that is equal when the teacher's mass is all in its
    top k. Returns (student, teacher) log-probabilities of shape [..., k+1], fp32."""
    log_s = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, teacher_topk_ids.long())
    log_t = teacher_topk_logprobs.float()

    def with_rest(lp: torch.Tensor) -> torch.Tensor:
        rest = torch.log1p(-lp.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))
        return torch.cat([lp, rest], dim=-1)

    return with_rest(log_s), with_rest(log_t)


def hidden_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
               mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Hidden-state transfer (TinyBERT, Jiao et al. 2020, "TinyBERT: Distilling BERT for Natural Language
    Understanding"): L = mean over real tokens and dimensions of (h_s W - h_t)^2, where the caller has
    already applied the learned projection W when widths differ. Shapes [B, L, H]; mask [B, L]."""
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"hidden_mse: shapes {tuple(student_hidden.shape)} and {tuple(teacher_hidden.shape)} differ "
                         "(project the student first)")
    per_token = (student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1)
    return masked_mean(per_token, mask)


def _match_heads(s: torch.Tensor, t: torch.Tensor):
    """Attention maps [B, H, L, L]: as they are when head counts match, else both averaged over heads."""
    if s.shape[1] == t.shape[1]:
        return s, t
    return s.mean(1, keepdim=True), t.mean(1, keepdim=True)


def attention_mse(student_attn: torch.Tensor, teacher_attn: torch.Tensor,
                  mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention transfer (TinyBERT, Jiao et al. 2020): MSE between per-head attention maps [B, H, L, L],
    mean over heads, real query rows and real key columns (mask [B, L]). Different head counts: both
    sides are averaged over heads first."""
    s, t = _match_heads(student_attn.float(), teacher_attn.float())
    sq = (s - t).pow(2)  # [B, H, L, L]
    if mask is None:
        return sq.mean()
    m = mask.to(sq.dtype)
    pair = m[:, None, :, None] * m[:, None, None, :]  # query row and key column both real
    return (sq * pair).sum() / (pair.sum() * sq.shape[1]).clamp(min=1.0)


def attention_score_mse(student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
    """TinyBERT's attention loss as its paper and code define it (Jiao et al. 2020, eq. 8; task_distill.py): MSE
    between raw pre-softmax attention scores [B, H, L, L] (q k^T / sqrt(d) plus the additive mask), entries at or
    below -100 (the masked ones) set to 0 on both sides, mean over every entry. The paper sums this over layers
    (the term does). Different head counts: both sides averaged over heads first."""
    s, t = _match_heads(student_scores.float(), teacher_scores.float())
    s = torch.where(s <= -1e2, torch.zeros_like(s), s)
    t = torch.where(t <= -1e2, torch.zeros_like(t), t)
    return (s - t).pow(2).mean()


def attention_kl(student_attn: torch.Tensor, teacher_attn: torch.Tensor,
                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention-distribution transfer (MiniLM, Wang et al. 2020, "MiniLM: Deep Self-Attention
    Distillation"): per head and query row, KL(teacher attention row || student attention row), mean over
    heads and real query rows. Inputs are attention probabilities [B, H, L, L] (rows sum to 1 over real
    keys); heads are averaged first when their counts differ."""
    s, t = _match_heads(student_attn.float(), teacher_attn.float())
    tiny = torch.finfo(torch.float32).tiny
    kl = _kl_from_logprobs(t.clamp(min=tiny).log().where(t > 0, torch.full_like(t, float("-inf"))),
                           s.clamp(min=tiny).log())  # [B, H, L]
    if mask is None:
        return kl.mean()
    return masked_mean(kl, mask[:, None, :].expand_as(kl))


def feature_norm_direction(student_features: torch.Tensor, teacher_features: torch.Tensor,
                           class_centres: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ND loss (Wang et al. 2023, "Improving Knowledge Distillation via Regularizing Feature Norm and
    Direction"): pull the student's feature towards the direction of its class centre (here the teacher
    classifier's weight row for the label, as the issue asks) while pushing its norm up to at least the
    teacher's:

        L = mean_b [ 1 - <f_s, c_y / |c_y|> / max(|f_s|, |f_t|) ]

    f_s [B, H] (projected to the teacher's width), f_t [B, H], class_centres [C, H], labels [B]."""
    f_s, f_t = student_features.float(), teacher_features.float()
    e = torch.nn.functional.normalize(class_centres.float(), dim=-1)[labels.long()]
    norm = torch.maximum(f_s.norm(dim=-1), f_t.norm(dim=-1)).clamp(min=1e-12)
    return (1 - (f_s * e).sum(-1) / norm).mean()


def in_batch_kl(student_scores: torch.Tensor, teacher_scores: torch.Tensor, temperature: float = 1.0,
                standardize: bool = False, teacher_scale: float = 1.0) -> torch.Tensor:
    """In-batch negatives for bi-encoders (as in TAS-Balanced, Hofstaetter et al. 2021): every query is
    scored against every passage of the batch, [B, B*n], and the student's softmax over that row is matched
    to the teacher's: T^2 * mean_b KL(softmax(t_b / T) || softmax(s_b / T)). Passages of other queries act
    as extra negatives at no extra encoder cost. standardize=True z-scores each row of both sides first
    (`standardize_rows`); teacher_scale multiplies the teacher's scores first (as in `listwise_kl`)."""
    _check_lists("in_batch_kl", student_scores, teacher_scores)
    teacher_scores = teacher_scores.float() * teacher_scale
    if standardize:
        student_scores, teacher_scores = standardize_rows(student_scores), standardize_rows(teacher_scores)
    return forward_kl(student_scores, teacher_scores, temperature=temperature)
