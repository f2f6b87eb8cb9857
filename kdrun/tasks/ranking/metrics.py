"""Ranking metrics as the IR community computes them (trec_eval's definitions):

    mrr_at_10        RR@10: 1 / rank of the first relevant (rel >= 1) candidate in the top 10, else 0
    ndcg_at_10       nDCG@10: gains are the graded relevance, discount log2(rank + 1); the ideal ranking is over every
                     judged passage of the query in the qrels, not only the re-ranked ones
    recall_at_10     R@10: relevant in the top 10 / relevant in the qrels
    recall_at_D      R@D for a run re-ranked to depth D (data=triples: data.eval_depth, 1000 by default)
    mrr_at_10_rel2   RR(rel=2)@10, only where the qrels are graded (TREC-DL: 2 = highly relevant)

Candidates are ranked by descending score. Ties follow the tools ir_measures runs: for RR, MS MARCO's official
script (the lower passage id first, as strings); for nDCG and R, trec_eval (the higher id first). So a list ranked
here and the same list written as a TREC run and scored by ir_measures agree even where scores tie.
`fast_metrics` is kdrun's own (periodic evaluations during training); `library_metrics` is ir_measures (the
evaluations a run reports before and after training). tests/tasks/ranking/test_metrics.py checks that they agree.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

K = 10


def ranked(scores: Sequence[float], pids: Optional[Sequence[str]] = None, ties: str = "trec_eval") -> List[int]:
    """Candidate indices best first: score descending; ties by passage id, descending ("trec_eval") or ascending
    ("msmarco"), or in candidate order when there are no ids."""
    s = [float(x) for x in scores]
    if pids is None:
        return sorted(range(len(s)), key=lambda i: -s[i])  # stable: ties keep candidate order
    if ties == "msmarco":
        return sorted(range(len(s)), key=lambda i: (-s[i], pids[i]))
    return sorted(range(len(s)), key=lambda i: (s[i], pids[i]), reverse=True)


def names(depth: Optional[int], graded: bool, k: int = K) -> List[str]:
    """The metric names an evaluation reports."""
    out = [f"mrr_at_{k}", f"ndcg_at_{k}", f"recall_at_{k}"]
    if depth and depth != k:
        out.append(f"recall_at_{depth}")
    if graded:
        out.append(f"mrr_at_{k}_rel2")
    return out


def fast_metrics(scores: Sequence, labels: Sequence[Sequence[int]], *, pids: Optional[Sequence[Sequence[str]]] = None,
                 judged: Optional[Sequence[Sequence[int]]] = None, depth: Optional[int] = None,
                 k: int = K) -> Dict[str, float]:
    """Mean over queries. labels: each candidate's graded relevance; judged: per query every relevance in its qrels
    (the ideal ranking and the recall denominator; None: the candidates' own labels)."""
    if len(scores) != len(labels) or not scores:
        raise ValueError(f"ranking metrics: {len(scores)} score lists for {len(labels)} label lists")
    judged = judged if judged is not None else labels
    graded = any(r >= 2 for js in judged for r in js)
    sums = dict.fromkeys(names(depth, graded, k), 0.0)
    for i, (s, y) in enumerate(zip(scores, labels)):
        s = s.tolist() if hasattr(s, "tolist") else s
        ids = pids[i] if pids is not None else None
        rels = [y[j] for j in ranked(s, ids)]
        by_rr = [y[j] for j in ranked(s, ids, ties="msmarco")][:k]
        relevant = sorted((r for r in judged[i] if r > 0), reverse=True)
        top = rels[:k]
        first = next((r for r, rel in enumerate(by_rr, 1) if rel > 0), None)
        sums[f"mrr_at_{k}"] += 1.0 / first if first else 0.0
        ideal = sum(g / math.log2(r + 1) for r, g in enumerate(relevant[:k], 1))
        dcg = sum(g / math.log2(r + 1) for r, g in enumerate(top, 1) if g > 0)
        sums[f"ndcg_at_{k}"] += dcg / ideal if ideal else 0.0
        if relevant:
            sums[f"recall_at_{k}"] += sum(1 for r in top if r > 0) / len(relevant)
            if f"recall_at_{depth}" in sums:
                sums[f"recall_at_{depth}"] += sum(1 for r in rels[:depth] if r > 0) / len(relevant)
        if graded:
            first2 = next((r for r, rel in enumerate(by_rr, 1) if rel >= 2), None)
            sums[f"mrr_at_{k}_rel2"] += 1.0 / first2 if first2 else 0.0
    return {name: v / len(scores) for name, v in sums.items()}


def as_run(qids: Sequence[str], pids: Sequence[Sequence[str]], scores: Sequence) -> Dict[str, Dict[str, float]]:
    """{query id: {passage id: score}} (ir_measures' run layout)."""
    return {q: {p: float(x) for p, x in zip(ps, s.tolist() if hasattr(s, "tolist") else s)}
            for q, ps, s in zip(qids, pids, scores)}


def library_metrics(run: Dict[str, Dict[str, float]], qrels: Dict[str, Dict[str, int]], depth: Optional[int] = None,
                    k: int = K) -> Dict[str, float]:
    """The same metrics computed by ir_measures (pytrec_eval underneath) over the run's queries."""
    import ir_measures
    from ir_measures import R, RR, nDCG

    graded = any(r >= 2 for q in run for r in qrels.get(q, {}).values())
    measure = {f"mrr_at_{k}": RR @ k, f"ndcg_at_{k}": nDCG @ k, f"recall_at_{k}": R @ k,
               f"recall_at_{depth}": R @ depth, f"mrr_at_{k}_rel2": RR(rel=2) @ k}
    wanted = {n: measure[n] for n in names(depth, graded, k)}
    found = ir_measures.calc_aggregate(list(wanted.values()), {q: qrels.get(q, {}) for q in run}, run)
    return {n: float(found.get(m, 0.0)) for n, m in wanted.items()}


def write_run(path: Path, run: Dict[str, Dict[str, float]], tag: str) -> Path:
    """A TREC run file (qid Q0 pid rank score tag), best first; 9 significant digits keep float32 scores exact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for q, cands in run.items():
            ps = list(cands)
            for rank, j in enumerate(ranked([cands[p] for p in ps], ps), 1):
                out.write(f"{q} Q0 {ps[j]} {rank} {cands[ps[j]]:.9g} {tag}\n")
    return path


def write_qrels(path: Path, qrels: Dict[str, Dict[str, int]]) -> Path:
    """TREC qrels (qid 0 pid rel)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as out:
        for q, judged in qrels.items():
            for p, rel in judged.items():
                out.write(f"{q} 0 {p} {rel}\n")
    return path
