"""DKD (decoupled KD, Zhao et al. 2022), added through the loss-term seam: its spec, its function, its yaml."""
import math

import pytest
import torch

from kdrun.losses import Context, WeightedLoss
from kdrun.losses.functional import dkd, forward_kl


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def test_dkd_known_value():
    s, t, y = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([0])
    ps, pt = torch.softmax(s, -1).tolist()[0], torch.softmax(t, -1).tolist()[0]
    tckd = _kl([pt[0], 1 - pt[0]], [ps[0], 1 - ps[0]])
    nckd = _kl([pt[1] / (1 - pt[0]), pt[2] / (1 - pt[0])], [ps[1] / (1 - ps[0]), ps[2] / (1 - ps[0])])
    got = dkd(s, t, y, alpha=0.5, beta=2.0, temperature=1.0).item()
    assert got == pytest.approx(0.5 * tckd + 2.0 * nckd, rel=1e-5)
    # the temperature divides the logits, and T^2 scales the loss back (Hinton et al. 2015)
    assert dkd(s, t, y, temperature=2.0).item() == pytest.approx(4 * dkd(s / 2, t / 2, y, temperature=1.0).item(),
                                                                  rel=1e-5)


def test_dkd_recovers_classical_kd_and_is_zero_at_equality():
    """KD = TCKD + (1 - p_t(y)) NCKD (the paper's eq. 2): with beta = 1 - p_t(y), DKD is forward KL."""
    torch.manual_seed(0)
    s, t, y = torch.randn(1, 5), torch.randn(1, 5), torch.tensor([2])
    beta = 1 - torch.softmax(t, -1)[0, 2].item()
    assert dkd(s, t, y, alpha=1.0, beta=beta, temperature=1.0).item() == pytest.approx(forward_kl(s, t).item(),
                                                                                       rel=1e-5)
    assert dkd(t, t, y).item() == pytest.approx(0.0, abs=1e-6)
    assert dkd(s, t, y, temperature=4.0).item() > 0


def test_dkd_term_reads_logits_and_labels():
    torch.manual_seed(1)
    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    loss = WeightedLoss([("dkd", 1.0, {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}), ("ce", 1.0)],
                        Context(task="classification"))
    out = loss({"logits": s}, {"logits": t}, {"labels": y})
    assert out["dkd"].item() == pytest.approx(dkd(s, t, y).item())
    assert out["loss"].item() == pytest.approx(out["dkd"].item() + out["ce"].item())
