"""Labelled texts through Hugging Face `datasets`: a hub dataset name (where the hub is reachable or the
dataset is cached), or local csv / json / jsonl / parquet files."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from kdrun.data.text import ClassificationData, from_splits, split_labelled
from kdrun.errors import DataError

_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _load(name: Optional[str], path: Optional[str]):
    import datasets

    datasets.disable_progress_bars()
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DataError(f"data.path={path}: no such file")
        builder = _BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise DataError(f"data.path={path}: unknown format {p.suffix!r}; use one of {sorted(_BUILDERS)}")
        extra = {"delimiter": "\t"} if p.suffix.lower() == ".tsv" else {}
        try:
            return datasets.load_dataset(builder, data_files={"train": str(p)}, **extra), str(p)
        except Exception as e:  # a malformed file: datasets' own message, first line
            raise DataError(f"data.path={path}: cannot read as {builder}: {str(e).strip().splitlines()[0]}") from e
    if not name:
        raise DataError("data: set data.name (a Hugging Face dataset) or data.path=FILE")
    from kdrun.models.hub import hub_reachable

    previous = datasets.config.HF_HUB_OFFLINE
    # hub unreachable: the local datasets cache only, failing at once instead of retrying for half a minute
    datasets.config.HF_HUB_OFFLINE = previous or not hub_reachable()
    try:
        return datasets.load_dataset(name), name
    except Exception as e:
        raise DataError(f"data.name={name}: cannot load the dataset ({str(e).strip().splitlines()[0]}). Where the "
                        "hub is not reachable, save it as a file and pass data.path=FILE (csv, json, jsonl, parquet)") from e
    finally:
        datasets.config.HF_HUB_OFFLINE = previous


def load(*, name: Optional[str], path: Optional[str], text_field: str, label_field: str, train_split: str,
         eval_split: Optional[str], eval_fraction: float, split_salt: str, seed: int, max_train: Optional[int],
         max_eval: Optional[int]) -> ClassificationData:
    ds, source = _load(name, path)
    if train_split not in ds:
        raise DataError(f"data.train_split={train_split}: {source} has splits {list(ds)}")
    columns = ds[train_split].column_names
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
                raise DataError(f"{source} ({split}), row {i + 1}: empty or missing {text_field!r}/{label_field!r}")
            out.append((text, int(label) if class_label else names.index(str(label))))
        return out

    if eval_split:
        if eval_split not in ds:
            raise DataError(f"data.eval_split={eval_split}: {source} has splits {list(ds)}")
        return from_splits(rows(train_split), rows(eval_split), names, max_train=max_train, max_eval=max_eval,
                           source=source, salt=split_salt)
    return split_labelled(rows(train_split), names, eval_fraction=eval_fraction, split_salt=split_salt,
                          max_train=max_train, max_eval=max_eval, source=source)
