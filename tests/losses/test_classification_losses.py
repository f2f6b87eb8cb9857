"""Classification losses beyond Hinton's KD (issues 23 and 24): DKD (decoupled KD, Zhao et al. 2022) by hand, SinKD
against a float64 transcription of the paper's Sinkhorn, Plackett-Luce distillation by hand, PS-KD's targets, the
dual-head student; each term's settings parsed and refused, and each stays finite under bf16 autocast. Their
end-to-end runs: tests/tasks/classification."""
import json
import math

import numpy as np
import pytest
import torch

from kdrun.losses import Context, WeightedLoss
from kdrun.losses import functional as F
from kdrun.losses.functional import dkd, forward_kl


# ---- DKD, added through the loss-term seam: its spec, its function, its yaml ----


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


# ---- SinKD ----


def _reference_sinkd(s, t, temperature, epsilon, iterations):
    """The paper's code in float64 numpy: rows then columns of exp(-C/eps) scaled to 1, <P, C>; divided by N (kdrun
    gives the rows and columns mass 1/N)."""
    def softmax(x):
        e = np.exp((x - x.max(-1, keepdims=True)) / 1.0)
        return e / e.sum(-1, keepdims=True)

    p_s, p_t = softmax(s / temperature), softmax(t / temperature)
    cost = np.abs(p_s[:, None, :] - p_t[None, :, :]).sum(-1)
    plan = np.exp(-cost / epsilon)
    for _ in range(iterations):
        plan = plan / plan.sum(1, keepdims=True)
        plan = plan / plan.sum(0, keepdims=True)
    return (plan * cost).sum() / len(s)


@pytest.mark.parametrize("epsilon,iterations", [(0.1, 20), (0.5, 5), (0.05, 50)])
def test_sinkd_agrees_with_a_reference_sinkhorn(epsilon, iterations):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g) * 2, torch.randn(6, 5, generator=g) * 2
    got = F.sinkhorn_kd(s, t, temperature=2.0, epsilon=epsilon, iterations=iterations).item()
    want = _reference_sinkd(s.double().numpy(), t.double().numpy(), 2.0, epsilon, iterations)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_sinkd_properties_masked_rows_identical_sets_and_low_precision():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g)  # LM-shaped [B, L, V]
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2:] = False
    kept = F.sinkhorn_kd(s[mask], t[mask])
    junk_s, junk_t = s.clone(), t.clone()
    junk_s[1, 2:], junk_t[1, 2:] = 1e4, -1e4  # masked positions do not count
    assert F.sinkhorn_kd(junk_s, junk_t, mask=mask).item() == pytest.approx(kept.item(), rel=1e-6)
    # the same distributions: at small epsilon the plan stays on the diagonal, whose cost is 0
    assert F.sinkhorn_kd(t, t, epsilon=0.01, iterations=50).item() < 1e-3 < F.sinkhorn_kd(s, t).item()
    # bf16 autocast and logits large enough that exp(-C/eps) underflows outside the log domain: finite, with gradients
    big = (s * 60).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.sinkhorn_kd(big.bfloat16(), (t * 60).bfloat16(), epsilon=0.001, iterations=30)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(big.grad).all()


# ---- Plackett-Luce distillation ----


def test_pld_known_value_by_hand():
    z, t, y = [1.0, 2.0, 0.0], [0.0, 2.0, 1.0], 0
    p = [math.exp(v) / sum(math.exp(u) for u in t) for v in t]
    order = [0, 1, 2]  # the label, then the teacher's order of the others (class 1: 0.665, class 2: 0.245)
    want = -sum(p[order[k]] * (z[order[k]] - math.log(sum(math.exp(z[j]) for j in order[k:]))) for k in range(3))
    got = F.pld(torch.tensor([z]), torch.tensor([t]), torch.tensor([y])).item()
    assert got == pytest.approx(want, rel=1e-6) and got == pytest.approx(0.21110, abs=1e-4)


def test_pld_orders_by_the_teacher_puts_the_label_first_and_is_translation_invariant():
    g = torch.Generator().manual_seed(2)
    z, t, y = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g), torch.tensor([0, 3, 5, 1, 2])
    base = F.pld(z, t, y)
    assert F.pld(z + 7.0, t, y).item() == pytest.approx(base.item(), rel=1e-5)  # shift of the student's logits
    # a teacher certain of the label: the first choice's cross-entropy alone
    sure = torch.full((5, 6), -1e4).scatter(1, y[:, None], 1e4)
    ce = torch.nn.functional.cross_entropy(z, y)
    assert F.pld(z, sure, y).item() == pytest.approx(ce.item(), rel=1e-5)
    # a student that ranks as the teacher does loses less than one ranking the other way round
    agree = t.scatter(1, y[:, None], 10.0)
    assert F.pld(agree * 3, t, y) < F.pld(-agree * 3, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(F.pld(z.bfloat16() * 100, t.bfloat16(), y))


# ---- PS-KD ----


def test_pskd_targets_mix_labels_with_the_students_last_prediction_of_each_example():
    from kdrun.losses.terms import PSKD

    term = PSKD(alpha_T=0.8, total_batches=4)
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    feats = {"input_ids": ids, "attention_mask": (ids > 0).long()}
    labels = torch.tensor([0, 2])
    z1 = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.5]])
    # first visit: alpha 0, the labels alone (plain cross-entropy)
    first = term({"logits": z1}, {}, {"student": feats, "labels": labels})
    assert first.item() == pytest.approx(torch.nn.functional.cross_entropy(z1, labels).item(), rel=1e-6)
    # second visit (alpha = 0.8 * 1/4): the target mixes the label with the first visit's prediction
    z2 = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    got = term({"logits": z2}, {}, {"student": feats, "labels": labels}).item()
    a = 0.2
    prev = torch.softmax(z1, -1).half().float()
    target = (1 - a) * torch.nn.functional.one_hot(labels, 3).float() + a * prev
    assert got == pytest.approx(-(target * torch.log_softmax(z2, -1)).sum(-1).mean().item(), rel=1e-5)
    assert term.logs()["pskd_alpha"] == pytest.approx(0.4)
    # padding does not change an example's identity; the memory goes into checkpoints
    padded = {"input_ids": torch.tensor([[5, 6, 7, 0, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1, 0, 0, 0]])}
    assert PSKD.keys(padded)[0] == PSKD.keys(feats)[0]
    again = PSKD(alpha_T=0.8, total_batches=4)
    again.load_state_dict(term.state_dict())
    assert again.calls == 2 and set(again.memory) == set(term.memory)
    term.eval()  # evaluation neither counts nor remembers
    term({"logits": z2}, {}, {"student": feats, "labels": labels})
    assert term.calls == 2


# ---- the dual-head student ----


def test_a_dual_head_student_mixes_its_heads_and_the_term_trains_each_on_its_own_signal(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kdrun.losses.terms import DualHead
    from kdrun.models.classifier import SequenceClassifier, mix_heads

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    student = SequenceClassifier(model, AutoTokenizer.from_pretrained(tiny_bert), 32)
    student.request({"dual_head"})  # what loss=dual_head asks for: a second head, a copy of the first
    term = DualHead(label_weight=0.25, temperature=2.0, alpha=0.7)
    term.configure_student(student)
    assert student.dual_head == 0.7 and torch.equal(student.kd_head.weight, model.classifier.weight)
    with torch.no_grad():
        student.kd_head.weight.add_(torch.randn_like(student.kd_head.weight))
    student.eval()
    texts = ["cats drink milk", "the market fell today"]
    out = student(student.featurize(texts))
    want = torch.log(0.7 * torch.softmax(out["logits_label"], -1) + 0.3 * torch.softmax(out["logits_kd"], -1))
    assert torch.allclose(out["logits"], want, atol=1e-5)
    assert torch.allclose(student.predict_logits(texts, 2, torch.device("cpu")), out["logits"], atol=1e-5)
    assert torch.allclose(mix_heads(out["logits_label"], out["logits_kd"], 1.0),
                          torch.log_softmax(out["logits_label"], -1), atol=1e-6)  # alpha 1: the label head alone
    teacher, labels = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]), torch.tensor([0, 2])
    loss = term(out, {"logits": teacher}, {"labels": labels})
    ce = torch.nn.functional.cross_entropy(out["logits_label"], labels)
    kl = F.forward_kl(out["logits_kd"], teacher, temperature=2.0)
    assert loss.item() == pytest.approx((0.25 * ce + 0.75 * kl).item(), rel=1e-6)
    student.train()
    term(student(student.featurize(texts)), {"logits": teacher}, {"labels": labels}).backward()
    assert student.kd_head.weight.grad.abs().sum() > 0 and model.classifier.weight.grad.abs().sum() > 0
    student.save(tmp_path / "s")
    assert (tmp_path / "s" / "kdrun_kd_head.pt").is_file()
    assert json.loads((tmp_path / "s" / "kdrun_scorer.json").read_text())["dual_head"] == 0.7


# ---- the terms' settings, and bf16 ----


def test_the_new_terms_parse_with_their_settings_and_refuse_bad_ones():
    from kdrun.errors import ConfigError
    from kdrun.losses import specs

    got = specs.parse({"sinkd": {"epsilon": 0.2, "iterations": 5}}, "causal_lm", ["teacher"], online=True)
    assert got["sinkd"].settings() == {"temperature": 2.0, "epsilon": 0.2, "iterations": 5}
    with pytest.raises(ConfigError, match="epsilon=0.0 must be > 0"):
        specs.parse({"sinkd": {"epsilon": 0.0}}, "classification", ["teacher"], online=True)
    with pytest.raises(ConfigError, match="iterations=0 must be >= 1"):
        specs.parse({"sinkd": {"iterations": 0}}, "classification", ["teacher"], online=True)
    with pytest.raises(ConfigError, match="pld"):
        specs.parse({"pld": {}}, "causal_lm", ["teacher"], online=True)


def test_the_term_modules_stay_finite_under_bf16_autocast():
    from kdrun.losses.terms import Context, DualHead, EmbeddingAlign, PSKD

    g = torch.Generator().manual_seed(3)
    z, t = (torch.randn(4, 5, generator=g) * 30).bfloat16(), (torch.randn(4, 5, generator=g) * 30).bfloat16()
    labels = torch.tensor([0, 1, 2, 3])
    ids = torch.arange(12).view(4, 3) + 1
    pskd = PSKD(alpha_T=0.8, total_batches=2)
    emb = EmbeddingAlign(Context(task="ranking", student_hidden=8, teacher_hidden=6), "cosine")
    s_emb = {"query_emb": torch.randn(4, 8, generator=g).bfloat16(), "passage_emb": torch.randn(4, 3, 8, generator=g).bfloat16()}
    t_emb = {"query_emb": torch.randn(4, 6, generator=g).bfloat16(), "passage_emb": torch.randn(4, 3, 6, generator=g).bfloat16()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):  # pskd's second visit reads its memory
            assert torch.isfinite(pskd({"logits": z}, {}, {"student": {"input_ids": ids}, "labels": labels}))
        assert torch.isfinite(emb(s_emb, t_emb, {}))
        assert torch.isfinite(DualHead(0.5, 2.0, 0.5)({"logits_label": z, "logits_kd": z * 2}, {"logits": t},
                                                      {"labels": labels}))
