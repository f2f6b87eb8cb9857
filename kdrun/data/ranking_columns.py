"""Ranking data in sentence-transformers' column layout (`data=ranking_columns`), from a user's file, a save_to_disk
folder or a hub dataset (sources.py):

    anchor | query           the query
    positive                 a relevant passage
    negative | negative_1..negative_k | negatives (a list)     hard negatives of the row (optional)
    scores                   the teacher's scores of [positive, negatives...] (optional)
    margin | label           the teacher's margins s(q, positive) - s(q, negative_i), one or a list (optional: the
                             layout of sentence-transformers' MarginMSE data)

Queries are split into training and held-out by a hash of their text (or data.eval_split). A training example is
the row's positive and `negatives_per_query` negatives: the row's own first, then BM25's from the other positives.
Each held-out query re-ranks its positives and BM25's top from every positive of the data (as chatterbot). With a
score column, `teacher.mode=scores_file` (no file) trains on the data's scores; margins become scores of 0 for the
positive and -margin for each negative (what margin and listwise losses read; not pointwise MSE)."""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

import numpy as np

from kdrun.data import ranking, sources
from kdrun.errors import DataError

QUERY, POSITIVE = ("anchor", "query"), ("positive",)


def _negative_columns(columns: List[str]) -> List[str]:
    numbered = sorted((int(m.group(1)), c) for c in columns if (m := re.fullmatch(r"negative_(\d+)", c)))
    if numbered:
        return [c for _, c in numbered]
    return [c for c in ("negative", "negatives") if c in columns][:1]


def _floats(value, where: str, column: str, n: Optional[int] = None) -> List[float]:
    values = value if isinstance(value, list) else [value]
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise DataError(f"{where}: {column!r} must be a number or a list of numbers, got {value!r}") from None
    if not all(np.isfinite(out)) or (n is not None and len(out) != n):
        raise DataError(f"{where}: {column!r} holds {out}; it needs {n} finite numbers" if n is not None else
                        f"{where}: {column!r} holds a number that is not finite: {out}")
    return out


def read_rows(ds, split_name: str, where: str):
    """[(query, positive, [negatives], scores or None)] of a split, each row checked."""
    part = sources.split(ds, split_name, where, "train_split")
    cols = part.column_names
    q_col = sources.require(cols, QUERY, where, "query")
    p_col = sources.require(cols, POSITIVE, where, "positive")
    neg_cols = _negative_columns(cols)
    score_col = sources.pick(cols, ("scores", "margin", "label", "score"))
    out = []
    for i, row in enumerate(part.select_columns([q_col, p_col, *neg_cols, *([score_col] if score_col else [])])):
        at = sources.row_where(where, split_name, i)
        q, p = sources.text_value(row[q_col], at, q_col), sources.text_value(row[p_col], at, p_col)
        negs: List[str] = []
        for c in neg_cols:
            values = row[c] if isinstance(row[c], list) else [row[c]]
            negs += [sources.text_value(v, at, c) for v in values]
        scores = None
        if score_col:
            if score_col in ("scores", "score"):
                scores = _floats(row[score_col], at, score_col, 1 + len(negs))
            else:  # margins of the positive over each negative
                scores = [0.0] + [-m for m in _floats(row[score_col], at, score_col, len(negs))]
        out.append((q, p, negs, scores))
    return out, score_col


def load(*, name: Optional[str], path: Optional[str], train_split: str, eval_split: Optional[str],
         eval_fraction: float, split_salt: str, seed: int, negatives_per_query: int, mine_depth: int,
         eval_candidates: int, max_train_queries: Optional[int], max_eval_queries: Optional[int]) -> ranking.RankingData:
    ds, where = sources.open_source(name, path)
    rows, score_col = read_rows(ds, train_split, where)
    held_rows = read_rows(ds, eval_split, where)[0] if eval_split else []
    held = {q for q, *_ in held_rows}
    rows = [r for r in rows if r[0] not in held]  # (a query in both splits is held out)
    data = ranking.build([(q, p) for q, p, *_ in rows + held_rows], eval_fraction=eval_fraction,
                         split_salt=split_salt, negatives_per_query=negatives_per_query, examples_per_pair=1,
                         mine_depth=mine_depth, eval_candidates=eval_candidates, max_train_queries=max_train_queries,
                         max_eval_queries=max_eval_queries, seed=seed, source=f"ranking_columns ({where})",
                         held_out=held.__contains__ if eval_split else None)
    given: Dict[Tuple[str, str], Tuple[List[str], Optional[List[float]]]] = {}
    for q, p, negs, scores in rows:
        given.setdefault((q, p), (negs, scores))
    train, scored, filled = [], [], 0
    for q, ps in data.train:
        negs, scores = given.get((q, ps[0]), ([], None))
        own = negs[:negatives_per_query]
        filled += len(own) < negatives_per_query
        mined = [x for x in ps[1:] if x not in own]
        train.append((q, [ps[0], *own, *mined, *ps[1:]][:1 + negatives_per_query]))  # (ps[1:] again: overlaps)
        if score_col:
            if scores is None or len(own) < negatives_per_query:
                raise DataError(f"{where}: the query {q[:60]!r} has {len(own)} negatives of its own with scores, "
                                f"fewer than data.negatives_per_query={negatives_per_query}: with a score column "
                                "every training example's negatives must come from its row")
            scored.append(scores[:1 + negatives_per_query])
    out = ranking.RankingData(train, data.eval_queries, data.eval_candidates, data.eval_labels, data.source,
                              {**data.stats, "rows": len(rows) + len(held_rows), "examples_filled_by_bm25": filled})
    out.teacher_scores = np.asarray(scored, dtype=np.float32) if score_col else None
    out.score_column = score_col
    return out

