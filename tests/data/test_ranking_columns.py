"""Ranking data in sentence-transformers' column layout (kdrun/data/ranking_columns.py): each row's own negatives
first, then BM25's; a score column as the teacher's margins; a missing column or too few negatives named."""
import json

import pytest

from kdrun.errors import DataError
from support import ranking_rows


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_ranking_columns_take_the_rows_negatives_first_then_bm25s(tmp_path):
    from kdrun.data.ranking_columns import load

    args = dict(name=None, train_split="train", eval_split=None, eval_fraction=0.25, split_salt="s", seed=1,
                mine_depth=30, eval_candidates=10, max_train_queries=None, max_eval_queries=None)
    data = load(path=_jsonl(tmp_path / "t.jsonl", ranking_rows()), negatives_per_query=3, **args)
    row = {r["anchor"]: r for r in ranking_rows()}
    for q, ps in data.train:
        assert ps[:3] == [row[q]["positive"], row[q]["negative_1"], row[q]["negative_2"]] and len(ps) == 4
    assert data.teacher_scores is None and data.stats["examples_filled_by_bm25"] == len(data.train)
    assert all(len(c) == 10 and sum(y) == 1 for c, y in zip(data.eval_candidates, data.eval_labels))
    scored = load(path=_jsonl(tmp_path / "s.jsonl", ranking_rows(scores=True)), negatives_per_query=2, **args)
    for (q, _), s in zip(scored.train, scored.teacher_scores):  # margins: 0 for the positive, -margin per negative
        assert s.tolist() == [0.0, -(3.0 + int(q.split()[3]) % 3), -5.0]
    with pytest.raises(DataError, match="fewer than data.negatives_per_query=3"):
        load(path=_jsonl(tmp_path / "s.jsonl", ranking_rows(scores=True)), negatives_per_query=3, **args)
    with pytest.raises(DataError, match=r"no positive column \(looked for \['positive'\]"):
        load(path=_jsonl(tmp_path / "q.jsonl", [{"anchor": "a", "pos": "b"}]), negatives_per_query=1, **args)
