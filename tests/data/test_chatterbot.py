"""chatterbot-corpus as ranking data (kdrun/data/chatterbot.py, ranking.py, bm25.py): its sizes, a held-out split
that is disjoint and stable, negatives that are never positives, BM25's candidates, the same data in every process."""
import collections

import pytest

from kdrun.data import ranking
from kdrun.data.bm25 import BM25
from kdrun.data.chatterbot import load
from kdrun.errors import DataError


ARGS = dict(language="english", eval_fraction=0.2, split_salt="kdrun-v1", negatives_per_query=1, examples_per_pair=3,
            mine_depth=30, eval_candidates=50, max_train_queries=None, max_eval_queries=None, seed=13)


@pytest.fixture(scope="module")
def data():
    return load(**ARGS)


def test_chatterbot_english_sizes(data):
    assert data.stats["pairs"] == 2306  # consecutive (utterance, reply) pairs in chatterbot-corpus 1.3.3
    assert data.stats["passages"] == 1137
    assert data.stats["train_queries"] + data.stats["eval_queries"] == 1015
    assert 150 <= data.stats["eval_queries"] <= 250  # ~20 % held out
    assert data.stats["skipped_entries"] == 1  # the malformed bingo entry of trivia.yml


def test_split_is_disjoint_and_stable(data):
    train_q = {q for q, _ in data.train}
    assert not train_q & set(data.eval_queries)
    again = load(**{**ARGS, "seed": 99})  # the split does not depend on the sampling seed
    assert again.eval_queries == data.eval_queries


def test_training_negatives_are_never_positives(data):
    positives = collections.defaultdict(set)
    for q, ps in data.train:
        positives[q].add(ps[0])
    for q, ps in data.train:
        assert len(ps) == 2
        assert ps[1] not in positives[q]


def test_eval_candidates_hold_positives_and_bm25_negatives(data):
    for cands, labels in zip(data.eval_candidates, data.eval_labels):
        assert len(cands) == len(labels) == 50
        assert 1 <= sum(labels) <= 25
        assert len(set(cands)) == 50
    first_positions = [labels.index(1) for labels in data.eval_labels]
    assert len(set(first_positions)) > 10, "candidate order must be shuffled, not positives first"


def test_bm25_prefers_matching_terms():
    bm = BM25(["the cat sat on the mat", "dogs bark loudly", "a cat and a dog"])
    scores = bm.scores("cat on a mat")
    assert max(scores, key=scores.get) == 0
    assert 1 not in scores


def test_build_rejects_empty_split():
    pairs = [("q1", "a1"), ("q2", "a2"), ("q3", "a3")]
    with pytest.raises(DataError, match="eval queries"):
        ranking.build(pairs, **{**{k: v for k, v in ARGS.items() if k != "language"}, "eval_fraction": 1e-9},
                      source="tiny")


def test_ranking_data_is_the_same_in_every_process():
    """Training examples and eval candidates do not depend on PYTHONHASHSEED (string hashing), so the teacher cache
    and score files made by one process match the next one's data."""
    import os
    import subprocess
    import sys

    code = ("import hashlib; from kdrun.data.chatterbot import load\n"
            "d = load(language='english', eval_fraction=0.2, split_salt='kdrun-v1', negatives_per_query=2, "
            "examples_per_pair=1, mine_depth=30, eval_candidates=20, max_train_queries=60, max_eval_queries=20, seed=13)\n"
            "print(hashlib.sha1(repr((d.train, d.eval_candidates)).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
    assert len(digests) == 1
