"""Tokenise once, pad little.

`pretokenize` turns every distinct training text into token ids once, through `datasets` (a batched map,
written to an Arrow file under the kdrun cache and read back on later runs with the same tokenizer, length
limit and texts), so batches are built from ids instead of running the tokenizer every step.

`pad` builds a batch from id lists: it sorts the texts by length, splits them into at most `max_groups`
groups so that the total padded area is smallest, and pads each group to its own longest text (rounded up to
a multiple of 8/16). Models run each group apart and put the rows back in order (encoders.run_groups).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

log = logging.getLogger(__name__)

KEYS = ("input_ids", "attention_mask", "token_type_ids")


class TokenTable:
    """text -> token ids (special tokens included, truncated to max_length); texts not in the table are tokenised
    when asked for (evaluation candidates, say)."""

    def __init__(self, tokenizer, max_length: int, ids: Dict[str, List[int]]):
        self.tokenizer, self.max_length, self.ids = tokenizer, max_length, ids

    def __call__(self, texts: Sequence[str]) -> List[List[int]]:
        missing = [t for t in dict.fromkeys(texts) if t not in self.ids]
        if missing:
            enc = self.tokenizer(missing, truncation=True, max_length=self.max_length)["input_ids"]
            self.ids.update(zip(missing, enc))
        return [self.ids[t] for t in texts]

    def __len__(self) -> int:
        return len(self.ids)


def _usable(cache_dir) -> bool:
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        return True
    except OSError as e:
        log.warning("token cache: cannot use %s (%s); tokenising without the cache", cache_dir, e.strerror or e)
        return False


def _sound(cache_file: Optional[str]) -> bool:
    """Whether a token cache file is there and sound: its completion mark (`<file>.sha256`, written once `datasets`
    has finished it) holds its checksum. A damaged one (truncated, emptied, flipped bytes, a directory in its place,
    no mark) is removed with a warning and rebuilt: `datasets` would fail on it with a pyarrow traceback, or worse,
    read flipped ids that stay in range and train on wrong tokens."""
    from kdrun.store import file_sha256, remove

    if cache_file is None:
        return False
    f = Path(cache_file)
    mark = f.with_name(f.name + ".sha256")
    if not f.exists() and not f.is_symlink():
        mark.unlink(missing_ok=True)
        return False
    if not f.is_file():
        why = "not a file"
    elif not mark.is_file():
        why = "without its completion mark (an interrupted write, or an older kdrun's)"
    else:
        try:
            why = None if file_sha256(f) == mark.read_text().strip() else "not matching its checksum"
        except OSError as e:
            why = f"unreadable ({e.strerror or e})"
    if why is None:
        return True
    log.warning("token cache file %s is %s; rebuilding it", f, why)
    remove(f)
    mark.unlink(missing_ok=True)
    return False


def _seal(cache_file: Optional[str]) -> None:
    """Write a finished cache file's completion mark (renamed into place: never half a mark)."""
    import os

    from kdrun.store import file_sha256

    if cache_file is None or not Path(cache_file).is_file():
        return
    mark = Path(cache_file + ".sha256")
    tmp = mark.with_name(mark.name + f".tmp{os.getpid()}")
    try:
        tmp.write_text(file_sha256(Path(cache_file)) + "\n")
        tmp.replace(mark)
    except OSError as e:  # a full disk: the file is used this time and rebuilt next time
        tmp.unlink(missing_ok=True)
        log.warning("token cache: cannot write %s (%s)", mark, e.strerror or e)


def _locked(cache_file: Optional[str]):
    """One process builds a cache file while the others (parallel sweep jobs) wait, then read it."""
    import contextlib

    from kdrun.store import locked

    return contextlib.nullcontext() if cache_file is None else locked(Path(cache_file))


def _bars(datasets) -> None:
    """The `datasets` map's own progress bar (rate and ETA) where kdrun shows progress (kdrun.progress)."""
    from kdrun import progress

    datasets.enable_progress_bars() if progress.enabled() else datasets.disable_progress_bars()


def _map(ds, tokenizer, max_length: int, cache_file: Optional[str], key: str, num_proc: Optional[int]):
    """(the texts' token ids as a `datasets` map written to cache_file, the file): where it cannot be written (a full
    disk), the map is made again in memory (None as the file), with a warning."""
    fn = lambda batch: {"input_ids": tokenizer(batch["text"], truncation=True, max_length=max_length)["input_ids"]}
    args = dict(batched=True, batch_size=1000, remove_columns=ds.column_names, new_fingerprint=key, num_proc=num_proc,
                desc="tokenise")
    try:
        return ds.map(fn, cache_file_name=cache_file, load_from_cache_file=True, **args), cache_file
    except OSError as e:
        if cache_file is None:
            raise
        from kdrun.store import write_error

        log.warning("token cache: cannot write %s (%s); tokenising in memory, uncached", cache_file,
                    write_error(e, Path(cache_file).parent))
        return ds.map(fn, keep_in_memory=True, **args), None


def pretokenize(tokenizer, texts: Sequence[str], max_length: int, cache_dir: Optional[Path], fingerprint: str,
                num_proc: int = 1) -> Tuple[TokenTable, bool]:
    """(table of every distinct text's ids, whether it came from the cache). `fingerprint` names the tokenizer
    (store.tokenizer_fingerprint); the cache file's name covers it, max_length and the texts."""
    import datasets

    distinct = list(dict.fromkeys(texts))
    h = hashlib.sha256(f"{fingerprint}|{max_length}|{len(distinct)}".encode())
    for t in distinct:
        h.update(t.encode() + b"\x1e")
    key = h.hexdigest()[:24]
    cache_file = None
    if cache_dir is not None and _usable(cache_dir):
        cache_file = str(Path(cache_dir) / f"tokens-{key}.arrow")
    _bars(datasets)
    with _locked(cache_file):
        hit = _sound(cache_file)
        ds = datasets.Dataset.from_dict({"text": distinct})
        ds, cache_file = _map(ds, tokenizer, max_length, cache_file, key, num_proc if len(distinct) > 10_000 else None)
        if not hit:
            _seal(cache_file)
    return TokenTable(tokenizer, max_length, dict(zip(distinct, ds["input_ids"]))), hit


class RowTokens:
    """A text column's token ids by row (an Arrow table, memory-mapped from the `datasets` cache file) and each row's
    length: what a batch of row indices is padded from."""

    def __init__(self, table):
        import pyarrow.compute as pc

        from kdrun.data.columns import Chunked

        self.table, self.column = table, Chunked(table.column("input_ids"))
        self.lengths = pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False).astype(np.int64)

    def __len__(self) -> int:
        return self.table.num_rows

    def ids(self, rows) -> List[List[int]]:
        return self.column.take(rows)


def tokenize_column(tokenizer, column, max_length: int, cache_dir: Optional[Path], fingerprint: str,
                    num_proc: int = 1) -> Tuple[RowTokens, bool]:
    """(a text column's token ids by row, whether they came from the cache): a batched `datasets` map over the column's
    Arrow table, written to an Arrow file under the kdrun cache (keyed by the tokenizer, max_length and the column's
    content) and memory-mapped from there: memory does not grow with the collection."""
    import datasets
    import pyarrow as pa

    key = hashlib.sha256(f"rows|{fingerprint}|{max_length}|{column.digest}".encode()).hexdigest()[:24]
    cache_file = None
    if cache_dir is not None and _usable(cache_dir):
        cache_file = str(Path(cache_dir) / f"rows-{key}.arrow")
    with _locked(cache_file):
        if _sound(cache_file):  # the map's own Arrow stream, memory-mapped as it is
            return RowTokens(pa.ipc.open_stream(pa.memory_map(cache_file)).read_all()), True
        _bars(datasets)
        ds, cache_file = _map(column.dataset(), tokenizer, max_length, cache_file, key,
                              num_proc if len(column) > 10_000 else None)
        _seal(cache_file)
    return RowTokens(ds.data.table), False


def tokenize_columns(student, columns: Dict[str, object]) -> Tuple[Dict[str, RowTokens], Dict[str, float]]:
    """A ranking student's text columns (queries, passages) tokenised once each (cached through `datasets` under kdrun's
    cache, keyed by the tokenizer); the metrics say how long it took and whether the cache had them."""
    import time

    from kdrun.store import cache_root, tokenizer_fingerprint

    t0 = time.perf_counter()
    fingerprint = tokenizer_fingerprint(student.tokenizer)
    tables, hits = {}, []
    for name, column in columns.items():
        tables[name], hit = tokenize_column(student.tokenizer, column, student.max_length, cache_root() / "tokens",
                                            fingerprint)
        hits.append(hit)
    return tables, {"data/tokenize_seconds": time.perf_counter() - t0, "data/tokenize_cache_hit": float(all(hits)),
                    "data/distinct_texts": float(sum(len(t) for t in tables.values()))}


def tokenize_once(student, texts: Sequence[str]) -> Dict[str, float]:
    """A student's training texts tokenised once (cached through `datasets` under kdrun's cache, keyed by the
    tokenizer), kept as its token table; the metrics say how long it took and whether the cache had them."""
    import time

    from kdrun.store import cache_root, tokenizer_fingerprint

    t0 = time.perf_counter()
    student.token_table, hit = pretokenize(student.tokenizer, texts, student.max_length, cache_root() / "tokens",
                                           tokenizer_fingerprint(student.tokenizer))
    return {"data/tokenize_seconds": time.perf_counter() - t0, "data/tokenize_cache_hit": float(hit),
            "data/distinct_texts": float(len(student.token_table))}


def length_groups(lengths: Sequence[int], max_groups: int, multiple: int) -> List[List[int]]:
    """Row indices split into at most `max_groups` groups of similar length, chosen so that the sum over groups
    of (rows x longest length rounded up to `multiple`) is smallest (exact: dynamic programming over the
    distinct rounded lengths). Groups come shortest first; rows within a group keep their order."""
    rounded = [-(-n // multiple) * multiple for n in lengths]
    values = sorted(set(rounded))
    counts = [sum(1 for r in rounded if r == v) for v in values]
    k, g = len(values), min(max_groups, len(values))
    prefix = [0]
    for c in counts:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[j][i]: least padded area for the first i distinct lengths in j groups; cut[j][i]: where the last group starts
    best = [[inf] * (k + 1) for _ in range(g + 1)]
    cut = [[0] * (k + 1) for _ in range(g + 1)]
    best[0][0] = 0
    for j in range(1, g + 1):
        for i in range(1, k + 1):
            for s in range(j - 1, i):
                cost = best[j - 1][s] + (prefix[i] - prefix[s]) * values[i - 1]
                if cost < best[j][i]:
                    best[j][i], cut[j][i] = cost, s
    j = min(range(1, g + 1), key=lambda jj: best[jj][k]) if k else 0
    bounds, i = [], k
    while j > 0:
        bounds.append((cut[j][i], i))
        i, j = cut[j][i], j - 1
    groups = []
    for lo, hi in reversed(bounds):
        keep = set(values[lo:hi])
        groups.append([row for row, r in enumerate(rounded) if r in keep])
    return groups


def _pad_rows(ids: List[List[int]], pad_id: int, length: int, token_types: bool) -> Dict[str, torch.Tensor]:
    input_ids = torch.full((len(ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), length), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    out = {"input_ids": input_ids, "attention_mask": mask}
    if token_types:
        out["token_type_ids"] = torch.zeros_like(input_ids)
    return out


def pad(tokenizer, ids: List[List[int]], multiple: int, max_groups: int) -> Dict:
    """Features for id lists: ordinary padded features for one group, else
    {"groups": [{"index": rows, features...}], "count": N} (the layout encoders.run_groups takes)."""
    token_types = "token_type_ids" in tokenizer.model_input_names
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    groups = length_groups([len(x) for x in ids], max_groups, multiple)
    if len(groups) == 1:
        return _pad_rows(ids, pad_id, -(-max(len(x) for x in ids) // multiple) * multiple, token_types)
    out = []
    for rows in groups:
        length = -(-max(len(ids[r]) for r in rows) // multiple) * multiple
        out.append({"index": torch.tensor(rows), **_pad_rows([ids[r] for r in rows], pad_id, length, token_types)})
    return {"groups": out, "count": len(ids)}


def token_counts(features) -> Tuple[int, int]:
    """(real tokens, tokens computed including padding) over every attention mask in (nested) features."""
    real = total = 0
    if isinstance(features, dict):
        if "attention_mask" in features and isinstance(features["attention_mask"], torch.Tensor):
            m = features["attention_mask"]
            return int(m.sum()), m.numel()
        if isinstance(features.get("input_ids"), torch.Tensor):  # no mask: packed blocks, every token real
            return features["input_ids"].numel(), features["input_ids"].numel()
        for v in features.values():
            if isinstance(v, (dict, list)):
                r, t = token_counts(v)
                real, total = real + r, total + t
    elif isinstance(features, list):
        for v in features:
            r, t = token_counts(v)
            real, total = real + r, total + t
    return real, total
