"""Ranking data as memory-mapped columns: memory that does not grow with the corpus (data=triples).

MS MARCO passage is 8.8M passages and ~40M training triples. Held as Python objects (a dict of texts, a tuple of texts
per triple, a dict of scores per example) that is ~95 GB; here it is a few arrays the operating system pages in:

    texts      a collection or queries file as an Arrow table (id, text), memory-mapped, with a sorted array of 64-bit
               id hashes for id -> row lookups (searchsorted), converted once per file content
    triples    int32 row columns: each training example's query row [N] and passage rows [N, 1 + k] (the positive,
               then k negatives), converted once per (triples file, collection, queries, k)
    scores     a Margin-MSE score file as columns (query, positive and negative rows; the two scores), joined to the
               examples by (query id, passage id) with sorted keys, converted once per file content

Conversions live under kdrun's cache (`$KDRUN_CACHE/data`), keyed by the SHA-256 of the files' bytes, so a second run
opens them in about a second. Every malformed line still fails naming its file and line.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from kdrun.errors import DataError

FORMAT = 2  # bump when the layout of a conversion changes (2: texts as an Arrow stream, which `datasets` maps)
CHUNK = 200_000  # lines parsed per vectorised step (bounds the memory of a conversion)


def hash_ids(ids: Sequence[str]) -> np.ndarray:
    """64-bit hashes of ids (BLAKE2b): the keys of id -> row lookups."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids),
                       dtype=np.uint64, count=len(ids))


class Chunked:
    """Values of a (memory-mapped) Arrow column by row, taken chunk by chunk: pyarrow's own take on a chunked array
    may first concatenate every chunk, copying the whole column into memory."""

    def __init__(self, column):
        self.column = column
        self.offsets = np.cumsum([0] + [len(c) for c in column.chunks])

    def take(self, rows) -> list:
        import pyarrow as pa

        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        chunk = np.searchsorted(self.offsets, rows, side="right") - 1
        out = [None] * len(rows)
        for c in np.unique(chunk):
            at = np.flatnonzero(chunk == c)
            values = self.column.chunk(int(c)).take(pa.array(rows[at] - self.offsets[c])).to_pylist()
            for i, v in zip(at.tolist(), values):
                out[i] = v
        return out


def lines(key: str, path: str) -> Iterator[Tuple[int, List[str], Path]]:
    """(line number, columns, file) for each non-blank line: tab-separated, else whitespace-separated."""
    f = Path(path).expanduser()
    if not f.is_file():
        raise DataError(f"data.{key}={path}: no such file")
    try:
        with open(f, "rb") as raw:
            for n, data in enumerate(raw, 1):
                try:  # (a byte-order mark, as some Windows editors write, is not part of the first id)
                    line = data.decode("utf-8-sig" if n == 1 else "utf-8").rstrip("\r\n")
                except UnicodeDecodeError as e:
                    raise DataError(f"{f}:{n}: not UTF-8 text (byte {data[e.start:e.start + 1]!r} at column "
                                    f"{e.start + 1}); convert the file, e.g. `iconv -f latin1 -t utf-8`") from None
                if line.strip():
                    yield n, line.split("\t") if "\t" in line else line.split(), f
    except OSError as e:  # permissions, a file that vanished, an I/O error
        raise DataError(f"data.{key}={path}: cannot read it ({e.strerror or e})") from e


def _entry(kind: str, parts: Sequence[str]) -> Path:
    from kdrun.store import cache_root

    key = hashlib.sha256("|".join([kind, str(FORMAT), *parts]).encode()).hexdigest()[:24]
    return cache_root() / "data" / f"{kind}-{key}"


def _convert(out: Path, build: Callable[[Path], str]) -> Path:
    """`out`, built by `build(staging dir)` unless a complete conversion is there (published by rename: parallel
    sweep jobs never read half of one; the first to finish wins)."""
    from kdrun.store import cached, publish, staging_dir

    if not cached(out):
        stage = staging_dir(out)
        stage.mkdir(parents=True, exist_ok=True)
        note = build(stage)
        publish(stage, out, note)
    return out


def file_digest(path: str) -> str:
    from kdrun.store import file_sha256

    return file_sha256(Path(path).expanduser())


class TextColumn:
    """One `id <TAB> text` file, memory-mapped: texts and ids by row, rows by id."""

    def __init__(self, directory: Path, key: str, path: str):
        import pyarrow as pa

        self.key, self.path, self.directory = key, path, directory
        self.table = pa.ipc.open_stream(pa.memory_map(str(directory / "texts.arrow"))).read_all()  # zero-copy
        self.hashes = np.load(directory / "hashes.npy", mmap_mode="r")  # sorted
        self.order = np.load(directory / "order.npy", mmap_mode="r")  # row of each sorted hash
        self.digest = (directory / "digest").read_text()
        self._columns = {}

    def __len__(self) -> int:
        return self.table.num_rows

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """Each id's row, -1 where the file has no such id."""
        h = hash_ids(ids)
        at = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
        return np.where(self.hashes[at] == h, self.order[at], -1).astype(np.int64)

    def _take(self, column: str, rows) -> List[str]:
        if column not in self._columns:
            self._columns[column] = Chunked(self.table.column(column))
        return self._columns[column].take(rows)

    def texts(self, rows) -> List[str]:
        return self._take("text", rows)

    def ids(self, rows) -> List[str]:
        return self._take("id", rows)

    def arrow(self):
        """The texts as an Arrow table (one column, "text")."""
        return self.table.select(["text"])

    def dataset(self):
        """The file as a `datasets.Dataset` (columns id, text), memory-mapped: what tokenising once maps over."""
        import datasets

        return datasets.Dataset.from_file(str(self.directory / "texts.arrow"))


def text_column(key: str, path: str) -> TextColumn:
    """data.<key>=path as a TextColumn, converted on first use."""
    digest = file_digest(path)
    out = _entry("texts", [digest])

    def build(stage: Path) -> str:
        import pyarrow as pa

        schema = pa.schema([("id", pa.string()), ("text", pa.string())])
        hashes: List[np.ndarray] = []
        n_rows = 0
        with pa.OSFile(str(stage / "texts.arrow"), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            ids, texts = [], []

            def flush():
                if ids:
                    writer.write_batch(pa.record_batch([pa.array(ids, pa.string()), pa.array(texts, pa.string())],
                                                       schema=schema))
                    hashes.append(hash_ids(ids))
                    ids.clear()
                    texts.clear()

            for n, cols, f in lines(key, path):
                if len(cols) < 2 or not cols[0].strip():
                    raise DataError(f"{f}:{n}: expected `id<TAB>text`")
                text = "\t".join(cols[1:]).strip()
                if not text:
                    raise DataError(f"{f}:{n}: the text of id {cols[0].strip()!r} is empty")
                ids.append(cols[0].strip())
                texts.append(text)
                n_rows += 1
                if len(ids) >= CHUNK:
                    flush()
            flush()
        if not n_rows:
            raise DataError(f"data.{key}={path}: the file is empty")
        h = np.concatenate(hashes)
        order = np.argsort(h, kind="stable")
        sorted_h = h[order]
        same = np.flatnonzero(sorted_h[1:] == sorted_h[:-1])
        if len(same):
            table = pa.ipc.open_stream(pa.memory_map(str(stage / "texts.arrow"))).read_all()
            a, b = (table.column("id")[int(order[i])].as_py() for i in (same[0], same[0] + 1))
            raise DataError(f"data.{key}={path}: the id {a!r} appears more than once" if a == b else
                            f"data.{key}={path}: ids {a!r} and {b!r} share a 64-bit hash; rename one")
        np.save(stage / "hashes.npy", sorted_h)
        np.save(stage / "order.npy", order.astype(np.int64))
        (stage / "digest").write_text(digest)
        return f"{n_rows} texts of {path} (sha256 {digest})\n"

    return TextColumn(_convert(out, build), key, path)


def _unknown(rows: np.ndarray, numbers: np.ndarray, values: Sequence[str], f: Path, what: str, key: str) -> None:
    bad = np.flatnonzero(rows < 0)
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{f}:{int(numbers[i])}: {what} id {values[i]!r} is not in data.{key}")


def _score_pair(cols: List[str], f: Path, n: int) -> Tuple[float, float]:
    """The (score_pos, score_neg) of a Margin-MSE score line; a bad one fails naming file and line."""
    try:
        pos, neg = float(cols[0]), float(cols[1])
    except ValueError:
        raise DataError(f"{f}:{n}: the first two columns must be numbers (score_pos score_neg), "
                        f"found {cols[0]!r} and {cols[1]!r}") from None
    if not (math.isfinite(pos) and math.isfinite(neg)):
        raise DataError(f"{f}:{n}: scores must be finite, found {cols[0]} and {cols[1]}")
    return pos, neg


def triple_rows(path: str, queries: TextColumn, passages: TextColumn, key: str = "triples"
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every line of a triples file (qid pos neg, or a 5-column score file, whose id columns are read) as rows:
    (query [L], positive [L], negative [L]). Unknown ids fail naming the line."""
    q_parts, p_parts, n_parts = [], [], []
    qids, pids, nids, nums = [], [], [], []

    def flush():
        if not qids:
            return
        numbers = np.asarray(nums)
        for ids, column, what, k, out in ((qids, queries, "query", "queries", q_parts),
                                          (pids, passages, "passage", "collection", p_parts),
                                          (nids, passages, "passage", "collection", n_parts)):
            rows = column.rows(ids)
            _unknown(rows, numbers, ids, f, what, k)
            out.append(rows.astype(np.int32))
        for x in (qids, pids, nids, nums):
            x.clear()

    for n, cols, f in lines(key, path):
        if len(cols) not in (3, 5):
            raise DataError(f"{f}:{n}: expected `qid<TAB>pos_pid<TAB>neg_pid` (or a 5-column score file), "
                            f"found {len(cols)} columns")
        qid, pos_id, neg_id = (c.strip() for c in cols[-3:])
        qids.append(qid)
        pids.append(pos_id)
        nids.append(neg_id)
        nums.append(n)
        if len(qids) >= CHUNK:
            flush()
    flush()
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return cat(q_parts), cat(p_parts), cat(n_parts)


def group_examples(q: np.ndarray, p: np.ndarray, n: np.ndarray, k: int, n_passages: int,
                   limit: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    """Training examples from triple lines: each (query, positive)'s negatives in file order, in groups of k (an
    incomplete last group dropped), the (query, positive)s in order of first appearance. ([N] query rows,
    [N, 1 + k] passage rows)."""
    key = q.astype(np.int64) * max(n_passages, 1) + p
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    group = rank[inverse.reshape(-1)]  # each line's group, numbered by first appearance
    order = np.argsort(group, kind="stable")  # lines by group, file order within a group
    g = group[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    sizes = np.diff(np.r_[starts, len(g)])
    within = np.arange(len(g)) - np.repeat(starts, sizes)
    keep = order[within < np.repeat(sizes // k * k, sizes)]
    negs = n[keep].reshape(-1, k)
    heads = keep[::k]
    if limit:
        heads, negs = heads[:limit], negs[:limit]
    return q[heads].astype(np.int32), np.concatenate([p[heads][:, None], negs], axis=1).astype(np.int32)


def training_examples(path: str, queries: TextColumn, passages: TextColumn, k: int, limit: Optional[int]
                      ) -> Tuple[np.ndarray, np.ndarray]:
    """data.triples as example rows, converted once per (file, collection, queries, k, limit); memory-mapped."""
    out = _entry("triples", [file_digest(path), queries.digest, passages.digest, str(k), str(limit)])

    def build(stage: Path) -> str:
        q, p, n = triple_rows(path, queries, passages)
        eq, ep = group_examples(q, p, n, k, len(passages), limit)
        np.save(stage / "query_rows.npy", eq)
        np.save(stage / "passage_rows.npy", ep)
        return f"{len(eq)} examples from {len(q)} lines of {path}\n"

    d = _convert(out, build)
    return np.load(d / "query_rows.npy", mmap_mode="r"), np.load(d / "passage_rows.npy", mmap_mode="r")


class ScoreTable:
    """A Margin-MSE score file as sorted (query row, passage row) keys and their scores: the first score a file gives
    a pair wins."""

    def __init__(self, keys: np.ndarray, values: np.ndarray, n_passages: int):
        self.keys, self.values, self.n_passages = keys, values, n_passages

    def lookup(self, q_rows: np.ndarray, p_rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """(scores [N, n] float32, found [N, n] bool) for each example's (query, passage) pairs."""
        key = np.asarray(q_rows, dtype=np.int64)[:, None] * max(self.n_passages, 1) + np.asarray(p_rows, np.int64)
        at = np.minimum(np.searchsorted(self.keys, key), max(len(self.keys) - 1, 0))
        found = self.keys[at] == key if len(self.keys) else np.zeros(key.shape, bool)
        return np.where(found, self.values[at], 0).astype(np.float32), found


def score_table(path: str, queries: TextColumn, passages: TextColumn) -> ScoreTable:
    """teacher.scores_file as a ScoreTable, converted once per (file, collection, queries); memory-mapped. Lines whose
    ids are not in the data cannot join any example and are left out."""
    f = Path(path).expanduser()
    if not f.is_file():
        raise DataError(f"teacher.scores_file={path}: no such file (write one with `kdrun mode=score ...`)")
    out = _entry("scores", [file_digest(path), queries.digest, passages.digest])

    def build(stage: Path) -> str:
        try:
            q, p, n, s = _score_rows(path, queries, passages)
        except DataError as e:
            raise DataError(str(e).replace("data.triples=", "teacher.scores_file=")) from None
        qq = np.repeat(q.astype(np.int64), 2)
        pp = np.stack([p, n], axis=1).reshape(-1).astype(np.int64)
        ok = (qq >= 0) & (pp >= 0)
        key = qq[ok] * max(len(passages), 1) + pp[ok]
        keys, first = np.unique(key, return_index=True)  # sorted; the first occurrence of each pair
        np.save(stage / "keys.npy", keys)
        np.save(stage / "values.npy", s.reshape(-1)[ok][first].astype(np.float32))
        return f"{len(keys)} scored pairs from {len(q)} lines of {path}\n"

    d = _convert(out, build)
    return ScoreTable(np.load(d / "keys.npy", mmap_mode="r"), np.load(d / "values.npy", mmap_mode="r"), len(passages))


def _score_rows(path: str, queries: TextColumn, passages: TextColumn):
    """Like triple_rows for a score file, but ids the data does not have give row -1 instead of an error."""
    q_parts, p_parts, n_parts, s_parts = [], [], [], []
    qids, pids, nids, scores = [], [], [], []

    def flush():
        if qids:
            q_parts.append(queries.rows(qids))
            p_parts.append(passages.rows(pids))
            n_parts.append(passages.rows(nids))
            s_parts.append(np.asarray(scores, dtype=np.float32).reshape(-1, 2))
            for x in (qids, pids, nids, scores):
                x.clear()

    for n, cols, f in lines("triples", path):
        if len(cols) != 5:
            raise DataError(f"{f}:{n}: expected 5 tab-separated columns (score_pos score_neg query_id pos_id neg_id), "
                            f"found {len(cols)}")
        scores += _score_pair(cols, f, n)
        qids.append(cols[2].strip())
        pids.append(cols[3].strip())
        nids.append(cols[4].strip())
        if len(qids) >= CHUNK:
            flush()
    flush()
    if not q_parts:
        raise DataError(f"teacher.scores_file={path}: the file has no scores")
    return (np.concatenate(q_parts), np.concatenate(p_parts), np.concatenate(n_parts), np.concatenate(s_parts))
