"""scripts/reproduce_margin_mse's own logic (which sweeps it starts, with which overrides), with a `kdrun` on PATH that
prints its arguments: the sweeps themselves run in tests/run/test_reproduction.py."""
import os
import subprocess

from support import ROOT

SCRIPT = ROOT / "scripts" / "reproduce_margin_mse"


def _sweeps(tmp_path, *args):
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "kdrun").write_text('#!/bin/sh\necho "$@"\n')
    (fake / "kdrun").chmod(0o755)
    r = subprocess.run([str(SCRIPT), *args], env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"},
                       capture_output=True, text=True, timeout=60)
    return r, [line.split() for line in r.stdout.splitlines()]


def test_the_script_starts_a_sweep_per_data_set_and_student_each_student_from_its_own_teacher(tmp_path):
    r, sweeps = _sweeps(tmp_path, "hydra.sweep.dir=/s", "tracking.uri=http://h:1")
    assert r.returncode == 0, r.stderr
    assert [(s[1], s[2]) for s in sweeps] == [
        (f"experiment=reproduce_{data}", f"student={student}")
        for data in ("chatterbot", "code_search") for student in ("teacher_slice", "colbert")]
    for s in sweeps:
        assert s[0] == "-m" and "tracking.uri=http://h:1" in s and "hydra/launcher=joblib" in s  # 2 jobs by default
        data, student = s[1].split("_", 1)[1], s[2].split("=")[1]
        assert s[-1] == f"hydra.sweep.dir=/s/{data}/{student}"
        assert ("teacher.similarity=cos" in s) == (student == "colbert")


def test_only_picks_sweeps_and_names_the_choices_when_it_picks_none(tmp_path):
    r, sweeps = _sweeps(tmp_path, "--quick", "--jobs", "1", "--only", "code_search/colbert,chatterbot/teacher_slice")
    assert r.returncode == 0, r.stderr
    assert [(s[1], s[2]) for s in sweeps] == [("experiment=reproduce_chatterbot", "student=teacher_slice"),
                                              ("experiment=reproduce_code_search", "student=colbert")]
    assert all("hydra/launcher=joblib" not in s and "train.seed=1" in s for s in sweeps)  # --jobs 1, --quick
    assert "data.max_train_queries=400" in sweeps[1]  # --quick caps code_search further
    for bad in (["--only", "chatterbot/tinybert"], ["--only"], ["--jobs", "0"]):
        r, sweeps = _sweeps(tmp_path, *bad)
        assert r.returncode == 2 and not sweeps and r.stderr.count("\n") == 1, (bad, r.stderr)
    assert "chatterbot or code_search" in _sweeps(tmp_path, "--only", "x/y")[0].stderr
