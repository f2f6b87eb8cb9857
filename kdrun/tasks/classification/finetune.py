"""Fine-tune a classifier teacher on the task's training texts before distillation, cached by content.

No fine-tuned classifier for the offline data ships with any package, so kdrun can make one: the base
encoder gets a classification head and `teacher.finetune.steps` steps of cross-entropy through the same
loop the students train in. The result is stored under `teacher.finetune.cache_dir/<key>`, where the key
hashes the base weights and tokenizer files, the training texts and labels, the label names and every
fine-tuning setting: a sweep over student settings fine-tunes once, and any change retrains.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)
_VERSION = "1"  # bump when the fine-tuning procedure changes


def _fingerprint(source: str, data, settings: dict) -> str:
    h = hashlib.sha256(f"kdrun-finetune-{_VERSION}|{json.dumps(settings, sort_keys=True)}".encode())
    src = Path(source)
    if src.is_dir():
        for f in sorted(src.rglob("*")):
            if f.is_file() and f.suffix in (".safetensors", ".bin", ".json", ".txt", ".model"):
                h.update(f.relative_to(src).as_posix().encode())
                with f.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
    else:
        h.update(f"hub:{source}".encode())
    h.update(json.dumps([data.label_names, data.train_texts, data.train_labels]).encode())
    return h.hexdigest()[:20]


def finetuned_teacher(source: str, data, *, steps: int, lr: float, batch_size: int, warmup_ratio: float, seed: int,
                      cache_dir, max_length: int, runtime):
    """(directory of the fine-tuned classifier, info metrics). Trains on a cache miss, else reuses."""
    settings = dict(steps=steps, lr=lr, batch_size=batch_size, warmup_ratio=warmup_ratio, seed=seed,
                    max_length=max_length)
    from kdrun.models.hub import cache_root, cached, publish, staging_dir

    root = Path(cache_dir).expanduser() if cache_dir else cache_root() / "teachers"
    out = root / _fingerprint(source, data, settings)
    if cached(out):
        log.info("teacher: fine-tuned classifier from the cache: %s", out)
        return str(out), {"teacher/finetune_cache_hit": 1.0, "teacher/finetune_seconds": 0.0}
    t0 = time.perf_counter()
    log.info("teacher: fine-tuning %s for %d steps on %d texts (cached afterwards in %s)", source, steps,
             len(data.train_texts), out)
    model = _train(source, data, runtime=runtime, **settings)
    seconds = time.perf_counter() - t0
    tmp = staging_dir(out)
    model.save(tmp)
    publish(tmp, out, json.dumps({"source": source, **settings, "seconds": seconds}))
    return str(out), {"teacher/finetune_cache_hit": 0.0, "teacher/finetune_seconds": seconds}


def _train(source: str, data, *, steps, lr, batch_size, warmup_ratio, seed, max_length, runtime):
    import torch
    from torch.utils.data import DataLoader

    from kdrun import train as loop
    from kdrun.data.batching import BucketBatchSampler
    from kdrun.losses import Context, WeightedLoss
    from kdrun.models.classifier import SequenceClassifier
    from kdrun.models.hub import load_pretrained
    from kdrun.tasks.classification import Collate

    torch.manual_seed(seed)
    names = list(data.label_names)
    model, tok = load_pretrained("teacher", source, "AutoModelForSequenceClassification", num_labels=len(names),
                                 id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    clf = SequenceClassifier(model, tok, max_length).to(runtime.device)
    examples = list(zip(data.train_texts, data.train_labels))
    sampler = BucketBatchSampler([len(t) for t in data.train_texts], min(batch_size, len(examples)), seed)
    loader = DataLoader(examples, batch_sampler=sampler, collate_fn=Collate(None, clf, teacher_outputs=False))
    optim = loop.make_optim(clf, runtime, steps, lr=lr, weight_decay=0.01, betas=[0.9, 0.999], eps=1e-8,
                            schedule="linear", warmup_ratio=warmup_ratio, max_grad_norm=1.0)
    losses = []
    loop.train(clf, None, WeightedLoss([("ce", 1.0)], Context(task="classification")), loop.forever(loader), optim,
               runtime, max_steps=steps, grad_accum=1, log_every=max(1, steps // 10), eval_every=0,
               log=lambda values, step: losses.append(values["train/loss"]), evaluate=lambda step: {}, desc="fine-tune")
    log.info("teacher fine-tune: cross-entropy %s", " -> ".join(f"{v:.3f}" for v in losses[:1] + losses[-1:]))
    clf.eval()
    return clf
