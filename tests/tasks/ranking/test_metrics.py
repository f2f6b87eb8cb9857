"""Ranking metrics as the IR community computes them: known values, cutoffs and ties, graded relevance, and the
TREC files kdrun writes scored by ir_measures to the same numbers."""
import math

import pytest
import torch

from kdrun.tasks.ranking import ranking_metrics


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


def _random_runs(seed: int, n_queries: int = 40, depth: int = 60):
    """Candidate lists with graded qrels (some relevant passages outside the list, unjudged candidates, rel 0
    judgments) and scores with ties (rounded to 1 decimal)."""
    import random

    rng = random.Random(seed)
    qids, pids, scores, labels, qrels = [], [], [], [], {}
    for q in range(n_queries):
        qid = f"q{q}"
        cands = rng.sample(range(10_000), depth)
        judged = {f"d{p}": rng.choice([0, 1, 1, 2, 3]) for p in rng.sample(cands, rng.randint(1, 6))}
        judged |= {f"d{p}": rng.randint(1, 3) for p in rng.sample(range(10_000, 10_100), rng.randint(0, 2))}
        if not any(r > 0 for r in judged.values()):
            judged[f"d{cands[0]}"] = 1
        ps = [f"d{p}" for p in cands]
        qids.append(qid)
        pids.append(ps)
        scores.append(torch.tensor([round(rng.gauss(0, 1), 1) for _ in ps]))
        labels.append([judged.get(p, 0) for p in ps])
        qrels[qid] = judged
    return qids, pids, scores, labels, qrels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_metrics_equal_ir_measures_on_the_same_run(seed):
    """The in-loop metric (periodic evaluations) and ir_measures (the reported ones) agree, graded qrels, relevant
    passages outside the candidates, and tied scores (trec_eval breaks ties by passage id) included."""
    from kdrun.tasks.ranking.metrics import as_run, fast_metrics, library_metrics

    qids, pids, scores, labels, qrels = _random_runs(seed)
    fast = fast_metrics(scores, labels, pids=pids, judged=[list(qrels[q].values()) for q in qids], depth=50)
    lib = library_metrics(as_run(qids, pids, scores), qrels, depth=50)
    assert set(fast) == set(lib) == {"mrr_at_10", "ndcg_at_10", "recall_at_10", "recall_at_50", "mrr_at_10_rel2"}
    for k in fast:
        assert fast[k] == pytest.approx(lib[k], rel=1e-9, abs=1e-12), k
    assert 0 < lib["ndcg_at_10"] < 1 and lib["recall_at_50"] < 1  # some relevant passages are not in the lists


def test_graded_metrics_known_values():
    from kdrun.tasks.ranking.metrics import as_run, fast_metrics, library_metrics

    # ranked: d3 (rel 0), d2 (rel 1), d1 (rel 3); d9 (rel 2) is judged but not a candidate
    qrels = {"q": {"d1": 3, "d2": 1, "d3": 0, "d9": 2}}
    scores, pids, labels = [torch.tensor([1.0, 2.0, 3.0])], [["d1", "d2", "d3"]], [[3, 1, 0]]
    want = {"mrr_at_10": 1 / 2, "mrr_at_10_rel2": 1 / 3, "recall_at_10": 2 / 3, "recall_at_1000": 2 / 3,
            "ndcg_at_10": (1 / math.log2(3) + 3 / math.log2(4)) / (3 + 2 / math.log2(3) + 1 / math.log2(4))}
    fast = fast_metrics(scores, labels, pids=pids, judged=[list(qrels["q"].values())], depth=1000)
    assert fast == pytest.approx(want)
    assert library_metrics(as_run(["q"], pids, scores), qrels, depth=1000) == pytest.approx(want)


def test_a_written_run_file_scored_by_ir_measures_gives_the_same_numbers(tmp_path):
    import ir_measures

    from kdrun.tasks.ranking.metrics import as_run, library_metrics, write_qrels, write_run

    qids, pids, scores, labels, qrels = _random_runs(3)
    scores = [s + torch.rand(len(s)) * 1e-6 for s in scores]  # float32 values that 6 digits would not keep apart
    run = as_run(qids, pids, scores)
    logged = library_metrics(run, qrels, depth=50)
    f, qf = write_run(tmp_path / "run.trec", run, "kdrun"), write_qrels(tmp_path / "qrels.trec", qrels)
    first = f.read_text().splitlines()[0].split()
    assert first[1] == "Q0" and first[3] == "1" and first[5] == "kdrun"
    measures = [ir_measures.parse_measure(m) for m in ("RR@10", "nDCG@10", "R@10", "R@50", "RR(rel=2)@10")]
    outside = ir_measures.calc_aggregate(measures, ir_measures.read_trec_qrels(str(qf)), ir_measures.read_trec_run(str(f)))
    assert [outside[m] for m in measures] == pytest.approx(
        [logged[k] for k in ("mrr_at_10", "ndcg_at_10", "recall_at_10", "recall_at_50", "mrr_at_10_rel2")], rel=1e-12)

