import pytest
import torch

from kdrun.losses import Context, WeightedLoss
from kdrun.losses import functional as F
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


RANKING = Context(task="ranking")


def test_weighted_loss_returns_total_and_every_term():
    s = torch.tensor([[3.0, 1.0], [0.0, 2.0]])
    t = torch.tensor([[0.9, 0.4], [0.5, 0.0]])
    out = WeightedLoss([("margin_mse", 0.5)], RANKING)({"scores": s}, {"scores": t}, {})
    assert set(out) == {"loss", "margin_mse"}
    assert out["margin_mse"].item() == pytest.approx(4.25)
    assert out["loss"].item() == pytest.approx(2.125)
    with pytest.raises(KeyError, match="known"):
        WeightedLoss([("nope", 1.0)], RANKING)


from kdrun.losses.functional import listwise_kl, pointwise_mse  # noqa: E402


def test_listwise_kl_known_value():
    s = torch.tensor([[0.0, 0.0]])  # student: uniform
    t = torch.tensor([[torch.log(torch.tensor(3.0)).item(), 0.0]])  # teacher: p = (3/4, 1/4)
    expected = 0.75 * torch.log(torch.tensor(0.75 / 0.5)) + 0.25 * torch.log(torch.tensor(0.25 / 0.5))
    assert listwise_kl(s, t).item() == pytest.approx(expected.item(), rel=1e-5)


def test_listwise_kl_properties():
    torch.manual_seed(0)
    s, t = torch.randn(16, 5), torch.randn(16, 5)
    assert listwise_kl(s, t).item() >= 0
    assert listwise_kl(t, t).item() == pytest.approx(0.0, abs=1e-6)
    shift = torch.randn(16, 1) * 50
    assert listwise_kl(s + shift, t - shift).item() == pytest.approx(listwise_kl(s, t).item(), rel=1e-4)
    low = listwise_kl(s.bfloat16(), t.bfloat16())
    assert low.dtype == torch.float32 and low.item() == pytest.approx(listwise_kl(s, t).item(), rel=5e-2)


def test_teacher_scale_turns_a_cosine_teachers_scores_into_its_logits():
    """teacher_scale: the teacher's scores times it before its softmax (a cosine teacher fine-tuned at scale 20 has
    logits 20 x cos); the student's side is untouched, and z-scored rows do not see it."""
    from kdrun.losses.functional import in_batch_kl

    torch.manual_seed(0)
    s, cos = torch.randn(4, 8) * 3, torch.rand(4, 8) * 2 - 1
    for fn in (listwise_kl, in_batch_kl):
        assert fn(s, cos, teacher_scale=20.0).item() == pytest.approx(fn(s, cos * 20).item(), rel=1e-6)
        assert fn(s, cos, teacher_scale=20.0).item() != pytest.approx(fn(s, cos).item(), rel=1e-3)
        assert fn(s, cos, teacher_scale=20.0, standardize=True).item() == pytest.approx(
            fn(s, cos, standardize=True).item(), rel=1e-5, abs=1e-7)
        assert fn(cos * 20, cos, teacher_scale=20.0).item() == pytest.approx(0.0, abs=1e-6)  # its own logits: 0
    flat, sharp = listwise_kl(torch.zeros(1, 4), torch.tensor([[0.9, 0.1, 0.0, -0.2]]), teacher_scale=1.0), \
        listwise_kl(torch.zeros(1, 4), torch.tensor([[0.9, 0.1, 0.0, -0.2]]), teacher_scale=20.0)
    assert flat < 0.2 < sharp  # a softmax over cosines alone is near uniform


def test_standardized_kl_reads_no_score_scale():
    """standardize=True (Sun et al. 2024's logit standardization): a positive scale and a shift of either side's
    rows change nothing, where the plain KL depends on the scale; a student that is an affine map of its teacher
    has loss 0; the known value is the KL of the z-scored rows."""
    from kdrun.losses.functional import in_batch_kl, standardize_rows

    torch.manual_seed(0)
    s, t = torch.randn(8, 40), torch.randn(8, 40)
    scale, shift = torch.rand(8, 1) * 5 + 0.2, torch.randn(8, 1) * 10
    for fn in (listwise_kl, in_batch_kl):
        base = fn(s, t, standardize=True).item()
        assert base > 0
        assert fn(s * scale + shift, t, standardize=True).item() == pytest.approx(base, rel=1e-4)
        assert fn(s, t * 3.0 - 1.0, standardize=True).item() == pytest.approx(base, rel=1e-4)
        assert fn(t * scale + shift, t, standardize=True).item() == pytest.approx(0.0, abs=1e-5)
        assert fn(s * 3.0, t).item() != pytest.approx(fn(s, t).item(), rel=1e-2)  # without it, scale matters
        assert fn(s, t, temperature=2.0, standardize=True).item() != pytest.approx(base, rel=1e-2)
    z = torch.tensor([[3.0, 1.0, -1.0, -3.0]])  # mean 0, population std sqrt(5)
    assert standardize_rows(z * 7 + 2)[0].tolist() == pytest.approx((z / 5 ** 0.5)[0].tolist(), rel=1e-5)
    assert listwise_kl(z.flip(-1), z, standardize=True).item() == pytest.approx(
        listwise_kl(z.flip(-1) / 5 ** 0.5, z / 5 ** 0.5).item(), rel=1e-5)
    flat = standardize_rows(torch.full((2, 5), 4.0))  # a row of ties: zeros, not NaN
    assert torch.equal(flat, torch.zeros(2, 5))


def test_pointwise_mse_known_value_and_scale_sensitivity():
    s = torch.tensor([[1.0, 2.0]])
    t = torch.tensor([[0.0, 0.0]])
    assert pointwise_mse(s, t).item() == pytest.approx(2.5)
    assert pointwise_mse(t + 3.0, t).item() == pytest.approx(9.0)  # unlike margin_mse, offsets count


def test_weighted_loss_passes_settings_and_refuses_those_a_term_does_not_take():
    s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    terms = [("listwise_kl", 1.0, {"temperature": 2.0}), ("margin_mse", 0.1)]
    out = WeightedLoss(terms, RANKING)({"scores": s}, {"scores": t}, {})
    assert out["listwise_kl"].item() == pytest.approx(listwise_kl(s, t, temperature=2.0).item())
    assert out["loss"].item() == pytest.approx(out["listwise_kl"].item() + 0.1 * out["margin_mse"].item())
    with pytest.raises(ValueError, match=r"margin_mse takes no \['temperature'\]; its settings: \['weight', 'teacher'\]"):
        WeightedLoss([("margin_mse", 1.0, {"temperature": 2.0})], RANKING)  # once silently dropped


def test_in_batch_ce_known_value_and_positive_columns():
    # 2 queries, n=2 (positive, one sampled negative): the positives sit at columns 0 and 2
    s = torch.tensor([[2.0, 0.0, 1.0, -1.0],
                      [0.5, 0.5, 3.0, 1.0]])
    want = (-(2.0 - torch.logsumexp(s[0], 0)) - (3.0 - torch.logsumexp(s[1], 0))) / 2
    assert F.in_batch_ce(s).item() == pytest.approx(want.item(), rel=1e-6)
    # a per-query shift changes nothing; other queries' passages count as negatives
    assert F.in_batch_ce(s + torch.tensor([[5.0], [-2.0]])).item() == pytest.approx(want.item(), rel=1e-6)
    harder = s.clone()
    harder[0, 3] = 10.0  # query 0 scores query 1's negative above its own positive
    assert F.in_batch_ce(harder) > F.in_batch_ce(s)
    with pytest.raises(ValueError, match="in_batch_ce"):
        F.in_batch_ce(torch.zeros(2, 3))


def test_ranking_ce_term_reads_only_the_students_in_batch_scores():
    loss = WeightedLoss([("ce", 1.0, {})], Context(task="ranking"))
    assert loss.needs == set() and loss.student_needs == {"in_batch_scores"}  # the teacher gives nothing extra
    s = {"scores": torch.zeros(2, 2), "in_batch_scores": torch.tensor([[2.0, 0.0, 1.0, -1.0], [0.5, 0.5, 3.0, 1.0]])}
    out = loss(s, {"scores": torch.full((2, 2), float("nan"))}, {})  # teacher scores are not read
    assert torch.isfinite(out["loss"]) and out["ce"] == out["loss"]


# ---- a user's own term, by _target_ (tests/plugins/my_terms.py) ----

def _parse(terms, task="ranking"):
    from kdrun.losses.specs import parse

    return parse(terms, task, ["teacher"], online=False)


def test_a_users_function_and_module_become_terms_with_their_settings_checked(monkeypatch):
    from pathlib import Path

    from kdrun.errors import ConfigError

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "plugins"))
    terms = _parse({"mine": {"_target_": "my_terms.scaled_margin_mse", "scale": 2.0, "weight": 0.5},
                    "gap": {"_target_": "my_terms.ScoreGap", "margin": 0.5}})
    assert terms["mine"].as_config() == {"_target_": "my_terms.scaled_margin_mse", "weight": 0.5, "scale": 2.0}
    loss = WeightedLoss(terms, RANKING)
    s, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 0.0]])
    out = loss({"scores": s}, {"scores": t}, {})
    assert out["mine"].item() == pytest.approx(0.0) and out["gap"].item() == pytest.approx(1.5 ** 2)
    assert [n for n, _ in loss.named_parameters()] == ["terms.1.module.margin"]  # trains with the student
    with pytest.raises(ConfigError, match=r"loss.terms.mine: my_terms.scaled_margin_mse takes no 'scal'; its "
                                          r"settings: \['weight', 'teacher', 'scale'\]"):
        _parse({"mine": {"_target_": "my_terms.scaled_margin_mse", "scal": 2.0}})
    with pytest.raises(ConfigError, match=r"is called as fn\(student_out, teacher_out, batch"):
        _parse({"mine": {"_target_": "my_terms.two_arguments"}})
    with pytest.raises(ConfigError, match="cannot import it"):
        _parse({"mine": {"_target_": "my_terms.nope"}})
    with pytest.raises(ConfigError, match="loss.terms.mine is a ranking loss, but data.task=classification"):
        _parse({"mine": {"_target_": "my_terms.scaled_margin_mse"}}, task="classification")  # its `tasks`


def test_a_loss_logged_before_terms_were_keyed_by_name_converts_for_reruns():
    from kdrun.losses.specs import from_list

    old = [{"name": "kd_kl", "weight": 0.5, "temperature": 2.0, "alpha": 0.1, "beta": 0.5, "t_start": 0.4,
            "t_end": 1.0, "taid_alpha": 5e-4, "taid_beta": 0.99, "layer_map": None, "teacher": None},
           {"name": "ce", "weight": 0.5, "temperature": 1.0, "alpha": 0.1, "beta": 0.5, "layer_map": None}]
    assert from_list(old) == {"kd_kl": {"weight": 0.5, "temperature": 2.0, "teacher": None},
                              "ce": {"weight": 0.5}}  # what the old run used: the settings each term takes
    assert set(_parse(from_list(old), task="classification")) == {"kd_kl", "ce"}
