"""Labelled texts through Hugging Face `datasets` (kdrun/data/sources.py): a hub dataset name (where the hub is
reachable or the dataset is cached), a local csv / tsv / json / jsonl / parquet file, or a save_to_disk folder."""
from __future__ import annotations

from typing import Optional

from kdrun.data import sources
from kdrun.data.text import ClassificationData, from_splits, split_labelled
from kdrun.errors import DataError


def load(*, name: Optional[str], path: Optional[str], text_field: str, label_field: str, train_split: str,
         eval_split: Optional[str], eval_fraction: float, split_salt: str, seed: int, max_train: Optional[int],
         max_eval: Optional[int]) -> ClassificationData:
    ds, source = sources.open_source(name, path)
    columns = sources.split(ds, train_split, source, "train_split").column_names
    for key, field in (("text_field", text_field), ("label_field", label_field)):
        if field not in columns:
            raise DataError(f"data.{key}={field}: {source} has columns {columns}")
    feature = ds[train_split].features[label_field]
    names = list(getattr(feature, "names", None) or [])
    class_label = bool(names)  # a ClassLabel feature: integer labels with names
    if not class_label:  # plain labels: their sorted distinct values become the classes
        names = sorted({str(v) for split in ds.values() for v in split[label_field]})

    def rows(split: str):
        out = []
        for i, (text, label) in enumerate(zip(ds[split][text_field], ds[split][label_field])):
            if not isinstance(text, str) or not text.strip() or label is None:
                raise DataError(f"{sources.row_where(source, split, i)}: empty or missing {text_field!r}/{label_field!r}")
            out.append((text, int(label) if class_label else names.index(str(label))))
        return out

    if eval_split:
        sources.split(ds, eval_split, source, "eval_split")
        return from_splits(rows(train_split), rows(eval_split), names, max_train=max_train, max_eval=max_eval,
                           source=source, salt=split_salt)
    return split_labelled(rows(train_split), names, eval_fraction=eval_fraction, split_salt=split_salt,
                          max_train=max_train, max_eval=max_eval, source=source)
