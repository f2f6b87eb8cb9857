"""Ranking losses as pure functions of score tensors: Margin-MSE (Hofstaetter et al. 2020), listwise and in-batch
KL (with a teacher's logit scale and Sun et al.'s standardization), pointwise MSE, and the hard-label cross-entropies
over a query's own list and over the batch. Known values, the invariances each promises, fp32 for half inputs."""
import pytest
import torch

from kdrun.losses import Context, WeightedLoss
from kdrun.losses import functional as F
from kdrun.losses.functional import in_batch_kl, listwise_kl, margin_mse, pointwise_mse
from kdrun.models.encoders import own_scores

RANKING = Context(task="ranking")


# ---- Margin-MSE ----


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


# ---- listwise and in-batch KL ----


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
    from kdrun.losses.functional import standardize_rows

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


# ---- pointwise MSE ----


def test_pointwise_mse_known_value_and_scale_sensitivity():
    s = torch.tensor([[1.0, 2.0]])
    t = torch.tensor([[0.0, 0.0]])
    assert pointwise_mse(s, t).item() == pytest.approx(2.5)
    assert pointwise_mse(t + 3.0, t).item() == pytest.approx(9.0)  # unlike margin_mse, offsets count


# ---- hard labels: the cross-entropy over the batch and over a query's own list ----


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


def test_list_ce_is_the_cross_entropy_of_column_zero():
    from kdrun.losses import functional as F

    s = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    expected = [-2.0 + torch.logsumexp(s[0], 0).item(), -0.0 + torch.logsumexp(s[1], 0).item()]
    assert F.list_ce(s).item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    with pytest.raises(ValueError):
        F.list_ce(torch.zeros(3))


def test_ce_in_batch_is_a_ranking_setting():
    from kdrun.errors import ConfigError
    from kdrun.losses import specs

    assert specs.parse({"ce": {"in_batch": False}}, "ranking", ["teacher"], online=False)["ce"].in_batch is False
    with pytest.raises(ConfigError, match="loss.terms.ce.in_batch=False: in-batch negatives are a ranking setting"):
        specs.parse({"ce": {"in_batch": False}}, "classification", ["teacher"], online=False)


def test_ce_scale_turns_cosines_into_logits_for_ranking_only():
    """loss.terms.ce.scale (and teacher.finetune.scale): the scores times the scale before the softmax, as
    sentence-transformers' MultipleNegativesRankingLoss trains a cosine model at 20."""
    from kdrun.errors import ConfigError
    from kdrun.losses import Context, WeightedLoss, specs
    from kdrun.losses import functional as F

    cos = torch.tensor([[0.9, 0.2, 0.1, 0.3], [0.1, 0.4, 0.8, 0.5]])  # [B=2, B*n=4]
    for in_batch, plain in ((True, F.in_batch_ce), (False, F.list_ce)):
        scores = {"in_batch_scores": cos} if in_batch else {"scores": cos}
        scaled = WeightedLoss([("ce", 1.0, {"in_batch": in_batch, "scale": 20.0})], Context(task="ranking"))
        unscaled = WeightedLoss([("ce", 1.0, {"in_batch": in_batch})], Context(task="ranking"))
        assert scaled(scores, {}, {})["loss"].item() == pytest.approx(plain(cos * 20).item(), rel=1e-6)
        assert unscaled(scores, {}, {})["loss"].item() == pytest.approx(plain(cos).item(), rel=1e-6)
        if in_batch:  # each row's positive (columns 0 and 2) leads it: sharper is lower
            assert scaled(scores, {}, {})["loss"] < unscaled(scores, {}, {})["loss"]
    with pytest.raises(ConfigError, match=r"loss.terms.ce.scale=0.0 must be > 0"):
        specs.parse({"ce": {"scale": 0.0}}, "ranking", ["teacher"], online=False)
    with pytest.raises(ConfigError, match=r"loss.terms.ce.scale=20.0: a ranking setting"):
        specs.parse({"ce": {"scale": 20.0}}, "classification", ["teacher"], online=False)


def test_ranking_ce_over_its_own_list_needs_no_in_batch_scores():
    from kdrun.losses import Context, WeightedLoss

    own = WeightedLoss([("ce", 1.0, {"in_batch": False})], Context(task="ranking"))
    assert own.student_needs == set()
    assert WeightedLoss([("ce", 1.0)], Context(task="ranking")).student_needs == {"in_batch_scores"}
    s = torch.tensor([[3.0, 1.0], [0.5, 0.5]])
    assert own({"scores": s}, {}, {})["loss"].item() == pytest.approx(
        torch.nn.functional.cross_entropy(s, torch.zeros(2, dtype=torch.long)).item())
