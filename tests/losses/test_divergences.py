"""Token- and class-level divergences (classification and causal LM) as pure functions: forward/reverse KL, JSD,
skew KL (DistiLLM), TAID's interpolation and schedule, BD-KD's entropy weighting, and top-k teachers. Known values
and the properties the losses promise."""
import math

import pytest
import torch

from kdrun.losses import Context, Taid, WeightedLoss
from kdrun.losses.functional import (bd_kd, cross_entropy, forward_kl, jsd, listwise_kl, masked_mean, reverse_kl,
                                     skew_kl, skew_rkl, taid, topk_distributions)


ALL = {
    "forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "skew_kl": skew_kl, "skew_rkl": skew_rkl,
    "taid_half": lambda s, t, mask=None: taid(s, t, 0.5, mask), "bd_kd": bd_kd,
}


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(3, 5, 11), torch.randn(3, 5, 11)  # [B, L, V]


def test_forward_and_reverse_kl_known_values():
    s = torch.tensor([[0.0, 0.0]])  # uniform
    t = torch.tensor([[math.log(3.0), 0.0]])  # (3/4, 1/4)
    fwd = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    rev = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert forward_kl(s, t).item() == pytest.approx(fwd, rel=1e-5)
    assert reverse_kl(s, t).item() == pytest.approx(rev, rel=1e-5)
    assert reverse_kl(s, t).item() == pytest.approx(forward_kl(t, s).item(), rel=1e-6)


def test_jsd_known_value_symmetry_and_bound():
    s, t = torch.tensor([[50.0, -50.0]]), torch.tensor([[-50.0, 50.0]])  # disjoint one-hots
    assert jsd(s, t).item() == pytest.approx(math.log(2), rel=1e-4)
    torch.manual_seed(1)
    a, b = torch.randn(4, 7), torch.randn(4, 7)
    assert jsd(a, b).item() == pytest.approx(jsd(b, a).item(), rel=1e-5)
    with pytest.raises(ValueError, match="beta"):
        jsd(a, b, beta=1.0)


@pytest.mark.parametrize("name", sorted(ALL))
def test_zero_when_equal_and_nonnegative(name, logits):
    s, t = logits
    fn = ALL[name]
    assert fn(t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert fn(s, t).item() >= 0.0


@pytest.mark.parametrize("name", sorted(ALL))
def test_masked_positions_are_ignored(name, logits):
    s, t = logits
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[:, 3:] = False  # padding
    s2 = s.clone()
    s2[:, 3:] = torch.randn(3, 2, 11) * 100  # garbage where the mask is off
    fn = ALL[name]
    assert fn(s2, t, mask=mask).item() == pytest.approx(fn(s, t, mask=mask).item(), rel=1e-6)
    assert fn(s[:, :3], t[:, :3]).item() == pytest.approx(fn(s, t, mask=mask).item(), rel=1e-5)


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_fp32_close_results(name, dtype, logits):
    s, t = logits
    fn = ALL[name]
    low = fn(s.to(dtype), t.to(dtype))
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(fn(s.to(dtype).float(), t.to(dtype).float()).item(), rel=1e-5)
    assert low.item() == pytest.approx(fn(s, t).item(), rel=5e-2)


def test_skew_divergences_reduce_to_plain_kl_at_alpha_zero(logits):
    s, t = logits
    assert skew_kl(s, t, alpha=0.0).item() == pytest.approx(forward_kl(s, t).item(), rel=1e-5)
    assert skew_rkl(s, t, alpha=0.0).item() == pytest.approx(reverse_kl(s, t).item(), rel=1e-5)
    assert skew_kl(s, t, alpha=0.5).item() < forward_kl(s, t).item()


def test_taid_endpoints(logits):
    s, t = logits
    assert taid(s, t, 1.0).item() == pytest.approx(forward_kl(s, t).item(), rel=1e-5)
    s0 = s.clone().requires_grad_(True)
    loss = taid(s0, t, 0.0)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    assert s0.grad.abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="t="):
        taid(s, t, 1.5)


@pytest.mark.parametrize("fn", [forward_kl, listwise_kl, bd_kd], ids=["forward_kl", "listwise_kl", "bd_kd"])
def test_kl_temperature_scaling_keeps_gradients_comparable(fn):
    # T^2 (Hinton et al.): for large T the gradient tends to a T-independent logit matching
    torch.manual_seed(2)
    s0, t = torch.randn(8, 10) * 0.1, torch.randn(8, 10) * 0.1
    norms = []
    for temp in (1.0, 4.0, 16.0):
        s = s0.clone().requires_grad_(True)
        fn(s, t, temperature=temp).backward()
        norms.append(s.grad.norm().item())
    assert max(norms) / min(norms) < 2.0, norms


def test_minus_inf_logits_give_finite_values_and_gradients():
    t = torch.tensor([[0.0, float("-inf"), 1.0]])  # a token the teacher rules out
    s = torch.tensor([[0.5, float("-inf"), 0.0]], requires_grad=True)
    for fn in (forward_kl, reverse_kl, jsd, skew_kl, skew_rkl, bd_kd, lambda a, b: taid(a, b, 0.5)):
        value = fn(s, t)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(s.grad).all(), fn
        s.grad = None


def test_cross_entropy_and_masked_mean_known_values():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, -100])  # the second label is ignored
    assert cross_entropy(logits, labels).item() == pytest.approx(-math.log(0.75), rel=1e-6)
    assert masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1, 1, 0])).item() == 2.0


# ---- BD-KD ----


def test_bd_kd_properties_and_known_value():
    s = torch.tensor([[0.0, 0.0]])  # uniform: entropy log 2
    t = torch.tensor([[math.log(3.0), 0.0]])  # (3/4, 1/4)
    h_s, h_t = math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    w_rev = h_s / (h_s + h_t)
    expected = (1 - w_rev) * forward_kl(s, t).item() + w_rev * reverse_kl(s, t).item()
    assert bd_kd(s, t).item() == pytest.approx(expected, rel=1e-5)
    torch.manual_seed(1)
    a, b = torch.randn(6, 9), torch.randn(6, 9)
    assert bd_kd(a, b).item() > 0 and bd_kd(b, b).item() == pytest.approx(0.0, abs=1e-6)
    # an under-confident student (higher entropy than the teacher) leans on the mode-seeking reverse KL
    flat, sharp = torch.zeros(1, 4), torch.tensor([[6.0, 0.0, 0.0, 0.0]])
    rev_share = (bd_kd(flat, sharp) - forward_kl(flat, sharp)) / (reverse_kl(flat, sharp) - forward_kl(flat, sharp))
    assert rev_share.item() > 0.5


# ---- top-k teachers ----


def test_topk_teacher_equals_full_when_k_covers_the_vocabulary(logits):
    s, t = logits
    lp = torch.log_softmax(t, -1)
    values, ids = lp.topk(t.shape[-1] - 1, dim=-1)  # all but one token: the rest bucket holds the last one
    cs, ct = topk_distributions(s, values, ids)
    for fn in (forward_kl, reverse_kl, jsd, skew_kl, skew_rkl):
        assert fn(cs, ct).item() == pytest.approx(fn(s, t).item(), rel=1e-4), fn.__name__
    assert torch.allclose(cs.exp().sum(-1), torch.ones(3, 5), atol=1e-5)


def test_topk_teacher_is_a_lower_bound_and_zero_at_equality(logits):
    s, t = logits
    values, ids = torch.log_softmax(t, -1).topk(3, dim=-1)
    cs, ct = topk_distributions(s, values, ids)
    assert 0 <= forward_kl(cs, ct).item() <= forward_kl(s, t).item()
    same_s, same_t = topk_distributions(t, values, ids)
    assert forward_kl(same_s, same_t).item() == pytest.approx(0.0, abs=1e-6)


def test_distribution_terms_read_a_topk_teacher_and_the_loss_mask():
    torch.manual_seed(4)
    s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    values, ids = torch.log_softmax(t, -1).topk(8, dim=-1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    loss = WeightedLoss([("forward_kl", 1.0, {"temperature": 1.0})], Context(task="causal_lm"))
    full = loss({"logits": s}, {"logits": t}, {"loss_mask": mask})["forward_kl"]
    top = loss({"logits": s}, {"topk_logprobs": values, "topk_ids": ids}, {"loss_mask": mask})["forward_kl"]
    assert top.item() == pytest.approx(full.item(), rel=1e-4)
    assert full.item() == pytest.approx(forward_kl(s, t, mask).item())


# ---- TAID ----


def test_taid_interpolates_in_logit_space():
    s, t = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[-1.0, 2.0, 0.0]])
    for tt in (0.25, 0.5):
        target = torch.softmax((1 - tt) * torch.log_softmax(s, -1) + tt * torch.log_softmax(t, -1), -1)
        expected = (target * (target.log() - torch.log_softmax(s, -1))).sum().item()
        assert taid(s, t, tt).item() == pytest.approx(expected, rel=1e-5)


def _taid_ts(losses, alpha=0.3):
    term = Taid(t_start=0.4, t_end=1.0, taid_alpha=alpha, taid_beta=0.5, total_batches=10)
    ts = []
    for loss in losses:
        term._update(loss)
        ts.append(term.t)
    return ts


def test_taid_schedule_rises_from_t_start_to_t_end_and_adapts_to_progress():
    falling = _taid_ts([5.0, 4.0, 3.0, 2.5, 2.0, 1.8, 1.6, 1.5, 1.4, 1.3, 1.2])
    assert falling[0] == 0.4 and all(b >= a for a, b in zip(falling, falling[1:]))
    assert falling[-1] == pytest.approx(1.0)
    linear_floor = [0.4 + 0.6 * min(1.0, n / 10) for n in range(1, 12)]
    assert all(t >= f - 1e-12 for t, f in zip(falling[1:], linear_floor[1:]))
    # adaptive: a student whose loss keeps falling moves its target towards the teacher faster
    rising = _taid_ts([1.0, 1.5, 2.0, 2.5, 3.0])
    assert falling[2] > rising[2] >= linear_floor[2] - 1e-12
    assert _taid_ts([1.0, 1.5, 2.0], alpha=0.0)[2] == pytest.approx(linear_floor[2])  # no step: the linear floor


def test_taid_term_logs_t_and_only_moves_in_training():
    loss = WeightedLoss([("taid", 1.0, {"t_start": 0.4, "t_end": 1.0, "taid_alpha": 0.5, "taid_beta": 0.5})],
                        Context(task="causal_lm", total_batches=4))
    s, t = {"logits": torch.randn(2, 3, 7)}, {"logits": torch.randn(2, 3, 7)}
    loss.eval()
    loss(s, t, {})
    loss(s, t, {})
    assert loss.logs() == {"taid_t": 0.4}
    loss.train()
    loss(s, t, {})
    loss(s, t, {})
    assert loss.logs()["taid_t"] > 0.4
