"""Where a data set's rows come from, for every family: a user's file (csv, tsv, json, jsonl, parquet), a folder
written by `datasets`' save_to_disk, or a Hugging Face dataset name (where the hub is reachable or the dataset is in
the local `datasets` cache). Each gives a DatasetDict of splits; the families' loaders pick their columns and say,
naming the file and row, what is missing or malformed.

    ds, where = open_source(name=None, path="train.jsonl")   # ({"train": Dataset}, "train.jsonl")
    train = split(ds, "train", where, "train_split")          # refused when absent or empty
    require(train.column_names, ["anchor", "query"], where, "query")
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from kdrun.errors import DataError

BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def open_source(name: Optional[str], path: Optional[str], key: str = "data"):
    """(DatasetDict, how to name it in messages) from `{key}.path` (a file or a save_to_disk folder) or
    `{key}.name` (a hub dataset)."""
    import datasets

    datasets.disable_progress_bars()
    if path:
        p = Path(path).expanduser()
        if p.is_dir():
            return _folder(p, f"{key}.path={path}"), str(p)
        if not p.is_file():
            raise DataError(f"{key}.path={path}: no such file or folder")
        return _file(p, f"{key}.path={path}"), str(p)
    if not name:
        raise DataError(f"{key}: set {key}.name (a Hugging Face dataset) or {key}.path (a file: csv, tsv, json, "
                        "jsonl, parquet; or a folder written by `datasets`' save_to_disk)")
    from kdrun.models.hub import hub_reachable

    previous = datasets.config.HF_HUB_OFFLINE
    # hub unreachable: the local datasets cache only, failing at once instead of retrying for half a minute
    datasets.config.HF_HUB_OFFLINE = previous or not hub_reachable()
    try:
        return datasets.load_dataset(name), name
    except Exception as e:
        raise DataError(f"{key}.name={name}: cannot load the dataset ({_first_line(e)}). Where the hub is not "
                        f"reachable, save it (save_to_disk, or a file) and pass {key}.path=...") from e
    finally:
        datasets.config.HF_HUB_OFFLINE = previous


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _folder(p: Path, where: str):
    import datasets

    if not ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
        files = sorted(f.name for f in p.iterdir())[:8]
        raise DataError(f"{where}: not a folder written by `datasets`' save_to_disk (no dataset_dict.json or "
                        f"state.json; it holds {files}); pass a file (csv, tsv, json, jsonl, parquet) or such a folder")
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001 - a damaged folder: datasets' own reason, first line
        raise DataError(f"{where}: cannot read the saved dataset ({_first_line(e)})") from e
    return ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict({"train": ds})


def _file(p: Path, where: str):
    import datasets

    builder = BUILDERS.get(p.suffix.lower())
    if builder is None:
        raise DataError(f"{where}: unknown format {p.suffix!r}; use one of {sorted(BUILDERS)} or a save_to_disk folder")
    if builder == "json":
        _check_json_lines(p, where)
    extra = {"delimiter": "\t"} if p.suffix.lower() == ".tsv" else {}
    try:
        return datasets.load_dataset(builder, data_files={"train": str(p)}, **extra)
    except Exception as e:  # noqa: BLE001 - a malformed file: datasets' own message, first line
        if "corresponds to no data" in str(e):
            raise DataError(f"{where}: the file has no rows") from e
        raise DataError(f"{where}: cannot read it as {builder}: {_first_line(e)}") from e


def _check_json_lines(p: Path, where: str) -> None:
    """A JSON-lines file's first bad line, by number (datasets' own error names none). A file that is one JSON
    document (a list of rows, or {"data": [...]}) is left to datasets."""
    try:
        with open(p, encoding="utf-8") as f:
            first = f.read(1 << 16).lstrip()
    except UnicodeDecodeError:
        raise DataError(f"{where}: not UTF-8 text") from None
    if first.startswith("["):
        return
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                if n == 1:  # maybe one JSON document over several lines
                    try:
                        json.loads(p.read_text(encoding="utf-8"))
                        return
                    except ValueError:
                        pass
                raise DataError(f"{p}:{n}: not a JSON object ({e})") from None
            if not isinstance(row, dict):
                raise DataError(f"{p}:{n}: a row must be a JSON object of columns, got {type(row).__name__}")


def split(ds, name: str, where: str, key: str):
    """A split by name, or a clear error listing the ones there are."""
    if name not in ds:
        raise DataError(f"data.{key}={name}: {where} has splits {list(ds)}")
    if len(ds[name]) == 0:
        raise DataError(f"{where} ({name}): the split is empty")
    return ds[name]


def pick(columns: Sequence[str], wanted: Sequence[str]) -> Optional[str]:
    """The first of `wanted` that is a column."""
    return next((c for c in wanted if c in columns), None)


def require(columns: Sequence[str], wanted: Sequence[str], where: str, what: str) -> str:
    got = pick(columns, wanted)
    if got is None:
        raise DataError(f"{where}: no {what} column (looked for {list(wanted)}; it has {list(columns)})")
    return got


def row_where(where: str, split_name: str, i: int) -> str:
    """How a message names row i (0-based) of a split: the line of a JSON-lines file, else the row number."""
    if Path(where).suffix.lower() == ".jsonl":
        return f"{where} ({split_name}), row {i + 1} (the {_ordinal(i + 1)} non-blank line)"
    return f"{where} ({split_name}), row {i + 1}"


def _ordinal(n: int) -> str:
    return f"{n}{'tsnrhtdd'[(n // 10 % 10 != 1) * (n % 10 < 4) * n % 10::4]}"


def text_value(value, where: str, column: str) -> str:
    """A non-empty string, or the row's error."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: {column!r} is {'empty' if isinstance(value, str) else 'missing or not text'}")
    return value
