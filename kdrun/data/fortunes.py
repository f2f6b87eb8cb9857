"""Texts from Debian's `fortunes` package: ~15,000 real quotations and jokes in 43 category files
(/usr/share/games/fortunes/<category>, entries separated by lines holding a single `%`). BSD licence
(the fortune-mod copyright file; the `cookie` file is Karl Lehenbauer's alt.sources postings).

Classification: the category is the label (default: a 4-class topical subset). Causal LM: the entries
are documents, packed into token blocks by the task.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional

from kdrun.data.ranking import hash_split
from kdrun.data.text import ClassificationData, CorpusData, split_labelled
from kdrun.errors import DataError

_OVERSTRIKE = re.compile(r".\x08")  # "_\bX": old terminal underlining/bold


def search_path() -> List[Path]:
    """Where kdrun looks when data.path is not set: $KDRUN_FORTUNES, Debian's install location, and where
    `make install` extracts the package for users without root (`scripts/get_fortunes`)."""
    data_home = Path(os.environ.get("XDG_DATA_HOME") or "~/.local/share").expanduser()
    places = [os.environ.get("KDRUN_FORTUNES"), "/usr/share/games/fortunes", str(data_home / "kdrun" / "fortunes")]
    return [Path(p) for p in places if p]


def find_dir(path: Optional[str]) -> Path:
    if path:
        p = Path(path).expanduser()
        if not p.is_dir():
            raise DataError(f"data.path={path}: no such directory (expected the fortunes folder, "
                            "e.g. /usr/share/games/fortunes)")
        return p
    for p in search_path():
        if (p / "computers").is_file():
            return p
    raise DataError("the fortunes texts are not installed (looked in " + ", ".join(map(str, search_path())) +
                    "); run `make install` (or `sudo apt-get install fortunes`), or pass data.path=DIR")


def categories(directory: Path) -> List[str]:
    """The fortune files of a folder: those with a strfile index (<name>.dat) beside them."""
    return sorted(f.stem for f in directory.glob("*.dat") if (directory / f.stem).is_file())


def read_category(file: Path) -> List[str]:
    """The entries of one fortune file, cleaned: overstrikes removed, whitespace trimmed, empty ones dropped."""
    try:
        data = file.read_bytes()
    except OSError as e:
        raise DataError(f"{file}: cannot read: {e.strerror}") from e
    try:
        raw = data.decode("utf-8")
    except UnicodeDecodeError:
        raw = data.decode("latin-1")
    entries = re.split(r"^%\s*$", _OVERSTRIKE.sub("", raw), flags=re.M)
    return [e.strip() for e in entries if e.strip()]


def _read(directory: Path, wanted: Optional[List[str]]):
    available = categories(directory)
    wanted = list(wanted) if wanted else available
    missing = [c for c in wanted if c not in available]
    if missing:
        raise DataError(f"data.categories: {missing} not in {directory}; available: {available}")
    return wanted, {c: read_category(directory / c) for c in wanted}


def load_classification(*, path: Optional[str], categories: List[str], max_words: int,
                        eval_fraction: float, split_salt: str, seed: int, max_train: Optional[int],
                        max_eval: Optional[int]) -> ClassificationData:
    """Texts labelled by category. A text that appears in two categories is dropped (its label is ambiguous);
    texts longer than max_words are skipped."""
    directory = find_dir(path)
    names, texts = _read(directory, categories)
    if len(names) < 2:
        raise DataError(f"data.categories={names}: a classification task needs at least 2 categories")
    owner, dropped = {}, set()
    for label, name in enumerate(names):
        for t in texts[name]:
            if len(t.split()) > max_words:
                continue
            if t in owner and owner[t] != label:
                dropped.add(t)
            owner.setdefault(t, label)
    items = [(t, y) for t, y in owner.items() if t not in dropped]
    data = split_labelled(items, names, eval_fraction=eval_fraction, split_salt=split_salt, max_train=max_train,
                          max_eval=max_eval, source=f"fortunes:{directory}")
    data.stats["ambiguous_dropped"] = len(dropped)
    return data


def load_corpus(*, path: Optional[str], categories: Optional[List[str]], block_size: int,
                eval_fraction: float, split_salt: str, seed: int, max_train_blocks: Optional[int],
                max_eval_blocks: Optional[int]) -> CorpusData:
    """Every entry of the chosen categories (all by default) as a document, split by a hash of its text."""
    directory = find_dir(path)
    _, texts = _read(directory, categories)
    docs = list(dict.fromkeys(t for group in texts.values() for t in group))  # distinct, in file order
    train, held = hash_split(docs, split_salt, eval_fraction)
    if not train or not held:
        raise DataError(f"fortunes:{directory}: {len(train)} training and {len(held)} held-out documents")
    return CorpusData(train, held, block_size, max_train_blocks, max_eval_blocks, source=f"fortunes:{directory}",
                      stats={"train_documents": len(train), "eval_documents": len(held)})
