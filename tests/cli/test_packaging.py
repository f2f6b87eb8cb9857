"""A plain (non-editable) install carries every config file inside the package."""
import subprocess
import sys
import zipfile

from support import CONF, ROOT


def test_wheel_ships_every_config_file(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        str(ROOT), "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("kdrun-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"kdrun/conf/{p.relative_to(CONF).as_posix()}" for p in CONF.rglob("*.yaml")}
    assert expected and expected <= names, sorted(expected - names)
    assert "kdrun/cli.py" in names
    assert "hydra_plugins/kdrun_optuna_sweeper/optuna_sweeper.py" in names  # where Hydra looks for sweepers
