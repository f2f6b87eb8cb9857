"""The benchmark's data: whole words of a WordPiece vocabulary and synthetic MS MARCO-like triples drawn from them (used
by the side-by-side benchmark and the scale runs)."""
from __future__ import annotations

import math
import random
from typing import List


def vocabulary(tokenizer) -> List[str]:
    """Whole-word entries of a WordPiece vocabulary, in id order (roughly by frequency)."""
    words = [w for w, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    return [w for w in words if w.isalpha() and w.isascii() and len(w) > 1]


def synthetic_triples(n: int, words: List[str], seed: int = 0) -> List[dict]:
    """(query, positive, negative, teacher scores) with MS MARCO-like lengths: queries lognormal around 6 words
    (2..24), passages around 55 words (8..220); words Zipf-distributed over the vocabulary."""
    rng = random.Random(seed)
    weights = [1.0 / (r + 10) ** 1.05 for r in range(len(words))]
    cum, total = [], 0.0
    for w in weights:
        total += w
        cum.append(total)

    def text(median: float, lo: int, hi: int) -> str:
        k = min(hi, max(lo, round(rng.lognormvariate(math.log(median), 0.45))))
        return " ".join(rng.choices(words, cum_weights=cum, k=k))

    return [{"query": text(6, 2, 24), "positive": text(55, 8, 220), "negative": text(55, 8, 220),
             "score_pos": rng.gauss(8.0, 2.0), "score_neg": rng.gauss(3.0, 3.0)} for _ in range(n)]
