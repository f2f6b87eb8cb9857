"""Code search from installed Python sources (kdrun/data/code_search.py): a docstring's summary and the code without
it, ambiguous summaries and repeated bodies dropped, a split by source unit, an extraction cached until a source
changes, and the default data's size."""
import sys
import textwrap
from pathlib import Path

import pytest


SOURCE = textwrap.dedent('''
    def area(width, height):
        """Return the area of a rectangle
        given its sides.

        More words here."""
        result = width * height
        return result

    def test_area():
        """Check the area of a rectangle."""
        assert area(1, 2) == 2
        return None

    class Box:
        def __len__(self):
            """Return the number of things."""
            n = 0
            return n

        @property
        def volume(self):
            """Compute the volume of the box."""
            v = self.w * self.h
            return v * self.d

    def short(x):
        """Too short a function body."""
        return x
''')


def test_functions_give_a_summary_and_the_code_without_its_docstring():
    from kdrun.data.code_search import functions

    found = list(functions(SOURCE, 2000))
    assert [q for q, _, _ in found] == ["Return the area of a rectangle given its sides.",
                                        "Compute the volume of the box."]
    code = found[0][1]
    assert code.startswith("def area(width, height):") and "More words" not in code and "return result" in code
    assert found[1][1].startswith("def volume(self):")  # dedented; the decorator left out
    assert list(functions("def broken(:\n", 2000)) == []


def _package(root: Path, name: str, modules: dict) -> None:
    for rel, text in modules.items():
        f = root / name / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(text))
    (root / name / "__init__.py").touch()


def _fn(name, summary, body="x = 1"):
    return f'def {name}(a):\n    """{summary}"""\n    {body}\n    y = a + {len(name)}\n    return y\n'


def test_code_search_drops_ambiguous_summaries_and_repeated_bodies_and_splits_by_unit(tmp_path, monkeypatch):
    from kdrun.data import code_search

    modules = {f"sub{u}/mod.py": "".join(_fn(f"f{u}_{i}", f"Compute thing number {u} {i} for sure") for i in range(6))
               for u in range(8)}
    modules["sub0/dup.py"] = _fn("g1", "Return the same summary twice") + _fn("g2", "Return the same summary twice")
    modules["sub1/copy.py"] = _fn("f1_0", "A copy of a body elsewhere")  # the same body as sub1/mod.py's f1_0
    _package(tmp_path, "kdrun_fake_src", modules)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("KDRUN_CACHE", str(tmp_path / "cache"))
    args = dict(packages=["kdrun_fake_src"], max_code_chars=2000, eval_fraction=0.3, split_salt="s",
                negatives_per_query=1, examples_per_pair=1, mine_depth=5, eval_candidates=4, max_train_queries=None,
                max_eval_queries=None, seed=0)
    data = code_search.load(**args)
    assert data.stats["ambiguous_summaries_dropped"] == 2 and data.stats["repeated_bodies_dropped"] == 1
    assert data.stats["pairs"] == 48 and data.stats["extraction_cache_hit"] == 0.0
    assert "kdrun_fake_src:" in data.stats["licences"]
    units = lambda queries: {q.split()[3] for q in queries}  # "Compute thing number U I ..."
    train_units, eval_units = units(q for q, _ in data.train), units(data.eval_queries)
    assert train_units and eval_units and not train_units & eval_units  # a unit is on one side only
    assert all(len(c) == 4 and sum(y) == 1 for c, y in zip(data.eval_candidates, data.eval_labels))
    again = code_search.load(**args)
    assert again.stats["extraction_cache_hit"] == 1.0 and again.train == data.train
    # a changed source file extracts again
    (tmp_path / "kdrun_fake_src" / "sub3" / "mod.py").write_text(_fn("h", "A brand new function here"))
    assert code_search.load(**args).stats["extraction_cache_hit"] == 0.0


def test_code_search_names_a_source_that_is_not_installed():
    from kdrun.data.code_search import find_source
    from kdrun.errors import DataError

    with pytest.raises(DataError, match="'no_such_pkg_x' is not an installed Python package"):
        find_source("no_such_pkg_x")
    std = find_source("stdlib")
    assert std.licence == "PSF-2.0" and std.version == sys.version.split()[0]


@pytest.mark.slow(seconds=35)  # builds the full code_search data from this machine's Python (48 s on 2 cores)
def test_the_default_code_search_data_has_over_10000_queries_split_by_source_unit(kdrun_cache, monkeypatch):
    """The data set as the config builds it from this machine's Python (counts in README, "Data"); its extraction
    stays in the session's cache for the reproduction test (tests/run/test_reproduction.py)."""
    from kdrun.data import code_search
    from omegaconf import OmegaConf

    monkeypatch.setenv("KDRUN_CACHE", str(kdrun_cache))
    cfg = OmegaConf.load(Path(__file__).parents[2] / "conf" / "data" / "code_search.yaml")
    args = {k: cfg[k] for k in ("packages", "eval_fraction", "negatives_per_query", "examples_per_pair", "mine_depth",
                                "eval_candidates")}
    data = code_search.load(**args, max_code_chars=2000, split_salt="kdrun-v1", max_train_queries=None,
                            max_eval_queries=None, seed=13)
    assert data.stats["pairs"] >= 10_000
    assert data.stats["eval_queries"] >= 1_000 and data.stats["split_units"] >= 100
    assert not set(data.eval_queries) & {q for q, _ in data.train}
