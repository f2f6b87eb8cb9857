"""Length-bucketed batches: shuffle, sort by length within large chunks, cut batches, shuffle batches.

Batches hold examples of similar length, so padding (wasted compute) stays small, while the order
across batches stays random. Each pass over the sampler (an epoch) draws a new order from its seed.
Under DDP every rank draws the same order and takes every world_size-th batch from its rank on: shards
of whole buckets, the same number of batches on every rank (extra batches at the end are left out).
A resumed run starts mid-epoch with `resume_at(epoch, batch)`, in the same order.
"""
from __future__ import annotations

import random
from typing import Iterator, List, Sequence


class BucketBatchSampler:
    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, chunk_batches: int = 50,
                 drop_last: bool = True, rank: int = 0, world_size: int = 1):
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.chunk = batch_size * chunk_batches
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skip = 0  # batches of the next epoch already trained on (a resumed run)

    def resume_at(self, epoch: int, batch: int) -> None:
        """Continue from batch `batch` of epoch `epoch` (0-based): the order is the one that epoch always draws."""
        self.epoch, self.skip = epoch, batch

    def __len__(self) -> int:
        n = len(self.lengths) // self.batch_size
        n = n if self.drop_last or len(self.lengths) % self.batch_size == 0 else n + 1
        return n // self.world_size

    def __iter__(self) -> Iterator[List[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        batches = []
        for start in range(0, len(order), self.chunk):
            chunk = sorted(order[start:start + self.chunk], key=self.lengths.__getitem__)
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()  # chunks are whole multiples of batch_size: only the last batch can be short
        rng.shuffle(batches)
        keep = len(batches) // self.world_size * self.world_size
        mine, self.skip = batches[self.rank:keep:self.world_size][self.skip:], 0
        return iter(mine)


def to_device(obj, device):
    """Tensors in (nested) dicts/lists to the device, non-blocking (from pinned memory: asynchronous)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
