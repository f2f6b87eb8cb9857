"""Okapi BM25: `BM25` over a small in-memory passage pool (chatterbot's negatives and eval candidates), `search`
through bm25s for a large collection (data=triples' eval candidates when no run file is given)."""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Dict, Iterable, List, Sequence

_WORD = re.compile(r"[a-z0-9]+")
STOPWORDS = frozenset(
    "a an the is are was were be been am do does did of to in on at for with by from and or not no "
    "it its this that these those i you he she we they me my your what which who whom how why when where "
    "can could would should will shall may might must have has had there here as so if then than".split()
)


def terms(text: str) -> List[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


class BM25:
    def __init__(self, docs: Sequence[str], k1: float = 0.9, b: float = 0.4):
        self.k1, self.b = k1, b
        self.tfs = [Counter(terms(d)) for d in docs]
        self.lens = [sum(tf.values()) for tf in self.tfs]
        self.avglen = max(1e-9, sum(self.lens) / max(1, len(docs)))
        self.postings: Dict[str, List[int]] = defaultdict(list)
        for i, tf in enumerate(self.tfs):
            for t in tf:
                self.postings[t].append(i)
        n = len(docs)
        self.idf = {t: math.log(1 + (n - len(p) + 0.5) / (len(p) + 0.5)) for t, p in self.postings.items()}

    def scores(self, query: str) -> Dict[int, float]:
        """Non-zero scores only: {doc index: score}."""
        out: Dict[int, float] = defaultdict(float)
        for t in dict.fromkeys(terms(query)):  # first-seen order: float sums (and so ties) do not vary with PYTHONHASHSEED
            for i in self.postings.get(t, ()):
                tf = self.tfs[i][t]
                norm = tf + self.k1 * (1 - self.b + self.b * self.lens[i] / self.avglen)
                out[i] += self.idf[t] * tf * (self.k1 + 1) / norm
        return out


def search(passages: Iterable[str], n_passages: int, queries: Sequence[str], depth: int, key: str) -> List[List[int]]:
    """Per query the indices of its top `depth` passages with a non-zero score, best first: the same Okapi BM25 as
    `BM25` (k1 0.9, b 0.4, the same terms; bm25s' "lucene" scores are ours over k1 + 1), computed by bm25s, a
    maintained sparse-matrix implementation fast enough for MS MARCO's 8.8M passages. The index is built once per
    `key` (the collection's digest) and cached under kdrun's cache, memory-mapped when read back; `passages` (an
    iterable, read only to build it) are the collection's texts in row order. The results of the same queries at
    the same depth are cached beside it (a sweep's jobs search once)."""
    import hashlib

    import numpy as np

    from kdrun.store import cache_root, cached, publish, staging_dir

    out = cache_root() / "bm25" / f"{key[:24]}-k0.9-b0.4-v1"
    # the results too: every job of a sweep searches the same queries (4 s a job on code_search's 2,300 queries)
    asked = hashlib.sha256("\x1e".join(queries).encode() + f"|{depth}".encode()).hexdigest()[:24]
    found_at = out.parent / f"{out.name}-found-{asked}"
    if cached(found_at):
        flat, ends = np.load(found_at / "flat.npy"), np.load(found_at / "ends.npy")
        return [flat[a:b].tolist() for a, b in zip(np.concatenate([[0], ends[:-1]]), ends)]
    found = _search(out, passages, n_passages, queries, depth, key)
    stage = staging_dir(found_at)
    stage.mkdir(parents=True, exist_ok=True)
    np.save(stage / "flat.npy", np.asarray([i for row in found for i in row], dtype=np.int64))
    np.save(stage / "ends.npy", np.cumsum([len(row) for row in found], dtype=np.int64))
    publish(stage, found_at, f"bm25s top {depth} of {len(queries)} queries in {out.name}\n")
    return found


def _search(out, passages: Iterable[str], n_passages: int, queries: Sequence[str], depth: int,
            key: str) -> List[List[int]]:
    import bm25s

    from kdrun.store import cached, publish, staging_dir

    if cached(out):
        index = bm25s.BM25.load(str(out), mmap=True, show_progress=False)
    else:
        index = bm25s.BM25(k1=0.9, b=0.4, method="lucene")
        index.index([terms(p) for p in passages], show_progress=False)  # (bm25s reads the corpus twice)
        stage = staging_dir(out)
        stage.mkdir(parents=True, exist_ok=True)
        index.save(str(stage), show_progress=False)
        publish(stage, out, f"bm25s index of {n_passages} passages, collection sha256 {key}\n")
    k = min(depth, n_passages)
    rows = len(index.scores["indptr"]) - 1  # terms with a column of scores (bm25s' empty token has none)
    found: List[List[int]] = []
    for start in range(0, len(queries), 1000):  # bounded memory: [1000, k] results at a time
        ids = [[i for i in index.get_tokens_ids(terms(q)) if i < rows] for q in queries[start:start + 1000]]
        known = [j for j, q in enumerate(ids) if q]  # a query with no term of the collection finds nothing
        got = [[] for _ in ids]
        if known:
            docs, scores = index.retrieve([ids[j] for j in known], k=k, show_progress=False)
            for j, row, srow in zip(known, docs, scores):
                got[j] = [int(d) for d, s in zip(row, srow) if s > 0]
        found += got
    return found
