"""Code search from installed Python sources: a docstring's summary -> the function it documents (CodeSearchNet's
task, Husain et al. 2019, built offline from what installs with kdrun).

Each function or method with a docstring in the chosen sources (`data.packages`: "stdlib" is the running Python's
standard library, any other name an installed package, found without importing it) gives one pair:
- query: the docstring's first paragraph, whitespace collapsed (at least 3 words);
- passage: the function's source without its docstring (decorators left out, dedented, cut at
  `data.max_code_chars`), name and signature kept, as CodeSearchNet keeps them.
Left out, as CodeSearchNet leaves them out: tests (names starting with "test", files under test folders), dunder
methods, functions with fewer than 3 lines once the docstring is removed. A summary shared by several functions is
ambiguous as a query (which one is relevant?): all its functions are dropped; of identical function bodies the first
is kept. Counts of each are in the data's stats.

The held-out split is by source unit, not by query: "<source>/<top-level module or subpackage>" (stdlib/asyncio,
sympy/polys, ...) goes to evaluation when a hash of (split_salt, unit) falls below eval_fraction, so code copied
within a package never crosses the split. Negatives and evaluation candidates are BM25's (bm25s) top passages that are
not relevant, as for chatterbot (kdrun/data/ranking.py).

Licences: each source's licence, read from its installed metadata (the standard library's is the PSF License 2.0), is
recorded in the data's `licences` stat and logged with the run; the texts stay on the user's machine. The pairs are
extracted once per content of the source files (cached under $KDRUN_CACHE/data/code_search).
"""
from __future__ import annotations

import ast
import hashlib
import json
import logging
import re
import sys
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from kdrun.data import ranking
from kdrun.errors import DataError

log = logging.getLogger(__name__)
EXTRACTOR_VERSION = "1"  # bump when what is extracted changes
_SKIP_DIRS = {"test", "tests", "testing", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages",
              "dist-packages", "__pycache__", "pydoc_data", "__phello__"}
_WS = re.compile(r"\s+")


@dataclass
class Source:
    name: str  # "stdlib" or the import name
    version: str
    licence: str
    root: Path  # the directory its .py files are under


@dataclass
class Pair:
    query: str
    code: str
    unit: str  # the split unit: "<source>/<top-level module or subpackage>"
    where: str  # "<source>/<relative path>:<line>"


def find_source(name: str) -> Source:
    """Where an installed source lives, its version and licence, without importing it."""
    if name == "stdlib":
        return Source("stdlib", sys.version.split()[0], "PSF-2.0", Path(sysconfig.get_paths()["stdlib"]))
    import importlib.metadata as md
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"data.packages: '{name}' is not an installed Python package (a folder of modules); install it "
                        "or leave it out (\"stdlib\" is the standard library)")
    dists = md.packages_distributions().get(name) or [name]
    try:
        meta = md.metadata(dists[0])
    except md.PackageNotFoundError:
        return Source(name, "unknown", "unknown", Path(list(spec.submodule_search_locations)[0]))
    licence = meta.get("License-Expression") or ""
    if not licence:
        classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
        first = (meta.get("License") or "").strip().splitlines()
        licence = "; ".join(classifiers) or (first[0][:80] if first else "unknown")
    return Source(name, meta.get("Version", "unknown"), licence, Path(list(spec.submodule_search_locations)[0]))


def _files(src: Source) -> List[Path]:
    return sorted(f for f in src.root.rglob("*.py") if not (_SKIP_DIRS & set(f.relative_to(src.root).parts[:-1]))
                  and not f.name.startswith("test_"))


def _unit(src: Source, rel: Path) -> str:
    top = rel.parts[0].removesuffix(".py") if src.name == "stdlib" or len(rel.parts) > 1 else "_init"
    return f"{src.name}/{top}"


def summary(doc: str) -> str:
    """A docstring's first paragraph on one line."""
    para = []
    for line in doc.strip().splitlines():
        if not line.strip():
            break
        para.append(line.strip())
    return _WS.sub(" ", " ".join(para)).strip()


def functions(text: str, max_code_chars: int) -> Iterator[Tuple[str, str, int]]:
    """(summary, code without its docstring, line) of each documented function or method of a module's source."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    lines = text.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        name = node.name
        if name.startswith("test") or (name.startswith("__") and name.endswith("__")):
            continue
        doc = ast.get_docstring(node)
        query = summary(doc) if doc else ""
        if len(query.split()) < 3 or query.startswith(">>>"):
            continue
        first = node.body[0]
        kept = lines[node.lineno - 1:first.lineno - 1] + lines[first.end_lineno:node.end_lineno]
        if sum(1 for line in kept if line.strip()) < 3:
            continue
        code = textwrap.dedent("\n".join(kept)).strip("\n")
        yield query, code[:max_code_chars], node.lineno


def extract(sources: Sequence[Source], max_code_chars: int) -> Tuple[List[Pair], Dict[str, float]]:
    """Every source's pairs, in a fixed order (sources as given, files sorted, functions in source order), with
    ambiguous summaries and repeated bodies dropped."""
    found: List[Pair] = []
    unreadable = 0
    for src in sources:
        for f in _files(src):
            try:
                text = f.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                unreadable += 1
                continue
            rel = f.relative_to(src.root)
            for query, code, line in sorted(functions(text, max_code_chars), key=lambda x: x[2]):
                found.append(Pair(query, code, _unit(src, rel), f"{src.name}/{rel.as_posix()}:{line}"))
    per_query: Dict[str, int] = {}
    for p in found:
        per_query[p.query] = per_query.get(p.query, 0) + 1
    unambiguous = [p for p in found if per_query[p.query] == 1]
    seen_code = set()
    pairs = []
    for p in unambiguous:
        body = _WS.sub(" ", p.code)
        if body not in seen_code:
            seen_code.add(body)
            pairs.append(p)
    stats = {"functions_found": len(found), "ambiguous_summaries_dropped": len(found) - len(unambiguous),
             "repeated_bodies_dropped": len(unambiguous) - len(pairs), "unreadable_files": unreadable}
    return pairs, stats


def content_key(sources: Sequence[Source], max_code_chars: int) -> str:
    """SHA-256 of what the pairs are made of: every source's name, version and file bytes, and the extraction's
    settings (a changed or upgraded source extracts again)."""
    h = hashlib.sha256(f"code-search-{EXTRACTOR_VERSION}|{max_code_chars}".encode())
    for src in sources:
        h.update(f"|{src.name}|{src.version}".encode())
        for f in _files(src):
            h.update(f.relative_to(src.root).as_posix().encode() + b"\x1f")
            try:
                h.update(f.read_bytes())
            except OSError:
                h.update(b"\x00unreadable")
    return h.hexdigest()


def cached_pairs(sources: Sequence[Source], max_code_chars: int) -> Tuple[List[Pair], Dict[str, float], bool]:
    """(pairs, stats, cache hit): extracted once per content, then read back from $KDRUN_CACHE/data/code_search."""
    from kdrun.store import cache_root, cached, publish, staging_dir

    out = cache_root() / "data" / "code_search" / content_key(sources, max_code_chars)[:24]
    if cached(out):
        doc = json.loads((out / "pairs.json").read_text())
        return [Pair(*p) for p in doc["pairs"]], doc["stats"], True
    pairs, stats = extract(sources, max_code_chars)
    stage = staging_dir(out)
    stage.mkdir(parents=True, exist_ok=True)
    (stage / "pairs.json").write_text(json.dumps({"pairs": [[p.query, p.code, p.unit, p.where] for p in pairs],
                                                  "stats": stats}))
    publish(stage, out, json.dumps({s.name: s.version for s in sources}))
    return pairs, stats, False


def load(*, packages: Sequence[str], max_code_chars: int, eval_fraction: float, split_salt: str,
         negatives_per_query: int, examples_per_pair: int, mine_depth: int, eval_candidates: int,
         max_train_queries: Optional[int], max_eval_queries: Optional[int], seed: int) -> ranking.RankingData:
    if not packages:
        raise DataError("data.packages is empty: name the Python sources to read, e.g. [stdlib, sympy]")
    sources = [find_source(str(name)) for name in packages]
    pairs, stats, hit = cached_pairs(sources, max_code_chars)
    if not pairs:
        raise DataError(f"data.packages={list(packages)}: no documented functions found")
    unit = {p.query: p.unit for p in pairs}  # (summaries are unique after extraction)
    desc = ", ".join(f"{s.name} {s.version}" for s in sources)
    data = ranking.build([(p.query, p.code) for p in pairs], eval_fraction=eval_fraction, split_salt=split_salt,
                         negatives_per_query=negatives_per_query, examples_per_pair=examples_per_pair,
                         mine_depth=mine_depth, eval_candidates=eval_candidates, max_train_queries=max_train_queries,
                         max_eval_queries=max_eval_queries, seed=seed, source=f"code_search ({desc})",
                         split_key=unit.__getitem__, search="bm25s")
    data.stats.update(stats, extraction_cache_hit=float(hit), split_units=len(set(unit.values())))
    data.stats["licences"] = "; ".join(f"{s.name}: {s.licence}" for s in sources)
    log.info("code_search: %d pairs from %s (%d held-out queries); licences: %s", len(pairs), desc,
             data.stats["eval_queries"], data.stats["licences"])
    return data
