"""Teacher scores in a file, in the format the Margin-MSE authors published for MS MARCO (Hofstaetter et al.
2020): one line per training triple, tab-separated

    score_pos <TAB> score_neg <TAB> query_id <TAB> pos_id <TAB> neg_id

`kdrun mode=score` writes such a file from any ranking teacher; `teacher.mode=scores_file` reads one and joins
it to the training examples by (query id, passage id), so the student's tokenizer and architecture need not
match the teacher's. Ids are the data's own, or for data without ids (chatterbot) the first 16 hex digits of
the SHA-1 of the text (`kdrun.data.ranking.text_id`).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, Tuple

import torch

from kdrun.errors import DataError

Table = Dict[Tuple[str, str], float]  # (query id, passage id) -> teacher score


def read(path: str) -> Table:
    """Every (query id, passage id) score in the file; a malformed line fails naming file and line."""
    f = Path(path).expanduser()
    if not f.is_file():
        raise DataError(f"teacher.scores_file={path}: no such file (write one with `kdrun mode=score ...`)")
    table: Table = {}
    try:
        with open(f, encoding="utf-8") as lines:
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                cols = line.rstrip("\n").split("\t")
                if len(cols) != 5:
                    raise DataError(f"{f}:{n}: expected 5 tab-separated columns (score_pos score_neg query_id "
                                    f"pos_id neg_id), found {len(cols)}")
                try:
                    pos, neg = float(cols[0]), float(cols[1])
                except ValueError:
                    raise DataError(f"{f}:{n}: the first two columns must be numbers (score_pos score_neg), "
                                    f"found {cols[0]!r} and {cols[1]!r}") from None
                if not (math.isfinite(pos) and math.isfinite(neg)):
                    raise DataError(f"{f}:{n}: scores must be finite, found {cols[0]} and {cols[1]}")
                qid, pid, nid = (c.strip() for c in cols[2:])
                table.setdefault((qid, pid), pos)
                table.setdefault((qid, nid), neg)
    except UnicodeDecodeError as e:
        raise DataError(f"{f}: not UTF-8 text ({e})") from e
    except OSError as e:
        raise DataError(f"teacher.scores_file={path}: cannot read it ({e})") from e
    if not table:
        raise DataError(f"teacher.scores_file={path}: the file has no scores")
    return table


def join(data, table: Table, path: str, max_missing_fraction: float) -> Tuple[torch.Tensor, int]:
    """(the [N, n] teacher scores of the training examples kept, examples dropped for a missing score). Joined by the
    examples' own (query id, passage id)s; `data` keeps only the scored examples. Fails when the dropped share exceeds
    max_missing_fraction."""
    kept, rows, missing = [], [], 0
    for i in range(len(data.train)):
        qid, pids = data.example_ids(i)
        row = [table.get((qid, p)) for p in pids]
        if any(v is None for v in row):
            missing += 1
            continue
        kept.append(i)
        rows.append(row)
    share = missing / max(1, len(data.train))
    if share > max_missing_fraction or not kept:
        raise DataError(f"teacher.scores_file={path}: {missing} of {len(data.train)} training examples ({share:.1%}) "
                        f"have a (query id, passage id) without a score, more than teacher.max_missing_fraction="
                        f"{max_missing_fraction}; was the file written for this data (same data= settings)?")
    data.keep(kept)
    return torch.tensor(rows, dtype=torch.float32), missing


def write(path: str, data, scores: torch.Tensor) -> int:
    """One line per distinct (query, positive, negative) triple of the training examples; returns the lines
    written. Scores keep 9 significant digits (float32 round-trips exactly). Written to a temporary file and
    renamed, so a reader never sees half a file."""
    f = Path(path).expanduser()
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f.name + f".tmp{os.getpid()}")
    seen, lines = set(), 0
    with open(tmp, "w", encoding="utf-8") as out:
        for i, row in enumerate(scores.tolist()):
            qid, (pos, *negs) = data.example_ids(i)
            for p, s in zip(negs, row[1:]):
                triple = (qid, pos, p)
                if triple in seen:
                    continue
                seen.add(triple)
                out.write(f"{row[0]:.9g}\t{s:.9g}\t{qid}\t{pos}\t{triple[2]}\n")
                lines += 1
    tmp.replace(f)
    return lines
