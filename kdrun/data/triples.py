"""Ranking data in MS MARCO's file layout, joined by ids (so a published teacher-score file joins too).

    collection     pid <TAB> passage text
    queries        qid <TAB> query text (training and held-out queries; eval_queries may be a second file)
    triples        qid <TAB> pos_pid <TAB> neg_pid, one training triple per line; a Margin-MSE score file
                   (score_pos score_neg qid pos_pid neg_pid) works as well: its id columns are used
    qrels          held-out relevance: TREC qrels (qid 0 pid rel) or qid <TAB> pid; rel > 0 is relevant
    eval_candidates  optional: per held-out query the passages to re-rank, as a TREC run (qid Q0 pid rank score
                   tag) or qid <TAB> pid lines; without it, the positives plus the BM25 top of the collection

Training examples are (query, [positive, negative_1..k]): each (query, positive)'s negatives in file order,
in groups of `negatives_per_query` (an incomplete last group is dropped). Every bad line fails naming
the file and the line.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from kdrun.data.bm25 import BM25
from kdrun.data.ranking import RankingData
from kdrun.errors import DataError


def _lines(key: str, path: str) -> Iterator[Tuple[int, List[str], Path]]:
    f = Path(path).expanduser()
    if not f.is_file():
        raise DataError(f"data.{key}={path}: no such file")
    try:
        with open(f, encoding="utf-8") as lines:
            for n, line in enumerate(lines, 1):
                if line.strip():
                    yield n, line.rstrip("\n").split("\t") if "\t" in line else line.split(), f
    except UnicodeDecodeError as e:
        raise DataError(f"data.{key}={path}: not UTF-8 text ({e})") from e
    except OSError as e:  # permissions, a file that vanished, an I/O error
        raise DataError(f"data.{key}={path}: cannot read it ({e.strerror or e})") from e


def read_texts(key: str, path: str) -> Dict[str, str]:
    """id -> text from `id <TAB> text` lines."""
    out = {}
    for n, cols, f in _lines(key, path):
        if len(cols) < 2 or not cols[0].strip():
            raise DataError(f"{f}:{n}: expected `id<TAB>text`")
        out[cols[0].strip()] = "\t".join(cols[1:]).strip()
    if not out:
        raise DataError(f"data.{key}={path}: the file is empty")
    return out


def _known(f: Path, n: int, ids, table: Dict[str, str], what: str, key: str) -> None:
    for i in ids:
        if i not in table:
            raise DataError(f"{f}:{n}: {what} id {i!r} is not in data.{key}")


def load(*, collection: str, queries: str, triples: str, qrels: str, eval_queries: Optional[str],
         eval_candidates_file: Optional[str], negatives_per_query: int, eval_candidates: int,
         max_train_examples: Optional[int], max_eval_queries: Optional[int], seed: int, eval_fraction: float,
         split_salt: str) -> RankingData:
    """(eval_fraction and split_salt are unused: the held-out queries are the qrels' queries.)"""
    passages = read_texts("collection", collection)
    query_text = read_texts("queries", queries)
    held_text = read_texts("eval_queries", eval_queries) if eval_queries else query_text

    negatives: Dict[Tuple[str, str], List[str]] = {}
    for n, cols, f in _lines("triples", triples):
        if len(cols) not in (3, 5):
            raise DataError(f"{f}:{n}: expected `qid<TAB>pos_pid<TAB>neg_pid` (or a 5-column score file), "
                            f"found {len(cols)} columns")
        qid, pos, neg = (c.strip() for c in cols[-3:])
        _known(f, n, [qid], query_text, "query", "queries")
        _known(f, n, [pos, neg], passages, "passage", "collection")
        negatives.setdefault((qid, pos), []).append(neg)
    train = []
    for (qid, pos), negs in negatives.items():
        for i in range(0, len(negs) - negatives_per_query + 1, negatives_per_query):
            train.append((query_text[qid], [passages[pos]] + [passages[p] for p in negs[i:i + negatives_per_query]]))
            if max_train_examples and len(train) >= max_train_examples:
                break
        if max_train_examples and len(train) >= max_train_examples:
            break

    relevant: Dict[str, List[str]] = {}
    for n, cols, f in _lines("qrels", qrels):
        if len(cols) == 4:
            qid, pid, rel = cols[0], cols[2], cols[3]
        elif len(cols) == 2:
            qid, pid, rel = cols[0], cols[1], "1"
        else:
            raise DataError(f"{f}:{n}: expected TREC qrels `qid 0 pid rel` or `qid<TAB>pid`, found {len(cols)} columns")
        try:
            if int(rel) <= 0:
                continue
        except ValueError:
            raise DataError(f"{f}:{n}: relevance {rel!r} is not an integer") from None
        _known(f, n, [qid], held_text, "query", "eval_queries" if eval_queries else "queries")
        _known(f, n, [pid], passages, "passage", "collection")
        relevant.setdefault(qid, []).append(pid)
    held = list(relevant)[:max_eval_queries] if max_eval_queries else list(relevant)

    ranked: Dict[str, List[str]] = {}
    if eval_candidates_file:
        for n, cols, f in _lines("eval_candidates_file", eval_candidates_file):
            if len(cols) not in (2, 6):
                raise DataError(f"{f}:{n}: expected a TREC run `qid Q0 pid rank score tag` or `qid<TAB>pid`")
            qid, pid = cols[0], cols[2] if len(cols) == 6 else cols[1]
            _known(f, n, [pid], passages, "passage", "collection")
            ranked.setdefault(qid, []).append(pid)
    rng = random.Random(seed + 1_000_003)
    pids = list(passages)
    bm25 = None if eval_candidates_file else BM25([passages[p] for p in pids])
    cands, labels = [], []
    for qid in held:
        pos = relevant[qid][: max(1, eval_candidates // 2)]
        if bm25 is not None:
            top = sorted(bm25.scores(held_text[qid]).items(), key=lambda kv: (-kv[1], kv[0]))
            others = [pids[i] for i, _ in top]
        else:
            others = ranked.get(qid, [])
        negs = [p for p in dict.fromkeys(others) if p not in relevant[qid]][: eval_candidates - len(pos)]
        items = [(passages[p], 1) for p in pos] + [(passages[p], 0) for p in negs]
        rng.shuffle(items)
        cands.append([t for t, _ in items])
        labels.append([y for _, y in items])
    source = f"triples {triples}"
    if not train or not held:
        raise DataError(f"{source}: {len(train)} training examples (data.negatives_per_query={negatives_per_query}) "
                        f"and {len(held)} held-out queries with a relevant passage in data.qrels; both must be non-empty")
    stats = {"passages": len(passages), "train_queries": len({q for q, _ in train}), "eval_queries": len(held),
             "train_examples": len(train), "eval_candidates_per_query": sum(map(len, cands)) / len(cands)}
    query_ids = {t: i for i, t in query_text.items()}
    query_ids.update({t: i for i, t in held_text.items()})
    return RankingData(train, [held_text[q] for q in held], cands, labels, source, stats,
                       query_ids=query_ids, passage_ids={t: i for i, t in passages.items()})
