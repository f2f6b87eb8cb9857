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
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

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


def _run_file(path: str, passages: Dict[str, str], depth: int) -> Dict[str, List[str]]:
    """Per query its candidates best first, the first `depth` distinct ones: a TREC run in rank order, or qid<TAB>pid
    lines (MS MARCO's top1000 files, qid pid query passage, too) in file order."""
    rows: Dict[str, List[Tuple[float, int, str]]] = {}
    for n, cols, f in _lines("eval_candidates_file", path):
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
        _known(f, n, [pid], passages, "passage", "collection")
        rows.setdefault(qid.strip(), []).append((rank, n, pid.strip()))
    return {q: list(dict.fromkeys(p for _, _, p in sorted(r)))[:depth] for q, r in rows.items()}


def load(*, collection: str, queries: str, triples: str, qrels: str, eval_queries: Optional[str],
         eval_candidates_file: Optional[str], negatives_per_query: int, eval_depth: int,
         max_train_examples: Optional[int], max_eval_queries: Optional[int], seed: int, eval_fraction: float,
         split_salt: str) -> RankingData:
    """The standard evaluation protocol: each held-out query (a query of the qrels with a relevant passage) re-ranks
    its candidates from the run file, or BM25's over the collection, to depth `eval_depth`; no positive is added, the
    qrels keep their grades. (seed, eval_fraction and split_salt are unused: the held-out queries are the qrels'.)"""
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
    train, train_ids = [], []
    for (qid, pos), negs in negatives.items():
        for i in range(0, len(negs) - negatives_per_query + 1, negatives_per_query):
            group = negs[i:i + negatives_per_query]
            train.append((query_text[qid], [passages[pos]] + [passages[p] for p in group]))
            train_ids.append((qid, [pos, *group]))
            if max_train_examples and len(train) >= max_train_examples:
                break
        if max_train_examples and len(train) >= max_train_examples:
            break

    judged: Dict[str, Dict[str, int]] = {}
    for n, cols, f in _lines("qrels", qrels):
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
        _known(f, n, [qid], held_text, "query", "eval_queries" if eval_queries else "queries")
        _known(f, n, [pid], passages, "passage", "collection")
        judged.setdefault(qid.strip(), {})[pid.strip()] = grade
    held = [q for q, js in judged.items() if any(r > 0 for r in js.values())]

    if eval_candidates_file:
        ranked = _run_file(eval_candidates_file, passages, eval_depth)
        without = [q for q in held if not ranked.get(q)]
        held = [q for q in held if ranked.get(q)][:max_eval_queries or None]
    else:
        from kdrun.data.bm25 import file_digest, search

        held = held[:max_eval_queries or None]
        pids = list(passages)
        hits = search([passages[p] for p in pids], [held_text[q] for q in held], eval_depth, file_digest(collection))
        ranked = {q: [pids[i] for i in found] for q, found in zip(held, hits)}
        without = [q for q in held if not ranked[q]]
        held = [q for q in held if ranked[q]]
    source = f"triples {triples}"
    if not train or not held:
        raise DataError(f"{source}: {len(train)} training examples (data.negatives_per_query={negatives_per_query}) "
                        f"and {len(held)} held-out queries with a relevant passage in data.qrels and candidates to "
                        f"re-rank; both must be non-empty")
    cands = [[passages[p] for p in ranked[q]] for q in held]
    labels = [[max(0, judged[q].get(p, 0)) for p in ranked[q]] for q in held]
    stats = {"passages": len(passages), "train_queries": len({q for q, _ in train_ids}), "eval_queries": len(held),
             "eval_queries_without_candidates": len(without), "train_examples": len(train),
             "eval_candidates_per_query": sum(map(len, cands)) / len(cands), "eval_depth": eval_depth}
    return RankingData(train, [held_text[q] for q in held], cands, labels, source, stats, train_ids=train_ids,
                       eval_qids=held, eval_pids=[ranked[q] for q in held], qrels={q: judged[q] for q in held},
                       eval_depth=eval_depth)
