"""Representation losses (TinyBERT-style): hidden states through a layer map and a learned projection, attention
maps (probabilities and TinyBERT's raw scores), and feature norm and direction; the models hand them over without
attention dropout."""
import pytest
import torch

from kdrun.losses import Context, WeightedLoss
from kdrun.losses.functional import attention_kl, attention_mse, feature_norm_direction, hidden_mse


def test_hidden_mse_known_value_and_mask():
    s = torch.zeros(1, 3, 2)
    t = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [9.0, 9.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert hidden_mse(s, t, mask).item() == pytest.approx((1.0 + 2.0) / 2)  # per token: mean over dims
    with pytest.raises(ValueError, match="project"):
        hidden_mse(torch.zeros(1, 3, 4), t)


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


def test_attention_terms_see_no_attention_dropout(tiny_bert):
    """transformers returns attention probabilities after attention dropout: a training student's maps would be
    noise against the teacher's. The same model as student (training) and teacher gives attention terms of ~0 once
    the student's attention dropout is off; its hidden dropout stays (rows still sum to 1 with it on)."""
    import copy

    from torch import nn
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kdrun.models.classifier import SequenceClassifier

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    tok = AutoTokenizer.from_pretrained(tiny_bert)
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
    ctx = Context(task="classification", student_hidden=32, teacher_hidden=32, student_layers=6, teacher_layers=6)
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


def test_raw_attention_scores_softmax_to_the_eager_probabilities(tiny_bert):
    import copy

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kdrun.models.classifier import SequenceClassifier

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    tok = AutoTokenizer.from_pretrained(tiny_bert)
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
