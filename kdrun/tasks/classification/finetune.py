"""Fine-tune a classifier teacher on the task's training texts before distillation, cached by content
(kdrun/finetune.py): the base encoder gets a classification head and `teacher.finetune.steps` steps of
cross-entropy through the same loop the students train in."""
from __future__ import annotations

import hashlib
import json
import logging

log = logging.getLogger(__name__)


def data_digest(data) -> str:
    """The training texts, their labels and the label names (the held-out texts are not in it)."""
    return hashlib.sha256(json.dumps([data.label_names, data.train_texts, data.train_labels]).encode()).hexdigest()


def finetuned_teacher(source: str, data, *, steps: int, lr: float, batch_size: int, warmup_ratio: float, seed: int,
                      cache_dir, max_length: int, runtime, in_batch=None):
    """(directory of the fine-tuned classifier, info metrics). Trains on a cache miss, else reuses."""
    from kdrun import finetune

    settings = dict(steps=steps, lr=lr, batch_size=batch_size, warmup_ratio=warmup_ratio, seed=seed,
                    max_length=max_length)
    return finetune.cached("classification", source, data_digest(data), settings, cache_dir,
                           lambda: _train(source, data, runtime=runtime, **settings), "classifier", runtime)


def _train(source: str, data, *, steps, lr, batch_size, warmup_ratio, seed, max_length, runtime):
    import torch
    from torch.utils.data import DataLoader

    from kdrun import train as loop
    from kdrun.data.batching import BucketBatchSampler
    from kdrun.losses import Context, WeightedLoss
    from kdrun.models.classifier import SequenceClassifier
    from kdrun.models.hub import load_pretrained
    from kdrun.tasks.classification.task import Collate

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
    return clf, {"teacher/finetune_first_loss": losses[0], "teacher/finetune_last_loss": losses[-1]}
