"""Representation losses, BD-KD, top-k teachers, in-batch negatives, TAID's schedule, and the term wiring."""
import math

import pytest
import torch

from kdrun.losses import Context, Taid, WeightedLoss
from kdrun.losses.functional import (attention_kl, attention_mse, bd_kd, feature_norm_direction, forward_kl,
                                     hidden_mse, in_batch_kl, jsd, listwise_kl, reverse_kl, skew_kl, skew_rkl, taid,
                                     topk_distributions)
from kdrun.models.encoders import own_scores


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(3, 5, 11), torch.randn(3, 5, 11)


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


def test_taid_interpolates_in_logit_space():
    s, t = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[-1.0, 2.0, 0.0]])
    for tt in (0.25, 0.5):
        target = torch.softmax((1 - tt) * torch.log_softmax(s, -1) + tt * torch.log_softmax(t, -1), -1)
        expected = (target * (target.log() - torch.log_softmax(s, -1))).sum().item()
        assert taid(s, t, tt).item() == pytest.approx(expected, rel=1e-5)


def test_hidden_mse_known_value_and_mask():
    s = torch.zeros(1, 3, 2)
    t = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert hidden_mse(s, t, mask).item() == pytest.approx((1.0 + 2.0) / 2)  # per token: mean over dims
    with pytest.raises(ValueError, match="project"):
        hidden_mse(torch.zeros(1, 3, 4), t)


def test_attention_losses_zero_at_equality_masked_and_head_averaged():
    torch.manual_seed(2)
    a = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    b = torch.softmax(torch.randn(2, 4, 5, 5), -1)
    for fn in (attention_mse, attention_kl):
        assert fn(a, a).item() == pytest.approx(0.0, abs=1e-6)
        assert fn(a, b).item() > 0
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    a2 = a.clone()
    a2[0, :, 3:, :] = 0.2  # padded query rows: ignored by both
    assert attention_kl(a2, b, mask).item() == pytest.approx(attention_kl(a, b, mask).item(), rel=1e-6)
    # a 2-head student against a 4-head teacher: both are averaged over heads
    two = a[:, :2]
    assert attention_mse(two, a).item() == pytest.approx(attention_mse(two.mean(1, True), a.mean(1, True)).item())


def test_feature_norm_direction_known_values():
    centres = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    labels = torch.tensor([0])
    big = torch.tensor([[5.0, 0.0]])
    assert feature_norm_direction(big, torch.tensor([[1.0, 0.0]]), centres, labels).item() == pytest.approx(0.0)
    # right direction but smaller than the teacher's norm: pushed to grow
    assert feature_norm_direction(torch.tensor([[1.0, 0.0]]), torch.tensor([[4.0, 0.0]]), centres,
                                  labels).item() == pytest.approx(0.75)
    assert feature_norm_direction(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]), centres,
                                  labels).item() == pytest.approx(1.0)  # orthogonal to its class


def test_in_batch_kl_and_own_scores():
    torch.manual_seed(3)
    s, t = torch.randn(3, 6), torch.randn(3, 6)  # 3 queries x (3 queries * 2 passages)
    assert in_batch_kl(s, t, temperature=2.0).item() == pytest.approx(listwise_kl(s, t, temperature=2.0).item())
    m = torch.arange(18.0).view(3, 6)
    assert own_scores(m, 2).tolist() == [[0.0, 1.0], [8.0, 9.0], [16.0, 17.0]]


def test_in_batch_scores_from_cached_embeddings_use_each_querys_own_fold_teacher():
    """kdrun.models.encoders.in_batch_from_embeddings: query b against every candidate of the batch, each candidate as
    query b's fold teacher encoded it, laid out like the student's in-batch scores (own list at b*n .. b*n+n-1)."""
    from kdrun.models.encoders import in_batch_from_embeddings

    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # 2 queries, H = 2
    p = torch.tensor([[[[1.0, 1.0], [2.0, 0.0]], [[3.0, 0.0], [0.0, 3.0]]],  # query 0's 2 candidates: fold 0, fold 1
                      [[[0.0, 1.0], [1.0, 0.0]], [[0.0, 5.0], [5.0, 5.0]]]])  # query 1's: fold 0, fold 1  [B, k, n, H]
    got = in_batch_from_embeddings(q, p, torch.tensor([0, 1]))
    # query 0 (fold 0): fold 0's vectors of every candidate; query 1 (fold 1): fold 1's
    assert got.tolist() == [[1.0, 2.0, 0.0, 1.0], [0.0, 6.0, 10.0, 10.0]]
    assert in_batch_from_embeddings(q, p, torch.tensor([1, 1]))[0].tolist() == [3.0, 0.0, 0.0, 5.0]
    one = p[:, :1]  # a single teacher (k = 1): its own-list columns are the plain dot products
    assert own_scores(in_batch_from_embeddings(q, one, torch.zeros(2, dtype=torch.long)), 2).tolist() == \
        torch.einsum("bh,bnh->bn", q, one[:, 0]).tolist()


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


def test_hidden_mse_term_learns_a_projection_when_widths_differ():
    ctx = Context(task="classification", student_hidden=4, teacher_hidden=6, student_layers=2, teacher_layers=6,
                  default_layer_map=[1, 6])
    loss = WeightedLoss([("hidden_mse", 1.0, {"layer_map": None}), ("kd_kl", 0.5, {"temperature": 2.0})], ctx)
    assert sum(p.numel() for p in loss.parameters()) == 4 * 6 + 6
    assert loss.needs == {"hidden_states"}
    s = {"hidden_states": tuple(torch.randn(2, 3, 4) for _ in range(3)), "logits": torch.randn(2, 4)}
    t = {"hidden_states": tuple(torch.randn(2, 3, 6) for _ in range(7)), "logits": torch.randn(2, 4)}
    out = loss(s, t, {"attention_mask": torch.ones(2, 3)})
    assert set(out) == {"loss", "hidden_mse", "kd_kl"}
    assert out["loss"].item() == pytest.approx(out["hidden_mse"].item() + 0.5 * out["kd_kl"].item(), rel=1e-6)
    out["loss"].backward()
    assert loss.terms[0].proj.weight.grad is not None
    with pytest.raises(ValueError, match="layer_map"):
        WeightedLoss([("hidden_mse", 1.0, {"layer_map": [1, 9]})], ctx)


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


def test_cross_entropy_term_reads_labels():
    loss = WeightedLoss([("ce", 1.0)], Context(task="classification"))
    out = loss({"logits": torch.tensor([[math.log(3.0), 0.0]])}, {}, {"labels": torch.tensor([0])})
    assert out["ce"].item() == pytest.approx(-math.log(0.75), rel=1e-6)


def test_attention_terms_see_no_attention_dropout(minilm_dir):
    """transformers returns attention probabilities after attention dropout: a training student's maps would be
    noise against the teacher's. The same model as student (training) and teacher gives attention terms of ~0 once
    the student's attention dropout is off; its hidden dropout stays (rows still sum to 1 with it on)."""
    import copy

    from torch import nn
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kdrun.models.classifier import SequenceClassifier

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2)
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    teacher = SequenceClassifier(copy.deepcopy(model), tok, 32).eval()
    student = SequenceClassifier(model, tok, 32).train()
    for name, module in student.model.named_modules():  # hidden dropout off: only attention dropout could differ
        if isinstance(module, nn.Dropout) and not name.endswith("attention.self.dropout"):
            module.p = 0.0
    assert model.config.attention_probs_dropout_prob > 0
    for m in (teacher, student):
        m.request({"attentions"})
    texts = ["the kernel panicked at boot", "a song about the sea and the stars"]
    features = student.featurize(texts)
    ctx = Context(task="classification", student_hidden=384, teacher_hidden=384, student_layers=6, teacher_layers=6)
    loss = WeightedLoss([("attention_kl", 1.0), ("attention_mse", 1.0)], ctx)
    with torch.no_grad():
        out = loss(student(features), teacher(features), {"attention_mask": features["attention_mask"]})
    assert out["attention_kl"].item() < 1e-5 and out["attention_mse"].item() < 1e-9, out
    for name, module in student.model.named_modules():  # hidden dropout back on: the maps are still distributions
        if isinstance(module, nn.Dropout) and not name.endswith("attention.self.dropout"):
            module.p = 0.1
    with torch.no_grad():
        rows = student(features)["attentions"][0].sum(-1)
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)


def test_tinybert_paper_attention_loss_on_raw_scores():
    """attention_mse form=scores: TinyBERT's code zeroes masked entries (<= -100) of the raw scores on both sides and
    takes the MSE over every entry, summed over layers."""
    from kdrun.losses.functional import attention_score_mse

    s = torch.tensor([[[[1.0, -1e4], [2.0, -1e4]]]])  # [B=1, H=1, L=2, L=2], key 2 masked
    t = torch.tensor([[[[0.0, -1e4], [4.0, -1e4]]]])
    assert attention_score_mse(s, t).item() == pytest.approx((1.0 + 4.0) / 4)
    ctx = Context(task="classification", student_hidden=2, teacher_hidden=2, student_layers=2, teacher_layers=2)
    loss = WeightedLoss([("attention_mse", 1.0, {"form": "scores"})], ctx)
    assert loss.needs == {"attention_scores"}
    out = loss({"attentions": (s, s)}, {"attentions": (t, t)}, {"attention_mask": torch.tensor([[1, 0]])})
    assert out["attention_mse"].item() == pytest.approx(2 * 1.25)  # summed over the two layers


def test_raw_attention_scores_softmax_to_the_eager_probabilities(minilm_dir):
    import copy

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kdrun.models.classifier import SequenceClassifier

    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).eval()
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    probs_model, scores_model = SequenceClassifier(model, tok, 32), SequenceClassifier(copy.deepcopy(model), tok, 32)
    probs_model.request({"attentions"})
    scores_model.request({"attention_scores"})
    features = probs_model.featurize(["a short one", "a much longer text about kernels and compilers"])
    with torch.no_grad():
        probs, scores = probs_model(features)["attentions"], scores_model(features)["attentions"]
        same_logits = torch.allclose(probs_model(features)["logits"], scores_model(features)["logits"], atol=1e-5)
    assert len(scores) == 6 and same_logits
    padded = features["attention_mask"] == 0  # the short text's padding columns
    assert bool((scores[0][padded[:, None, None, :].expand_as(scores[0])] <= -1e2).all())
    for p, s in zip(probs, scores):
        assert torch.allclose(torch.softmax(s, -1), p, atol=1e-6)
