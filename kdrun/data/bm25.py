"""Okapi BM25 over a small in-memory passage pool, used to mine negatives and eval candidates."""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Dict, List, Sequence

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
