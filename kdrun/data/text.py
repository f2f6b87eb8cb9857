"""Data sets of texts: labelled texts for classification, documents for causal-LM distillation."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from kdrun.data.ranking import hash_split
from kdrun.errors import DataError


@dataclass
class ClassificationData:
    train_texts: List[str]
    train_labels: List[int]
    eval_texts: List[str]
    eval_labels: List[int]
    label_names: List[str]
    source: str = ""
    stats: Dict[str, float] = field(default_factory=dict)


@dataclass
class CorpusData:
    """Documents for a causal LM; the task tokenises them with the teacher's tokenizer and packs them. Or, with
    `train_chats`, conversations: each a dict {"prompt": str, "completion": str} (joined as they are, loss on the
    completion and EOS) or {"messages": [{"role", "content"}, ...], "train_from": i} (the chat template's rendering,
    loss on the assistant's messages from index i), one example each of at most `max_length` tokens."""
    train_texts: List[str]
    eval_texts: List[str]
    block_size: int
    max_train_blocks: Optional[int] = None
    max_eval_blocks: Optional[int] = None
    source: str = ""
    stats: Dict[str, float] = field(default_factory=dict)
    train_chats: Optional[List[dict]] = None
    eval_chats: Optional[List[dict]] = None
    max_length: int = 256


def split_labelled(items: Sequence[Tuple[str, int]], label_names: List[str], *, eval_fraction: float, split_salt: str,
                   max_train: Optional[int], max_eval: Optional[int], source: str) -> ClassificationData:
    """Hash split of (text, label) items (a text is on one side only), with optional caps."""
    train, held = hash_split(items, split_salt, eval_fraction, text=lambda item: item[0])
    return from_splits(train, held, label_names, max_train=max_train, max_eval=max_eval, source=source,
                       salt=split_salt)


def from_splits(train: Sequence[Tuple[str, int]], held: Sequence[Tuple[str, int]], label_names: List[str], *,
                max_train: Optional[int], max_eval: Optional[int], source: str,
                salt: str = "kdrun-v1") -> ClassificationData:
    """Caps take a random subset (the order is shuffled by the salt, not the training seed, so a capped
    eval set is the same for every run), never the first rows of a file sorted by class."""
    train, held = list(train), list(held)
    random.Random(f"{salt}/train").shuffle(train)
    random.Random(f"{salt}/eval").shuffle(held)
    train, held = train[:max_train or None], held[:max_eval or None]
    if not train or not held:
        raise DataError(f"{source}: {len(train)} training and {len(held)} eval texts after the split; both must be "
                        "non-empty (check data.eval_fraction and the caps)")
    counts = {f"class_{n}": sum(1 for _, y in train if y == i) for i, n in enumerate(label_names)}
    stats = {"classes": len(label_names), "train_texts": len(train), "eval_texts": len(held), **counts}
    return ClassificationData([t for t, _ in train], [y for _, y in train], [t for t, _ in held],
                              [y for _, y in held], list(label_names), source, stats)
