import math

import pytest
import torch

from kdrun.tasks.ranking import ranking_metrics
from kdrun.train import warmup_then


def test_ranking_metrics_known_values():
    # query 1: the positive ranks 2nd; query 2: positives rank 1st and 3rd
    scores = [torch.tensor([0.9, 0.5, 0.1]), torch.tensor([0.8, 0.7, 0.6, 0.1])]
    labels = [[0, 1, 0], [1, 0, 1, 0]]
    m = ranking_metrics(scores, labels, k=10)
    assert m["mrr_at_10"] == pytest.approx((1 / 2 + 1) / 2)
    ndcg1 = (1 / math.log2(3)) / 1.0
    ndcg2 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert m["ndcg_at_10"] == pytest.approx((ndcg1 + ndcg2) / 2)
    assert m["recall_at_10"] == pytest.approx(1.0)


def test_ranking_metrics_cutoff_and_ties():
    scores = [torch.tensor([float(-i) for i in range(15)])]  # candidate i ranks i+1
    labels = [[0] * 12 + [1, 0, 1]]  # positives at ranks 13 and 15: beyond @10
    m = ranking_metrics(scores, labels, k=10)
    assert m == {"mrr_at_10": 0.0, "ndcg_at_10": 0.0, "recall_at_10": 0.0}
    # ties keep candidate order: a tie cannot move a later positive up
    tied = ranking_metrics([torch.zeros(3)], [[0, 0, 1]], k=10)
    assert tied["mrr_at_10"] == pytest.approx(1 / 3)


def test_ranking_metrics_perfect_ranking_is_one():
    m = ranking_metrics([torch.tensor([3.0, 2.0, 1.0])], [[1, 1, 0]], k=10)
    assert m == pytest.approx({"mrr_at_10": 1.0, "ndcg_at_10": 1.0, "recall_at_10": 1.0})


def test_warmup_then_linear_decay():
    f = warmup_then("linear", warmup_steps=4, total_steps=14)
    assert [round(f(s), 3) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.5)
    assert f(14) == 0.0
    assert warmup_then("constant", 2, 10)(8) == 1.0
