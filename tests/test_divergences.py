"""Classification / causal-LM divergences: known values and the properties the losses promise."""
import math

import pytest
import torch

from kdrun.losses.functional import (bd_kd, cross_entropy, forward_kl, jsd, listwise_kl, masked_mean, reverse_kl,
                                     skew_kl, skew_rkl, taid)

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
