"""A disk too small for a checkpoint (issue 20's fault suite): the output dir on a 20 MiB tmpfs."""
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fault_chains import run_args
from support import offline_env
from zygote import Zygote


def _mount_tmpfs(where: Path, mib: int) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.mark.slow(seconds=35)
def test_a_disk_too_small_for_a_checkpoint_loses_nothing(tmp_path):
    """A 20 MiB tmpfs as the output dir: no checkpoint fits (24 MiB), the student does. Training goes on past each failed
    checkpoint, the run ends FINISHED with the student of an uninterrupted run, no staging dir is left, no traceback;
    SIGTERM on that disk ends the run KILLED with the message, and the next start runs it to the end. Over 60 s in CI
    (a zygote and five runs, one of them stopped): the one test of a disk that fills, which needs a real mount."""
    disk = tmp_path / "small"
    if not _mount_tmpfs(disk, 20):
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN) on this machine")
    try:
        from mlflow.tracking import MlflowClient

        env = offline_env(tmp_path)
        zygote = Zygote(env, tmp_path / "zygote")
        ref = zygote.run(run_args(tmp_path / "ref", "ref", tmp_path / "tc"), tmp_path, env)
        assert ref.returncode == 0, ref.stderr[-3000:]
        full = zygote.run(run_args(disk / "run", "small", tmp_path / "tc"), tmp_path, env)
        assert full.returncode == 0 and "Traceback" not in full.stderr, full.stderr[-3000:]
        said = full.stdout + full.stderr
        assert "could not write checkpoint" in said and "No space left on device" in said, said[-3000:]
        assert not list((disk / "run" / "checkpoints").glob(".tmp-*"))
        a, b = load_file(disk / "run" / "student" / "model.safetensors"), load_file(tmp_path / "ref" / "student" / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        [run] = client.search_runs([client.get_experiment_by_name("small").experiment_id])
        assert run.info.status == "FINISHED" and "kdrun.checkpoint_error" in run.data.tags
        shutil.rmtree(disk / "run")

        proc = zygote.kdrun(run_args(disk / "run", "small2", tmp_path / "tc"), tmp_path, env)
        deadline = time.time() + 300
        while not list((disk / "run").glob("kdrun-run-id")) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode in (0, 128 + signal.SIGTERM) and "Traceback" not in err, err[-3000:]
        again = zygote.run(run_args(disk / "run", "small2", tmp_path / "tc", "resume=auto"), tmp_path, env)
        assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-3000:]
        runs = client.search_runs([client.get_experiment_by_name("small2").experiment_id])
        assert "RUNNING" not in {r.info.status for r in runs} and "FINISHED" in {r.info.status for r in runs}
        a = load_file(disk / "run" / "student" / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
        zygote.close()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
