"""The teachers' unit tests share the tiny BERT as a bi-encoder teacher and a kdrun cache of each test's own."""
import pytest

from support import TEACHER


@pytest.fixture(scope="module")
def teacher(tiny_bert):
    from kdrun.models import load_teacher

    return load_teacher(path=tiny_bert, kind="bi_encoder", **TEACHER)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):  # score files are converted under kdrun's cache
    monkeypatch.setenv("KDRUN_CACHE", str(tmp_path / "kdrun_cache"))
