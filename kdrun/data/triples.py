"""Ranking data in MS MARCO's file layout, joined by ids (so a published teacher-score file joins too).

    collection     pid <TAB> passage text
    queries        qid <TAB> query text (training and held-out queries; eval_queries may be a second file)
    triples        qid <TAB> pos_pid <TAB> neg_pid, one training triple per line; a Margin-MSE score file
                   (score_pos score_neg qid pos_pid neg_pid) works as well: its id columns are used
    qrels          held-out relevance: TREC qrels (qid 0 pid rel, graded: TREC-DL's 0-3) or qid <TAB> pid (rel 1)
    eval_candidates_file  optional: per held-out query the passages to re-rank, as a TREC run (qid Q0 pid rank score
                   tag), qid <TAB> pid lines or MS MARCO's top1000 file; without it, BM25's top of the collection

Evaluation is the standard protocol: the candidates are re-ranked to `eval_depth` (1000), no positive is added, and
the metrics (kdrun/tasks/ranking/metrics.py) count every relevant passage of the qrels, graded.

Training examples are (query, [positive, negative_1..k]): each (query, positive)'s negatives in file order,
in groups of `negatives_per_query` (an incomplete last group is dropped). Every bad line fails naming
the file and the line.

The collection, the queries and the triples are held as memory-mapped columns (kdrun/data/columns.py), converted
once per file content: memory does not grow with the corpus, and a second run opens them in seconds.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from kdrun.data import columns
from kdrun.data.columns import TextColumn, lines
from kdrun.data.ranking import Examples
from kdrun.errors import DataError


class TriplesData(Examples):
    """data=triples: texts and training examples as memory-mapped columns; the held-out evaluation (thousands of
    queries) as row arrays."""

    def __init__(self, queries: TextColumn, passages: TextColumn, held: TextColumn, train_q, train_p, **evaluation):
        self.queries, self.passages, self.held = queries, passages, held
        self.train_q, self.train_p = train_q, train_p
        for k, v in evaluation.items():
            setattr(self, k, v)

    def fingerprint(self) -> str:
        """The files' contents and the example rows: the teacher-output cache's key, without reading every text."""
        h = hashlib.sha256(f"triples|{self.queries.digest}|{self.passages.digest}".encode())
        for start in range(0, self.num_train, 1 << 20):
            h.update(np.ascontiguousarray(self.train_q[start:start + (1 << 20)], dtype=np.int64).tobytes())
            h.update(np.ascontiguousarray(self.train_p[start:start + (1 << 20)], dtype=np.int64).tobytes())
        return h.hexdigest()


def _run_file(path: str, held: List[str], passages: TextColumn, depth: int) -> Dict[str, np.ndarray]:
    """Per held-out query its candidates' rows best first, the first `depth` distinct ones: a TREC run in rank order,
    or qid<TAB>pid lines (MS MARCO's top1000 files, qid pid query passage, too) in file order. Parsed in chunks into
    arrays (MS MARCO's dev run is 6.7M lines)."""
    index = {q: i for i, q in enumerate(held)}
    parts: List[np.ndarray] = []
    qs, ranks, nums, pids = [], [], [], []

    def flush():
        if qs:
            rows = passages.rows(pids)
            columns._unknown(rows, np.asarray(nums), pids, Path(path), "passage", "collection")
            parts.append(np.stack([np.asarray(qs, np.float64), np.asarray(ranks, np.float64), np.asarray(nums, np.float64),
                                   rows.astype(np.float64)], axis=1))
            for x in (qs, ranks, nums, pids):
                x.clear()

    for n, cols, f in lines("eval_candidates_file", path):
        if len(cols) == 6:
            try:
                rank = float(cols[3])
            except ValueError:
                raise DataError(f"{f}:{n}: the rank column of a TREC run must be a number, found {cols[3]!r}") from None
            qid, pid = cols[0], cols[2]
        elif len(cols) in (2, 4):
            qid, pid, rank = cols[0], cols[1], 0.0
        else:
            raise DataError(f"{f}:{n}: expected a TREC run `qid Q0 pid rank score tag`, `qid<TAB>pid` or MS MARCO's "
                            f"`qid<TAB>pid<TAB>query<TAB>passage`, found {len(cols)} columns")
        pids.append(pid.strip())
        if (q := index.get(qid.strip())) is None:
            pids.pop()
            continue
        qs.append(q)
        ranks.append(rank)
        nums.append(n)
        if len(qs) >= columns.CHUNK:
            flush()
    flush()
    if not parts:
        return {}
    table = np.concatenate(parts)
    table = table[np.lexsort((table[:, 2], table[:, 1], table[:, 0]))]  # by query, rank, line
    out = {}
    starts = np.flatnonzero(np.r_[True, table[1:, 0] != table[:-1, 0]])
    for lo, hi in zip(starts, np.r_[starts[1:], len(table)]):
        rows = table[lo:hi, 3].astype(np.int64)
        _, first = np.unique(rows, return_index=True)
        out[held[int(table[lo, 0])]] = rows[np.sort(first)][:depth]
    return out


def load(*, collection: str, queries: str, triples: str, qrels: str, eval_queries: Optional[str],
         eval_candidates_file: Optional[str], negatives_per_query: int, eval_depth: int,
         max_train_examples: Optional[int], max_eval_queries: Optional[int], seed: int, eval_fraction: float,
         split_salt: str) -> TriplesData:
    """The standard evaluation protocol: each held-out query (a query of the qrels with a relevant passage) re-ranks
    its candidates from the run file, or BM25's over the collection, to depth `eval_depth`; no positive is added, the
    qrels keep their grades. (seed, eval_fraction and split_salt are unused: the held-out queries are the qrels'.)"""
    passages = columns.text_column("collection", collection)
    query_col = columns.text_column("queries", queries)
    held_col = columns.text_column("eval_queries", eval_queries) if eval_queries else query_col
    train_q, train_p = columns.training_examples(triples, query_col, passages, negatives_per_query, max_train_examples)

    judged: Dict[str, Dict[str, int]] = {}
    entries = []
    for n, cols, f in lines("qrels", qrels):
        if len(cols) == 4:
            qid, pid, rel = cols[0], cols[2], cols[3]
        elif len(cols) == 2:
            qid, pid, rel = cols[0], cols[1], "1"
        else:
            raise DataError(f"{f}:{n}: expected TREC qrels `qid 0 pid rel` or `qid<TAB>pid`, found {len(cols)} columns")
        try:
            grade = int(rel)
        except ValueError:
            raise DataError(f"{f}:{n}: relevance {rel!r} is not an integer") from None
        entries.append((n, qid.strip(), pid.strip()))
        judged.setdefault(qid.strip(), {})[pid.strip()] = grade
    if entries:
        nums = np.asarray([e[0] for e in entries])
        for i, column, what, key in ((1, held_col, "query", "eval_queries" if eval_queries else "queries"),
                                     (2, passages, "passage", "collection")):
            ids = [e[i] for e in entries]
            columns._unknown(column.rows(ids), nums, ids, Path(qrels).expanduser(), what, key)
    held = [q for q, js in judged.items() if any(r > 0 for r in js.values())]

    if eval_candidates_file:
        ranked = _run_file(eval_candidates_file, held, passages, eval_depth)
        without = [q for q in held if not len(ranked.get(q, ()))]
        held = [q for q in held if len(ranked.get(q, ()))][:max_eval_queries or None]
    else:
        from kdrun.data.bm25 import search

        held = held[:max_eval_queries or None]
        texts = held_col.texts(held_col.rows(held))
        chunks = (passages.texts(np.arange(i, min(i + columns.CHUNK, len(passages))))
                  for i in range(0, len(passages), columns.CHUNK))
        hits = search((t for chunk in chunks for t in chunk), len(passages), texts, eval_depth, passages.digest)
        ranked = {q: np.asarray(found, dtype=np.int64) for q, found in zip(held, hits)}
        without = [q for q in held if not len(ranked[q])]
        held = [q for q in held if len(ranked[q])]
    source = f"triples {triples}"
    if not len(train_q) or not held:
        raise DataError(f"{source}: {len(train_q)} training examples (data.negatives_per_query={negatives_per_query}) "
                        f"and {len(held)} held-out queries with a relevant passage in data.qrels and candidates to "
                        f"re-rank; both must be non-empty")
    eval_rows = [ranked[q] for q in held]
    labels = [[max(0, judged[q].get(p, 0)) for p in passages.ids(rows)] for q, rows in zip(held, eval_rows)]
    stats = {"passages": len(passages), "train_queries": len(np.unique(train_q)), "eval_queries": len(held),
             "eval_queries_without_candidates": len(without), "train_examples": len(train_q),
             "eval_candidates_per_query": sum(map(len, eval_rows)) / len(eval_rows), "eval_depth": eval_depth}
    return TriplesData(query_col, passages, held_col, train_q, train_p, eval_qids=held,
                       eval_queries=held_col.texts(held_col.rows(held)), eval_rows=eval_rows, eval_labels=labels,
                       qrels={q: judged[q] for q in held}, eval_depth=eval_depth, source=source, stats=stats)
