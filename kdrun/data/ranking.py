"""(query, relevant passage) pairs -> training examples with mined negatives and a held-out eval set.

Split: unique queries go to eval when a hash of (split_salt, query) falls below eval_fraction, so the
split is stable across seeds, runs and machines, and a query never appears on both sides. Passages
are shared (like MS MARCO's collection): the same answer text can be relevant to train and eval queries.

Training example: (query, [positive, negative_1..k]) with negatives sampled from the BM25 top
`mine_depth` passages that are not relevant to the query (random passages fill in when BM25 finds
too few). Eval: per held-out query, its positives plus the BM25 top non-relevant passages up to
`eval_candidates`, in a seeded random order (so ties cannot favour positives).
"""
from __future__ import annotations

import hashlib
import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from kdrun.data.bm25 import BM25
from kdrun.errors import DataError

Example = Tuple[str, List[str]]  # (query, [positive, negatives...])


def text_id(text: str) -> str:
    """A stable id for a query or passage of data that has none: the first 16 hex digits of its SHA-1."""
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class ListTexts:
    """Texts held in a list (small data), addressed by row like a memory-mapped `columns.TextColumn`."""

    def __init__(self, texts: Sequence[str], ids: Optional[Sequence[str]] = None):
        self._texts, self._ids = list(texts), list(ids) if ids is not None else None

    def __len__(self) -> int:
        return len(self._texts)

    def texts(self, rows) -> List[str]:
        return [self._texts[int(r)] for r in np.asarray(rows).reshape(-1)]

    def ids(self, rows) -> List[str]:
        rows = np.asarray(rows).reshape(-1)
        return [self._ids[int(r)] for r in rows] if self._ids is not None else [text_id(self._texts[int(r)]) for r in rows]

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Each id's row, -1 where there is no such id."""
        if not hasattr(self, "_row_of"):
            self._row_of = {i: r for r, i in enumerate(self.ids(range(len(self._texts))))}
        return np.array([self._row_of.get(i, -1) for i in ids], dtype=np.int64)

    def arrow(self):
        import pyarrow as pa

        return pa.table({"text": self._texts})

    def dataset(self):
        import datasets

        return datasets.Dataset.from_dict({"text": self._texts})

    @property
    def digest(self) -> str:
        h = hashlib.sha256(f"{len(self._texts)}".encode())
        for t in self._texts:
            h.update(t.encode() + b"\x1e")
        return h.hexdigest()


class Examples:
    """What a ranking task reads from its data, whichever way it is held (in lists here, memory-mapped columns in
    kdrun/data/triples.py): the training examples as rows of two text columns, the held-out evaluation as ids.

        queries, passages    text columns: texts(rows), ids(rows), arrow(), digest, len()
        train_q [N]          each training example's query row
        train_p [N, 1 + k]   its passage rows: the positive, then k negatives
        eval_qids, eval_queries, eval_rows (passage rows per held-out query), eval_labels (graded, per candidate),
        qrels (every judgment of the held-out queries), eval_depth (a run re-ranked to this depth, or None)
    """
    queries: "ListTexts"
    passages: "ListTexts"
    train_q: np.ndarray
    train_p: np.ndarray
    eval_qids: List[str]
    eval_queries: List[str]
    eval_rows: List[np.ndarray]
    eval_labels: List[List[int]]
    qrels: Dict[str, Dict[str, int]]
    eval_depth: Optional[int] = None
    source: str = ""
    stats: Dict[str, float]

    @property
    def num_train(self) -> int:
        return len(self.train_q)

    def batch_texts(self, index) -> Tuple[List[str], List[List[str]]]:
        """(query texts, passage text lists) of these training examples."""
        index = np.asarray(index, dtype=np.int64)
        rows = np.asarray(self.train_p[index])
        flat = self.passages.texts(rows.reshape(-1))
        n = rows.shape[1]
        return self.queries.texts(self.train_q[index]), [flat[i:i + n] for i in range(0, len(flat), n)]

    def example_ids(self, i: int) -> Tuple[str, List[str]]:
        """(query id, [passage ids]) of training example i: the data's own ids, never looked up by text (two queries
        may share a text under different ids)."""
        return self.queries.ids([self.train_q[i]])[0], self.passages.ids(np.asarray(self.train_p[i]))

    def keep(self, index) -> None:
        """Keep only these training examples (e.g. those a score file scores)."""
        index = np.asarray(index, dtype=np.int64)
        self.train_q, self.train_p = np.asarray(self.train_q[index]), np.asarray(self.train_p[index])
        self._fingerprint = None  # (of the examples before)

    def fingerprint(self) -> str:
        """SHA-256 of the training examples as a teacher sees them (the teacher-output cache's key); hashed once."""
        if getattr(self, "_fingerprint", None):
            return self._fingerprint
        h = hashlib.sha256()
        for start in range(0, self.num_train, 50_000):
            qs, ps = self.batch_texts(range(start, min(start + 50_000, self.num_train)))
            for q, texts in zip(qs, ps):
                h.update(("\x1f".join([q, *texts]) + "\x1e").encode())
        self._fingerprint = h.hexdigest()
        return self._fingerprint

    def eval_pids(self, i: int) -> List[str]:
        return self.passages.ids(self.eval_rows[i])

    def eval_texts(self, i: int) -> List[str]:
        return self.passages.texts(self.eval_rows[i])


class RankingData(Examples):
    """Ranking data held as texts in lists (chatterbot, tests): training examples (query, [positive, negatives]),
    held-out queries with their candidates and graded labels. Data without ids of its own gets `text_id`s."""

    def __init__(self, train: List[Example], eval_queries: List[str], eval_candidates: List[List[str]],
                 eval_labels: List[List[int]], source: str = "", stats: Optional[Dict[str, float]] = None,
                 eval_qids: Optional[List[str]] = None, qrels: Optional[Dict[str, Dict[str, int]]] = None,
                 eval_depth: Optional[int] = None):
        self.source, self.stats, self.eval_depth = source, dict(stats or {}), eval_depth
        self.eval_queries, self.eval_labels = list(eval_queries), [list(y) for y in eval_labels]
        query_row: Dict[str, int] = {}
        passage_row: Dict[str, int] = {}
        for q, ps in train:
            query_row.setdefault(q, len(query_row))
            for p in ps:
                passage_row.setdefault(p, len(passage_row))
        for ps in eval_candidates:
            for p in ps:
                passage_row.setdefault(p, len(passage_row))
        self.queries, self.passages = ListTexts(list(query_row)), ListTexts(list(passage_row))
        n = len(train[0][1]) if train else 0
        self.train_q = np.array([query_row[q] for q, _ in train], dtype=np.int64)
        self.train_p = np.array([[passage_row[p] for p in ps] for _, ps in train], dtype=np.int64).reshape(-1, n)
        self.eval_rows = [np.array([passage_row[p] for p in ps], dtype=np.int64) for ps in eval_candidates]
        self.eval_qids = list(eval_qids) if eval_qids is not None else [text_id(q) for q in eval_queries]
        if qrels is None:
            qrels = {}
            for q, rows, ys in zip(self.eval_qids, self.eval_rows, self.eval_labels):
                qrels.setdefault(q, {}).update(zip(self.passages.ids(rows), ys))
        self.qrels = qrels

    @property
    def train(self) -> List[Example]:
        qs, ps = self.batch_texts(range(self.num_train))
        return list(zip(qs, ps))

    @property
    def eval_candidates(self) -> List[List[str]]:
        return [self.eval_texts(i) for i in range(len(self.eval_rows))]


def is_eval_query(query: str, salt: str, fraction: float) -> bool:
    """Held out when a hash of (salt, text) falls in the lowest `fraction` of its range: stable across
    seeds, runs and machines (also used for classification texts and LM documents)."""
    h = int(hashlib.sha1(f"{salt}\x00{query}".encode()).hexdigest()[:8], 16)
    return h / 2**32 < fraction


def hash_split(items: Sequence, salt: str, fraction: float, text=lambda item: item) -> Tuple[list, list]:
    """(kept for training, held out) by `is_eval_query` on each item's text, in the items' order."""
    train, held = [], []
    for item in items:
        (held if is_eval_query(text(item), salt, fraction) else train).append(item)
    return train, held


def _mined(bm25: BM25, query: str, exclude: set, depth: int, rng: random.Random) -> List[int]:
    scored = [(s, rng.random(), i) for i, s in bm25.scores(query).items() if i not in exclude]
    return [i for _, _, i in sorted(scored, reverse=True)[:depth]]


def _fill(picked: List[int], n_total: int, exclude: set, need: int, rng: random.Random) -> List[int]:
    """Add random passages (not excluded, not picked) until `need` are picked."""
    taken = set(picked)
    pool = [i for i in range(n_total) if i not in exclude and i not in taken]
    rng.shuffle(pool)
    return picked + pool[: max(0, need - len(picked))]


def _fill_drawn(picked: List[int], n_total: int, exclude: set, need: int, rng: random.Random) -> List[int]:
    """`_fill` for a large collection: random passages drawn one at a time (not a shuffle of all of them), and
    only when fewer than `need` are picked."""
    picked, taken = list(picked), set(picked) | set(exclude)
    if n_total - len(taken) < need - len(picked):
        raise DataError(f"{n_total} passages: too few to draw {need} negatives")
    while len(picked) < need:
        i = rng.randrange(n_total)
        if i not in taken:
            taken.add(i)
            picked.append(i)
    return picked


def build(pairs: Sequence[Tuple[str, str]], *, eval_fraction: float, split_salt: str, negatives_per_query: int,
          examples_per_pair: int, mine_depth: int, eval_candidates: int, max_train_queries: Optional[int],
          max_eval_queries: Optional[int], seed: int, source: str, split_key: Optional[Callable[[str], str]] = None,
          search: str = "python", held_out: Optional[Callable[[str], bool]] = None) -> RankingData:
    """Training examples and held-out candidate lists from (query, relevant passage) pairs.

    split_key: what the held-out hash reads of a query (default the query itself; code search: its source unit, so
    a package's near-duplicates stay on one side). search: "python" ranks with `BM25` above and breaks score ties by
    a seeded random draw (chatterbot); "bm25s" ranks a larger collection with bm25s (`bm25.search`: the same scores,
    ties in index order), mining and evaluation candidates alike. held_out: which queries are held out (a data set's
    own eval split), in place of the hash."""
    qrels: Dict[str, List[int]] = {}
    passages: List[str] = []
    pid: Dict[str, int] = {}
    for q, a in pairs:
        if a not in pid:
            pid[a] = len(passages)
            passages.append(a)
        rel = qrels.setdefault(q, [])
        if pid[a] not in rel:
            rel.append(pid[a])
    if len(passages) < negatives_per_query + 1:
        raise DataError(f"{source}: only {len(passages)} distinct passages; need more than data.negatives_per_query")

    if held_out is not None:
        train_q, eval_q = [q for q in qrels if not held_out(q)], [q for q in qrels if held_out(q)]
    else:
        train_q, eval_q = hash_split(list(qrels), split_salt, eval_fraction, text=split_key or (lambda q: q))
    if max_train_queries:
        train_q = train_q[:max_train_queries]
    if max_eval_queries:
        eval_q = eval_q[:max_eval_queries]
    if not train_q or not eval_q:
        raise DataError(f"{source}: {len(train_q)} training and {len(eval_q)} eval queries after the split; "
                        f"both must be non-empty (data.eval_fraction={eval_fraction})")

    rng = random.Random(seed)
    if search == "bm25s":
        from kdrun.data.bm25 import search as bm25s_search

        digest = hashlib.sha256("\x1e".join(passages).encode()).hexdigest()
        depth = max(mine_depth, eval_candidates) + max(len(r) for r in qrels.values())
        ranked = dict(zip(train_q + eval_q, bm25s_search(passages, len(passages), train_q + eval_q, depth, digest)))
        mined = lambda q, exclude, k: [i for i in ranked[q] if i not in exclude][:k]
        fill = _fill_drawn
    else:
        bm25 = BM25(passages)
        mined = lambda q, exclude, k: _mined(bm25, q, exclude, k, rng)
        fill = _fill
    train: List[Example] = []
    for q in train_q:
        rel = set(qrels[q])
        pool = fill(mined(q, rel, mine_depth), len(passages), rel, negatives_per_query, rng)
        for p in qrels[q]:
            for _ in range(examples_per_pair):
                negs = rng.sample(pool, negatives_per_query)
                train.append((q, [passages[p]] + [passages[i] for i in negs]))

    cands, labels = [], []
    rng = random.Random(seed + 1_000_003)  # its own stream: eval candidates do not move with training settings
    for q in eval_q:
        pos = qrels[q][: max(1, eval_candidates // 2)]
        exclude = set(qrels[q])
        negs = fill(mined(q, exclude, eval_candidates - len(pos)), len(passages), exclude,
                     eval_candidates - len(pos), rng)
        items = [(passages[i], 1) for i in pos] + [(passages[i], 0) for i in negs]
        rng.shuffle(items)
        cands.append([t for t, _ in items])
        labels.append([y for _, y in items])

    stats = {"pairs": len(pairs), "passages": len(passages), "train_queries": len(train_q),
             "eval_queries": len(eval_q), "train_examples": len(train),
             "eval_candidates_per_query": sum(map(len, cands)) / len(cands)}
    return RankingData(train, eval_q, cands, labels, source, stats)
