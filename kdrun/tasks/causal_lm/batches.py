"""A causal-LM batch from token sequences of any lengths (the training collate's and on-policy generation's)."""
from __future__ import annotations

from typing import Dict, Sequence

import torch


def collate_rows(ids: Sequence[torch.Tensor], trained: Sequence[torch.Tensor], pad_id: int) -> Dict:
    """Examples of any lengths as one right-padded batch: the student's features (an attention mask only when
    something is padded: packed blocks run as before), next-token labels (-100 where untrained) and the loss mask
    over the labels."""
    longest = max(len(x) for x in ids)
    if all(len(x) == longest for x in ids):
        feats = {"input_ids": torch.stack(list(ids))}
        flags = torch.stack(list(trained))
    else:
        feats = {"input_ids": torch.full((len(ids), longest), pad_id, dtype=torch.long),
                 "attention_mask": torch.zeros((len(ids), longest), dtype=torch.long)}
        flags = torch.zeros((len(ids), longest), dtype=torch.bool)
        for r, (x, f) in enumerate(zip(ids, trained)):
            feats["input_ids"][r, :len(x)], feats["attention_mask"][r, :len(x)], flags[r, :len(x)] = x, 1, f
    labels = feats["input_ids"][:, 1:]
    loss_mask = flags[:, 1:]
    if not bool(loss_mask.all()):
        labels = labels.masked_fill(~loss_mask, -100)
    return {"student": feats, "labels": labels, "loss_mask": loss_mask}
