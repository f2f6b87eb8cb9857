"""Teacher scores in a file, in the format the Margin-MSE authors published for MS MARCO (Hofstaetter et al.
2020): one line per training triple, tab-separated

    score_pos <TAB> score_neg <TAB> query_id <TAB> pos_id <TAB> neg_id

`kdrun mode=score` writes such a file from any ranking teacher; `teacher.mode=scores_file` reads one and joins
it to the training examples by (query id, passage id), so the student's tokenizer and architecture need not
match the teacher's. Ids are the data's own, or for data without ids (chatterbot) the first 16 hex digits of
the SHA-1 of the text (`kdrun.data.ranking.text_id`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Tuple

import numpy as np
import torch

from kdrun.errors import DataError

def join(data, path: str, max_missing_fraction: float) -> Tuple[torch.Tensor, int]:
    """(the [N, n] teacher scores of the training examples kept, examples dropped for a missing score). The file is
    converted once into sorted (query row, passage row) keys (kdrun/data/columns.py) and joined to the examples by
    their own ids, vectorised; `data` keeps only the scored examples. Fails when the dropped share exceeds
    max_missing_fraction. The first score a file gives a (query, passage) pair wins."""
    from kdrun.data import columns

    table = columns.score_table(path, data.queries, data.passages)
    scores, found = table.lookup(np.asarray(data.train_q), np.asarray(data.train_p))
    ok = found.all(axis=1)
    total, missing = len(ok), int((~ok).sum())
    share = missing / max(1, total)
    if share > max_missing_fraction or not ok.any():
        raise DataError(f"teacher.scores_file={path}: {missing} of {total} training examples ({share:.1%}) "
                        f"have a (query id, passage id) without a score, more than teacher.max_missing_fraction="
                        f"{max_missing_fraction}; was the file written for this data (same data= settings)?")
    if missing:
        data.keep(np.flatnonzero(ok))
    return torch.from_numpy(np.ascontiguousarray(scores[ok])), missing


def write(path: str, data, scores: torch.Tensor) -> int:
    """One line per distinct (query, positive, negative) triple of the training examples, in example order; returns
    the lines written. Scores keep 9 significant digits (float32 round-trips exactly). Written in chunks (ids fetched
    per chunk) to a temporary file and renamed, so a reader never sees half a file."""
    f = Path(path).expanduser()
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f.name + f".tmp{os.getpid()}")
    q, p = np.asarray(data.train_q, dtype=np.int64), np.asarray(data.train_p, dtype=np.int64)
    k = p.shape[1] - 1
    triples = np.stack([np.repeat(q, k), np.repeat(p[:, 0], k), p[:, 1:].reshape(-1)], axis=1)
    _, first = np.unique(triples, axis=0, return_index=True)
    keep = np.zeros(len(triples), dtype=bool)
    keep[first] = True  # the first time a triple appears
    values = np.asarray(scores.detach().cpu().float() if isinstance(scores, torch.Tensor) else scores, dtype=np.float32)
    pos_score, neg_score = np.repeat(values[:, 0], k), values[:, 1:].reshape(-1)
    lines = 0
    with open(tmp, "w", encoding="utf-8") as out:
        for start in range(0, len(triples), 100_000):
            at = start + np.flatnonzero(keep[start:start + 100_000])
            if not len(at):
                continue
            qids = data.queries.ids(triples[at, 0])
            pids = data.passages.ids(triples[at, 1])
            nids = data.passages.ids(triples[at, 2])
            out.writelines(f"{sp:.9g}\t{sn:.9g}\t{a}\t{b}\t{c}\n"
                           for sp, sn, a, b, c in zip(pos_score[at].tolist(), neg_score[at].tolist(), qids, pids, nids))
            lines += len(at)
    tmp.replace(f)
    return lines
