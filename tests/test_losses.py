import pytest
import torch

from kdrun.losses import WeightedLoss
from kdrun.losses.functional import margin_mse


def test_margin_mse_known_value():
    s = torch.tensor([[3.0, 1.0], [0.0, 2.0]])  # student margins 2, -2
    t = torch.tensor([[0.9, 0.4], [0.5, 0.0]])  # teacher margins 0.5, 0.5
    expected = ((2 - 0.5) ** 2 + (-2 - 0.5) ** 2) / 2  # 4.25
    assert margin_mse(s, t).item() == pytest.approx(expected)


def test_margin_mse_several_negatives_averages_every_margin():
    s = torch.tensor([[1.0, 0.0, 2.0]])  # margins 1, -1
    t = torch.tensor([[0.0, 0.0, 0.0]])  # margins 0, 0
    assert margin_mse(s, t).item() == pytest.approx(1.0)


def test_margin_mse_zero_when_margins_match_and_invariant_to_per_query_shift():
    torch.manual_seed(0)
    t = torch.randn(8, 4)
    shift = torch.randn(8, 1) * 100  # a different score scale offset per query
    assert margin_mse(t + shift, t).item() == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(8, 4)
    assert margin_mse(s + shift, t).item() == pytest.approx(margin_mse(s, t).item(), rel=1e-4)
    assert margin_mse(s, t - shift).item() == pytest.approx(margin_mse(s, t).item(), rel=1e-4)


def test_margin_mse_is_fp32_for_half_inputs():
    torch.manual_seed(0)
    s, t = torch.randn(16, 2), torch.randn(16, 2)
    full = margin_mse(s, t)
    for dtype in (torch.float16, torch.bfloat16):
        low = margin_mse(s.to(dtype), t.to(dtype))
        assert low.dtype == torch.float32
        assert low.item() == pytest.approx(full.item(), rel=2e-2)


def test_margin_mse_gradient_pushes_student_margin_towards_teacher():
    s = torch.tensor([[0.0, 0.0]], requires_grad=True)
    margin_mse(s, torch.tensor([[1.0, 0.0]])).backward()
    assert s.grad[0, 0] < 0 < s.grad[0, 1]  # raise the positive, lower the negative


def test_margin_mse_rejects_bad_shapes():
    with pytest.raises(ValueError, match="expects"):
        margin_mse(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="expects"):
        margin_mse(torch.zeros(4, 1), torch.zeros(4, 1))


def test_weighted_loss_returns_total_and_every_term():
    s = torch.tensor([[3.0, 1.0], [0.0, 2.0]])
    t = torch.tensor([[0.9, 0.4], [0.5, 0.0]])
    out = WeightedLoss([("margin_mse", 0.5)])(s, t)
    assert set(out) == {"loss", "margin_mse"}
    assert out["margin_mse"].item() == pytest.approx(4.25)
    assert out["loss"].item() == pytest.approx(2.125)
    with pytest.raises(KeyError, match="known"):
        WeightedLoss([("nope", 1.0)])
