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
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from kdrun.data.bm25 import BM25
from kdrun.errors import DataError

Example = Tuple[str, List[str]]  # (query, [positive, negatives...])


def text_id(text: str) -> str:
    """A stable id for a query or passage of data that has none: the first 16 hex digits of its SHA-1."""
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@dataclass
class RankingData:
    """Training examples and the held-out evaluation, as texts (what models read) and ids (what joins teacher scores,
    qrels and TREC run files). Data without ids of its own (chatterbot) gets `text_id`s."""
    train: List[Example]
    eval_queries: List[str]
    eval_candidates: List[List[str]]
    eval_labels: List[List[int]]  # each candidate's graded relevance from the qrels (0: not relevant or not judged)
    source: str = ""
    stats: Dict[str, float] = field(default_factory=dict)
    train_ids: Optional[List[Tuple[str, List[str]]]] = None  # per example (query id, [passage ids]); None: text_ids
    eval_qids: Optional[List[str]] = None
    eval_pids: Optional[List[List[str]]] = None
    qrels: Optional[Dict[str, Dict[str, int]]] = None  # every judgment of the held-out queries; None: from eval_labels
    eval_depth: Optional[int] = None  # a run re-ranked to this depth (the standard protocol): Recall@depth is reported

    def __post_init__(self):
        if self.eval_qids is None:
            self.eval_qids = [text_id(q) for q in self.eval_queries]
        if self.eval_pids is None:
            self.eval_pids = [[text_id(p) for p in ps] for ps in self.eval_candidates]
        if self.qrels is None:
            self.qrels = {}
            for q, ps, ys in zip(self.eval_qids, self.eval_pids, self.eval_labels):
                self.qrels.setdefault(q, {}).update({p: y for p, y in zip(ps, ys)})

    def example_ids(self, i: int) -> Tuple[str, List[str]]:
        """(query id, [passage ids]) of training example i: the files' own ids, never looked up by text (two queries
        may share a text under different ids)."""
        if self.train_ids is not None:
            return self.train_ids[i]
        q, ps = self.train[i]
        return text_id(q), [text_id(p) for p in ps]

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these training examples (e.g. those a score file scores), ids alongside."""
        self.train = [self.train[i] for i in rows]
        if self.train_ids is not None:
            self.train_ids = [self.train_ids[i] for i in rows]


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


def build(pairs: Sequence[Tuple[str, str]], *, eval_fraction: float, split_salt: str, negatives_per_query: int,
          examples_per_pair: int, mine_depth: int, eval_candidates: int, max_train_queries: Optional[int],
          max_eval_queries: Optional[int], seed: int, source: str) -> RankingData:
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

    train_q, eval_q = hash_split(list(qrels), split_salt, eval_fraction)
    if max_train_queries:
        train_q = train_q[:max_train_queries]
    if max_eval_queries:
        eval_q = eval_q[:max_eval_queries]
    if not train_q or not eval_q:
        raise DataError(f"{source}: {len(train_q)} training and {len(eval_q)} eval queries after the split; "
                        f"both must be non-empty (data.eval_fraction={eval_fraction})")

    rng = random.Random(seed)
    bm25 = BM25(passages)
    train: List[Example] = []
    for q in train_q:
        rel = set(qrels[q])
        pool = _fill(_mined(bm25, q, rel, mine_depth, rng), len(passages), rel, negatives_per_query, rng)
        for p in qrels[q]:
            for _ in range(examples_per_pair):
                negs = rng.sample(pool, negatives_per_query)
                train.append((q, [passages[p]] + [passages[i] for i in negs]))

    cands, labels = [], []
    rng = random.Random(seed + 1_000_003)  # its own stream: eval candidates do not move with training settings
    for q in eval_q:
        pos = qrels[q][: max(1, eval_candidates // 2)]
        exclude = set(qrels[q])
        negs = _fill(_mined(bm25, q, exclude, eval_candidates - len(pos), rng), len(passages), exclude,
                     eval_candidates - len(pos), rng)
        items = [(passages[i], 1) for i in pos] + [(passages[i], 0) for i in negs]
        rng.shuffle(items)
        cands.append([t for t, _ in items])
        labels.append([y for _, y in items])

    stats = {"pairs": len(pairs), "passages": len(passages), "train_queries": len(train_q),
             "eval_queries": len(eval_q), "train_examples": len(train),
             "eval_candidates_per_query": sum(map(len, cands)) / len(cands)}
    return RankingData(train, eval_q, cands, labels, source, stats)
