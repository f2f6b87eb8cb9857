"""Ranking: batches of (query, [positive, negatives]) -> [B, n] scores; held-out MRR@10, nDCG@10, Recall (metrics.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

from kdrun.models.encoders import in_batch_from_embeddings
from kdrun.tasks.ranking import FAMILY
from kdrun.tasks.ranking.metrics import as_run, fast_metrics, library_metrics, write_qrels, write_run


class Collate:
    """Example indices -> each model's own features (teacher and student may tokenize differently).

    The student's texts come as token ids from its row token tables (tokenised once) where it has them, else as texts.
    With precomputed `outputs` ({"scores": [N, n]}, and each teacher's "scores@<name>"), their rows are batched into
    "teacher_out" (a bi-encoder teacher's cached embeddings as the batch's in-batch scores); online, the teacher's
    features are built from the texts.
    """

    def __init__(self, task, online: bool):
        self.task, self.data, self.student = task, task.data, task.student
        self.teacher = task.teacher if online else None

    def __call__(self, index: Sequence[int]) -> Dict:
        index = np.asarray(index, dtype=np.int64)
        texts, tokens = None, self.task.tokens
        if tokens is not None:
            q_rows, p_rows = self.data.train_q[index], np.asarray(self.data.train_p[index]).reshape(-1)
            features = self.student.featurize_ids(tokens["query"].ids(q_rows), tokens["passage"].ids(p_rows))
        else:
            texts = self.data.batch_texts(index)
            features = self.student.featurize(*texts)
        batch = {"student": features, "size": len(index)}
        if self.teacher is None:  # every precomputed output: "scores" (and each teacher's "scores@<name>")
            out = {k: torch.as_tensor(np.asarray(v[index])) if isinstance(v, np.ndarray) else v[index]
                   for k, v in self.task.outputs.items()}
            if "query_emb" in out:  # a bi-encoder teacher's cached embeddings: its in-batch scores of this batch
                fold = out.pop("fold")
                out["in_batch_scores"] = in_batch_from_embeddings(out["query_emb"], out["passage_emb"], fold)
                out["passage_emb"] = out["passage_emb"][torch.arange(len(fold)), fold.long()]  # [B, n, H]: its own
            batch["teacher_out"] = out
        else:
            batch["teacher"] = self.teacher.featurize(*(texts or self.data.batch_texts(index)))
        return batch


def char_lengths(data) -> np.ndarray:
    """Bucketing keys without token tables (a cross-encoder student): the query's characters + the longest passage's,
    computed by Arrow over the text columns."""
    import pyarrow.compute as pc

    q = pc.utf8_length(data.queries.arrow().column("text")).to_numpy(zero_copy_only=False)
    p = pc.utf8_length(data.passages.arrow().column("text")).to_numpy(zero_copy_only=False)
    return q[np.asarray(data.train_q)] + p[np.asarray(data.train_p)].max(axis=1)


def precompute_teacher_scores(teacher, data, batch_size: int, runtime, start: int, stop: int,
                              chunk: int = 50_000) -> torch.Tensor:
    """[stop - start, n] teacher scores of training examples [start, stop), `chunk` examples at a time (memory bounded
    by the chunk; a bi-encoder embeds each distinct text of a chunk once)."""
    out = torch.empty((stop - start, data.train_p.shape[1]), dtype=torch.float32)
    for lo in range(start, stop, chunk):
        queries, passages = data.batch_texts(range(lo, min(lo + chunk, stop)))
        with runtime.autocast():
            rows = teacher.score_lists(queries, passages, batch_size, runtime.device)
        out[lo - start:lo - start + len(rows)] = torch.stack(rows).float().cpu()
    return out


def precompute_teacher_embeddings(teacher, data, batch_size: int, runtime, start: int, stop: int,
                                  chunk: int = 50_000) -> Dict[str, torch.Tensor]:
    """A bi-encoder teacher's outputs for in-batch terms (in_batch_kl) over training examples [start, stop): its
    scores [N, n], query embeddings [N, H], candidate embeddings [N, k, n, H] (k: fold teachers, 1 for one teacher)
    and each query's fold [N]; the collate turns a batch's rows into its [B, B*n] in-batch scores."""
    parts: Dict[str, List[torch.Tensor]] = {"query_emb": [], "passage_emb": [], "fold": []}
    for lo in range(start, stop, chunk):
        queries, passages = data.batch_texts(range(lo, min(lo + chunk, stop)))
        with runtime.autocast():
            q, p, fold = teacher.embed_lists(queries, passages, batch_size, runtime.device)
        for key, value in zip(parts, (q.float(), p.float(), fold)):
            parts[key].append(value.cpu())
    out = {key: torch.cat(v) for key, v in parts.items()}
    own = out["passage_emb"][torch.arange(len(out["fold"])), out["fold"]]  # [N, n, H]: each query's own teacher
    return {"scores": torch.einsum("bh,bnh->bn", out["query_emb"], own), **out}


def ranking_metrics(scores: Sequence[torch.Tensor], labels: Sequence[Sequence[int]], k: int = 10) -> Dict[str, float]:
    """MRR@k, nDCG@k and Recall@k of score lists against their candidates' labels (kdrun/tasks/ranking/metrics.py)."""
    return fast_metrics(scores, labels, k=k)


def score_lists(model, queries: List[str], candidates: List[List[str]], batch_size: int, runtime) -> List[torch.Tensor]:
    """Every candidate list scored by `model` (student or teacher alike) in eval mode."""
    was_training = model.training
    model.eval()
    with runtime.autocast():
        scores = model.score_lists(queries, candidates, batch_size, runtime.device)
    model.train(was_training)
    return [s.float() for s in scores]


class RankingTask:
    """(query, [positive, negatives]) examples; models score them; MRR@10, nDCG@10, Recall held out. The data is
    any `kdrun.data.ranking.Examples` (texts in lists, or memory-mapped columns): examples are indices into it."""
    name, primary = FAMILY.name, FAMILY.primary
    eval_chunk = 100_000  # candidates scored per evaluation step (bounded memory for a 1000-deep run of 7k queries)

    def __init__(self, data, teacher, student, runtime, eval_batch_size: int):
        self.data, self.teacher, self.student = data, teacher, student
        self.rt, self.eval_batch_size = runtime, eval_batch_size
        self.runs: Dict[str, Dict[str, Dict[str, float]]] = {}  # who -> the last reported evaluation's run
        self.tokens = None  # the student's row token tables {"query", "passage"} (prepare_student)
        self.outputs = None  # precomputed teacher outputs (attach)
        self.align = None  # an embedding-alignment term: the student is also evaluated against the teacher's passages
        self._teacher_passages = None  # (text -> row, [D, H]) of the held-out candidates, encoded once

    def use_loss(self, loss_fn) -> None:
        """An embedding-alignment term in the loss adds the asymmetric evaluation (eval/asymmetric/*)."""
        self.align = next((t for t in getattr(loss_fn, "terms", ()) if hasattr(t, "query_projection")), None)

    def prepare_student(self, student, hardware: Dict) -> Dict[str, float]:
        """Padding to a multiple of 8/16; the student's query and passage columns tokenised once (cached) and, per
        batch, split into up to `length_groups` groups padded apart. A cross-encoder reads pairs: nothing to tokenise
        ahead."""
        from kdrun.data.tokens import tokenize_columns
        from kdrun.models.encoders import CrossEncoder

        student.pad_multiple = hardware["pad_to_multiple_of"]
        if isinstance(student, CrossEncoder):
            return {}
        student.max_groups = hardware["length_groups"]
        self.tokens, metrics = tokenize_columns(student, {"query": self.data.queries, "passage": self.data.passages})
        if getattr(student, "projection_init", None) == "pca":  # a ColBERT student's projection, from its token states
            metrics.update(student.init_projection(self.projection_texts()))
        return metrics

    def projection_texts(self, examples: int = 64) -> List[str]:
        """The first training examples' queries and passages (distinct, in order): what a late-interaction
        student's projection is fitted to (student.projection_init=pca)."""
        queries, lists = self.data.batch_texts(range(min(examples, self.data.num_train)))
        return list(dict.fromkeys([t for q, ps in zip(queries, lists) for t in (q, *ps)]))

    def loss_context(self) -> Dict:
        return {}

    def examples(self):
        return range(self.data.num_train)

    def lengths(self) -> List[int]:
        """Bucketing keys: query tokens + the longest passage's tokens where the student's texts are tokenised, else
        characters."""
        if self.tokens is None:
            return char_lengths(self.data).tolist()
        q = self.tokens["query"].lengths[np.asarray(self.data.train_q)]
        p = self.tokens["passage"].lengths[np.asarray(self.data.train_p)].max(axis=1)
        return (q + p).tolist()

    def fingerprint(self) -> str:
        """The training examples as a teacher sees them (the teacher-output cache's key)."""
        return self.data.fingerprint()

    mapped_outputs = True  # cached teacher outputs stay memory-mapped: the collate takes a batch's rows
    teacher_chunk = 50_000  # examples per shard of a teacher pass (kdrun/teacher_cache.py)

    def teacher_outputs(self, teacher) -> Dict[str, torch.Tensor]:
        return self.teacher_outputs_range(teacher, 0, self.data.num_train)

    def teacher_outputs_range(self, teacher, start: int, stop: int) -> Dict[str, torch.Tensor]:
        """The teacher's scores of training examples [start, stop) (and its embeddings, for in-batch terms)."""
        if {"in_batch_scores", "embeddings"} & set(getattr(teacher, "outputs", ())):
            return precompute_teacher_embeddings(teacher, self.data, self.eval_batch_size, self.rt, start, stop)
        return {"scores": precompute_teacher_scores(teacher, self.data, self.eval_batch_size, self.rt, start, stop)}

    def attach(self, outputs: Dict[str, torch.Tensor]):
        """The examples, with the teacher's outputs (a row of each tensor per example) batched by the collate."""
        self.outputs = outputs
        return self.examples()

    def collate(self, online: bool) -> Collate:
        return Collate(self, online)

    def evaluate(self, model, who: str, final: bool = True) -> Dict[str, float]:
        """The held-out metrics: by ir_measures for the reported evaluations (`final`: before and after training),
        by kdrun's own equal computation for the periodic ones. The run of a reported evaluation is kept for
        `eval_files`. Candidates are scored `eval_chunk` at a time."""
        d = self.data
        scores: List[torch.Tensor] = []
        start = 0
        while start < len(d.eval_rows):
            stop, size = start, 0
            while stop < len(d.eval_rows) and (stop == start or size + len(d.eval_rows[stop]) <= self.eval_chunk):
                size += len(d.eval_rows[stop])
                stop += 1
            cands = [d.eval_texts(i) for i in range(start, stop)]
            scores += score_lists(model, d.eval_queries[start:stop], cands, self.eval_batch_size, self.rt)
            start = stop
        pids = [d.eval_pids(i) for i in range(len(d.eval_rows))]
        judged = [list(d.qrels.get(q, {}).values()) for q in d.eval_qids]
        extra = {}
        if who == "student" and self.align is not None:
            asym = self.asymmetric_scores(model)
            extra = {f"asymmetric/{k}": v for k, v in fast_metrics(asym, d.eval_labels, pids=pids, judged=judged,
                                                                     depth=d.eval_depth).items()}
        if not final:
            return {**fast_metrics(scores, d.eval_labels, pids=pids, judged=judged, depth=d.eval_depth), **extra}
        run = as_run(d.eval_qids, pids, scores)
        self.runs[who] = run
        return {**library_metrics(run, d.qrels, depth=d.eval_depth), **extra}

    def eval_variant(self) -> str:
        """What else an evaluation's result depends on (the evaluation cache's key): the asymmetric evaluation and
        its projection's weights."""
        if self.align is None:
            return ""
        from kdrun.store import weights_fingerprint

        return "asymmetric:" + weights_fingerprint(self.align)

    @torch.inference_mode()
    def asymmetric_scores(self, model) -> List[torch.Tensor]:
        """Each held-out query encoded by the student (and projected into the teacher's space), its candidates by
        the teacher (encoded once per run: the teacher is frozen): the scores of a student that serves queries
        against an index the teacher built."""
        d, teacher = self.data, getattr(self.teacher, "main", self.teacher)  # (out-of-fold: the first fold's)
        if self._teacher_passages is None:
            flat = [t for i in range(len(d.eval_rows)) for t in d.eval_texts(i)]
            with self.rt.autocast():
                self._teacher_passages = teacher.embed_texts(flat, self.eval_batch_size, self.rt.device,
                                                             desc="evaluate: teacher passages")
        index, passages = self._teacher_passages
        was_training = model.training
        model.eval()
        with self.rt.autocast():
            q_index, q_emb = model.embed_texts(d.eval_queries, self.eval_batch_size, self.rt.device)
        model.train(was_training)
        q = self.align.query_projection(q_emb.to(next(self.align.parameters(), q_emb).device)).float().cpu()
        if teacher.similarity == "cos":
            q = torch.nn.functional.normalize(q, dim=-1)
        return [passages[[index[t] for t in d.eval_texts(i)]] @ q[q_index[query]]
                for i, query in enumerate(d.eval_queries)]

    def eval_digest(self) -> str:
        """SHA-256 of the held-out evaluation as a model sees it: each query's id and text, its candidates' ids and
        texts in order, the judgments and the depth (kdrun/eval_cache.py keys on it)."""
        import hashlib
        import json

        if getattr(self, "_eval_digest", None):  # the held-out data does not change in a run: hashed once
            return self._eval_digest
        d = self.data
        h = hashlib.sha256(json.dumps([d.eval_depth, sorted((q, sorted(j.items())) for q, j in d.qrels.items())])
                           .encode())
        for i, (qid, query) in enumerate(zip(d.eval_qids, d.eval_queries)):
            h.update(json.dumps([qid, query, d.eval_pids(i), d.eval_texts(i), list(d.eval_labels[i])]).encode())
        self._eval_digest = h.hexdigest()
        return self._eval_digest

    def eval_state(self, who: str):
        """What a reported evaluation leaves behind (its run, for the TREC files): kept with a cached evaluation."""
        return self.runs.get(who)

    def restore_eval(self, who: str, state) -> None:
        if state is not None:
            self.runs[who] = state

    def eval_files(self, directory: Path) -> List[Path]:
        """The last reported evaluations as TREC run files (run.student.trec, run.teacher.trec) and the held-out
        qrels (qrels.trec): any trec_eval or ir_measures reproduces the logged metrics from them."""
        d = self.data
        files = [write_run(Path(directory) / f"run.{who}.trec", run, f"kdrun-{who}") for who, run in self.runs.items()]
        return files + [write_qrels(Path(directory) / "qrels.trec", {q: d.qrels.get(q, {}) for q in d.eval_qids})]

    def eval_size(self) -> int:
        """Held-out examples one evaluation goes through (for the per-example latency metric)."""
        return len(self.data.eval_queries)

    def eval_fingerprint(self) -> str:
        return self.eval_digest()

    def model_examples(self) -> list:
        """The logged model's input example: held-out (query, passage) pairs, each query's first candidates."""
        return [(q, t) for i, q in enumerate(self.data.eval_queries[:2]) for t in self.data.eval_texts(i)[:2]]

    def describe(self) -> str:
        return (f"held-out queries: {len(self.data.eval_queries)}, candidates per query: "
                f"{self.data.stats['eval_candidates_per_query']:.0f}")
