"""Fine-tune a ranking teacher on the training split before distillation, cached by content (kdrun/finetune.py).

No ranking model fine-tuned on the offline data ships with any package, and the paper's teacher is a BERT
cross-encoder fine-tuned on MS MARCO's training triples (BERT_CAT). kdrun makes one from a base encoder:
- `teacher.kind=cross_encoder`: the encoder reads (query, passage) together and a new one-logit head scores the pair;
- `teacher.kind=bi_encoder`: the encoder embeds query and passage apart (teacher.pooling, teacher.similarity).
Both train with cross-entropy of the positive against the data's mined hard negatives (each training example's
BM25 negatives: data.negatives_per_query, data.mine_depth) and, with `teacher.finetune.in_batch` (default: true for
a bi-encoder, false for a cross-encoder, which would score B x B*n pairs per step), every other passage of the batch.
Only the training examples are read: the cache key hashes them and never the held-out queries.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def finetuned_teacher(source: str, data, *, kind: str, pooling: str, similarity: str, max_length: int, runtime,
                      steps: int, lr: float, batch_size: int, warmup_ratio: float, seed: int, cache_dir,
                      in_batch=None, hardware=None, negatives=None, scale: float = 1.0):
    """(directory of the fine-tuned teacher, info metrics). Trains on a cache miss, else reuses. `hardware`: the
    profile's padding (pad_to_multiple_of, length_groups), as the students train; it does not change the result's
    key (padding does not change what is learned, up to float rounding). `negatives`: train on the first N of each
    example's mined negatives (fewer texts a step: a cheaper fine-tune; the key hashes the examples as trained).
    `scale`: the scores times this in the cross-entropy (a cosine bi-encoder trains at 1/temperature, as
    sentence-transformers' MultipleNegativesRankingLoss does at 20; its scores stay cosines)."""
    import copy

    import numpy as np

    from kdrun import finetune

    if negatives is not None and negatives + 1 < data.train_p.shape[1]:
        data = copy.copy(data)  # (the text columns are shared)
        data.train_p, data._fingerprint = np.asarray(data.train_p[:, :negatives + 1]), None
    in_batch = (kind == "bi_encoder") if in_batch is None else bool(in_batch)
    settings = dict(kind=kind, max_length=max_length, steps=steps, lr=lr, batch_size=batch_size,
                    warmup_ratio=warmup_ratio, seed=seed, in_batch=in_batch,
                    **({"pooling": pooling, "similarity": similarity} if kind == "bi_encoder" else {}),
                    **({"scale": float(scale)} if scale != 1.0 else {}))  # (absent at 1: earlier keys stay)
    return finetune.cached("ranking", source, data.fingerprint(), settings, cache_dir,
                           lambda: _train(source, data, runtime=runtime, hardware=hardware, **settings),
                           kind.replace("_", "-"), runtime)


def trainable_scorer(source: str, kind: str, max_length: int, pooling: str = "mean", similarity: str = "dot"):
    """A ranking model to fine-tune from a base encoder: a cross-encoder with a new one-logit head, or a bi-encoder."""
    from kdrun.models.encoders import BiEncoder, CrossEncoder
    from kdrun.models.hub import load_pretrained

    if kind == "cross_encoder":
        model, tok = load_pretrained("teacher", source, "AutoModelForSequenceClassification", num_labels=1,
                                     ignore_mismatched_sizes=True)
        return CrossEncoder(model, tok, 0, max_length)
    model, tok = load_pretrained("teacher", source, "AutoModel")
    return BiEncoder(model, tok, pooling, similarity, max_length)


def _train(source: str, data, *, kind, max_length, steps, lr, batch_size, warmup_ratio, seed, in_batch, runtime,
           hardware=None, pooling="mean", similarity="dot", scale=1.0):
    import torch
    from torch.utils.data import DataLoader

    from kdrun import train as loop
    from kdrun.data.batching import BucketBatchSampler
    from kdrun.losses import Context, WeightedLoss
    from kdrun.models import finish_student
    from kdrun.tasks.ranking.task import RankingTask

    torch.manual_seed(seed)
    scorer = finish_student(trainable_scorer(source, kind, max_length, pooling, similarity)).to(runtime.device)
    task = RankingTask(data, None, scorer, runtime, batch_size)
    hw = hardware or {}
    task.prepare_student(scorer, {"pad_to_multiple_of": hw.get("pad_to_multiple_of", 8),
                                  "length_groups": hw.get("length_groups", 1)})
    loss_fn = WeightedLoss([("ce", 1.0, {"in_batch": in_batch, "scale": scale})], Context(task="ranking"))
    scorer.request(loss_fn.student_needs)
    size = min(batch_size, data.num_train)
    loader = DataLoader(task.examples(), batch_sampler=BucketBatchSampler(task.lengths(), size, seed),
                        collate_fn=task.collate(online=False))
    task.outputs = {}  # no teacher behind this one: the collate batches no teacher outputs
    optim = loop.make_optim(scorer, runtime, steps, lr=lr, weight_decay=0.01, betas=[0.9, 0.999], eps=1e-8,
                            schedule="linear", warmup_ratio=warmup_ratio, max_grad_norm=1.0)
    losses = []
    loop.train(scorer, None, loss_fn, loop.forever(loader), optim, runtime, max_steps=steps, grad_accum=1,
               log_every=max(1, steps // 20), eval_every=0, log=lambda values, step: losses.append(values["train/loss"]),
               evaluate=lambda step: {}, desc=f"fine-tune {kind.replace('_', '-')} teacher")
    log.info("teacher fine-tune: cross-entropy %s", " -> ".join(f"{v:.3f}" for v in losses[:1] + losses[-1:]))
    scorer.eval()
    return scorer, {"teacher/finetune_first_loss": losses[0], "teacher/finetune_last_loss": losses[-1]}
