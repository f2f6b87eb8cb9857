"""The command line (kdrun/cli.py, usage.py): config mistakes answered in one line, exit status 2 and no torch
imported, whoever finds them (Hydra's composition, the schema, kdrun's checks); --help, --version, --cfg job; the
console script, `python -m kdrun` and shell completion; progress bars on a terminal only.

What must be seen from a fresh interpreter (whether torch got imported) runs in one: every such case of this file in
one process (`fresh`), one case after another, each in its own working directory."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support import run_kdrun

BAD = [
    (["loss=nope"], ["loss=nope: no such option", "margin_mse"]),  # lists the valid choices
    (["loss=margin-mse"], ["did you mean loss=margin_mse?"]),  # ... and the closest one
    (["-m", "loss=margin_mse,nope"], ["loss=nope: no such option"]),  # a sweep value: before its first job runs
    (["teacher=nope"], ["teacher=nope", "bert", "minilm_offline"]),
    (["train.nope=1"], ["train.nope is not a kdrun setting", "max_steps"]),  # unknown key
    (["train.max_step=5"], ["did you mean train.max_steps?"]),
    (["+train.max_step=5"], ["train.max_step is not a kdrun setting", "did you mean train.max_steps?"]),  # Hydra's hint
    (["++loss.terms.margin_mse.tau=2"], ["loss.terms.margin_mse: margin_mse takes no 'tau'"]),
    (["data.categories=[a]"], ["data.categories", "data=fortunes/fortunes_lm has it"]),  # another data option's key
    (["tracking.tags.team=x"], ["+tracking.tags.team=VALUE"]),  # a new tag needs the '+'
    (["experiment=causal_lm_demo", "loss.terms.forward_kl.beta=0.9"],  # once accepted and ignored
     ["loss.terms.forward_kl: forward_kl takes no 'beta'", "'temperature'"]),
    (["experiment=causal_lm_demo", "loss=jsd", "loss.terms.jsd.temperature=2"], ["jsd takes no 'temperature'"]),
    (["loss.terms.kd_kl.weight=1"], ["this loss has no term 'kd_kl'", "+loss.terms.kd_kl.weight=W"]),
    (["--max-steps", "5"], ["key=value", "kdrun train.max_steps=5"]),  # options are overrides, not flags
    (["--lr=1e-4"], ["kdrun optimizer.lr=1e-4"]),
    (["train.max_steps=[1,2"], ["cannot read the override 'train.max_steps=[1,2'"]),  # Hydra's parser
    (["train.max_steps=abc"], ["max_steps", "abc"]),  # wrong type
    (["teacher.kind=ranker"], ["teacher.kind", "bi_encoder", "cross_encoder"]),  # not a choice of an enum
    (["student=colbert", "student.projection_init=foo"], ["student.projection_init=foo", "[pca, random]"]),
    (["student.layers=[]"], ["student.layers"]),  # cross-field check
    (["student=colbert", "student.query_length=200"], ["student.query_length=200", "student.max_length=128"]),
    (["student=colbert", "student.query_length=-1"], ["student.query_length=-1", "[0, inf)"]),
    (["experiment=nope"], ["experiment=nope", "classification_demo", "causal_lm_demo"]),
    (["experiment=classification_demo", "loss=margin_mse"], ["margin_mse", "losses for classification"]),
    (["data=fortunes", "data.nope=1"], ["nope"]),  # a key the data option's own schema does not have
    (["data=fortunes_lm", "data.block_size=big"], ["block_size", "big"]),
    (["hardware=multi_gpu"], ["torchrun --nproc_per_node", "hardware=gpu"]),  # DDP needs a launcher
    (["hardware.length_groups=0"], ["hardware.length_groups=0", ">= 1"]),
    (["hardware.threads=-1"], ["hardware.threads=-1", ">= 0"]),
    (["hardware=tpu"], ["hardware=tpu", "gpu_fp16", "multi_gpu"]),
    (["student.dropout=1.5"], ["student.dropout", "[0, 1)"]),
]

# in one fresh interpreter, in this order: every case that must not import torch, then --version (which may)
_FRESH = textwrap.dedent("""
    import contextlib, io, json, os, sys
    from kdrun import cli
    from hydra.core.global_hydra import GlobalHydra

    results = []
    for args, cwd in json.loads(sys.argv[1]):
        os.chdir(cwd)
        env, out, err = dict(os.environ), io.StringIO(), io.StringIO()
        sys.argv = ["kdrun", *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
        os.environ.clear()
        os.environ.update(env)
        GlobalHydra.instance().clear()
        results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
                        "torch": "torch" in sys.modules})
    print(json.dumps(results))
""")
GOOD = [["--help"], ["--cfg", "job"], ["--cfg", "job", "--resolve"]]
LAST = [["--version"]]


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """{args: result} of every case in one new interpreter (kdrun.cli.main as the console script calls it)."""
    cases = [args for args, _ in BAD] + GOOD + LAST
    dirs = [tmp_path_factory.mktemp("cli") for _ in cases]
    r = subprocess.run([sys.executable, "-c", _FRESH, json.dumps([[a, str(d)] for a, d in zip(cases, dirs)])],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    return {tuple(a): {**res, "cwd": d} for a, d, res in zip(cases, dirs, results)}


@pytest.mark.parametrize("args,expect", BAD)
def test_bad_config_fails_fast_with_one_message_and_no_torch(fresh, args, expect):
    """Whoever finds the mistake (Hydra's composition, the schema, kdrun's checks): one line, exit status 2, no
    torch imported, and no output directory left behind."""
    r = fresh[tuple(args)]
    assert r["code"] == 2, r["stdout"] + r["stderr"]
    lines = [line for line in r["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kdrun: error: "), r["stderr"]
    for word in expect:
        assert word in lines[0], lines[0]
    assert not r["torch"], "config errors must answer before torch is imported"
    assert not (r["cwd"] / "outputs").exists() and not (r["cwd"] / "multirun").exists()


def test_help_lists_groups_without_recomposing_per_option(tmp_path, monkeypatch, capsys):
    """Hydra's own help builds a config repository for each of ~95 group options (seconds); kdrun's composes once."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    from kdrun import cli

    def refuse(*args, **kwargs):
        raise AssertionError("help recomposed the config to list a group's options")

    monkeypatch.setattr(ConfigLoaderImpl, "get_group_options", refuse)
    monkeypatch.setattr(sys, "argv", ["kdrun", "--help", "loss=listwise_kl"])
    monkeypatch.chdir(tmp_path)
    cli.main()
    out = capsys.readouterr().out
    assert "loss: attention_kl, attention_mse, bd_kd, ce," in out and "schema/data" not in out
    assert "  terms:\n    listwise_kl:\n" in out  # the config shown is the one these overrides give


def test_version_is_kdruns(fresh):
    from importlib.metadata import version

    r = fresh[("--version",)]
    assert r["code"] == 0 and r["stdout"].startswith(f"kdrun {version('kdrun')} (torch ")
    assert f"hydra-core {version('hydra-core')}" in r["stdout"] and f"mlflow {version('mlflow')}" in r["stdout"]
    import torch  # the CUDA torch was built with, and what it sees (issue 21)

    cuda = "CUDA: none (a CPU build of torch)" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, "
    assert cuda in r["stdout"] and f"sentence-transformers {version('sentence-transformers')}" in r["stdout"]


def test_cfg_job_says_how_to_resolve_and_resolve_works(fresh):
    shown = fresh[("--cfg", "job")]
    assert shown["code"] == 0 and "output_dir: ${hydra:runtime.output_dir}" in shown["stdout"]
    assert "add --resolve" in shown["stderr"]
    resolved = fresh[("--cfg", "job", "--resolve")]
    where = resolved["cwd"]
    assert resolved["code"] == 0, resolved["stderr"]
    assert "${" not in resolved["stdout"] and f"output_dir: {where}/outputs/" in resolved["stdout"]
    assert "batch_size: 32" in resolved["stdout"] and not (where / "outputs").exists()


def test_help_and_cfg_job_do_not_import_torch(fresh):
    for args in (["--help"], ["--cfg", "job"]):
        r = fresh[tuple(args)]
        assert r["code"] == 0, r["stderr"]
        assert not r["torch"]


def test_console_script_help_lists_groups(tmp_path):
    r = run_kdrun(["--help"], cwd=tmp_path)  # (a new process: the installed console script)
    assert r.returncode == 0
    for group in ["teacher:", "student:", "loss:", "data:", "hardware:", "optimizer:", "experiment:"]:
        assert group in r.stdout
    # the data options only: their typed schemas live in their own group, not among the choices
    assert ("data: chatterbot, chatterbot_chat, code_search, fortunes, fortunes_lm, lm, ranking_columns, "
            "text_classification, triples\n") in r.stdout


def test_python_dash_m_kdrun_works(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kdrun", "--cfg", "job"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "margin_mse" in r.stdout


def test_progress_bars_show_on_a_terminal_only_unless_forced(monkeypatch, capsys):
    """Bars (rate, ETA) on a terminal; none in a log file or CI; KDRUN_PROGRESS=1/0 forces either way."""
    import io
    import sys

    from kdrun import progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("KDRUN_PROGRESS", raising=False)
    monkeypatch.delenv("CI", raising=False)
    for stream, env, shown in ((Tty(), {}, True), (io.StringIO(), {}, False), (Tty(), {"CI": "true"}, False),
                               (io.StringIO(), {"KDRUN_PROGRESS": "1"}, True), (Tty(), {"KDRUN_PROGRESS": "0"}, False)):
        monkeypatch.setattr(sys, "stderr", stream)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert progress.enabled() is shown, (type(stream).__name__, env)
        for _ in progress.bar(range(3), desc="evaluate", unit="batch", delay=0.0, file=stream):
            pass
        assert ("evaluate: 100%" in stream.getvalue()) is shown, (env, stream.getvalue())
        for k in env:
            monkeypatch.delenv(k)


def test_shell_completion_completes_options_and_keys(tmp_path):
    """Hydra's shell completion through kdrun (README: eval "$(kdrun -sc install=bash)")."""
    import os
    import subprocess
    import sys

    kdrun = str(Path(sys.executable).with_name("kdrun"))
    script = subprocess.run([kdrun, "-sc", "install=bash"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert script.returncode == 0 and "complete" in script.stdout
    for line, want in (("kdrun loss=margin", "loss=margin_mse_ce"), ("kdrun train.max_st", "train.max_steps=")):
        r = subprocess.run([kdrun, "-sc", "query=bash"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "COMP_LINE": line, "COMP_POINT": str(len(line))})
        assert want in r.stdout.split(), (line, r.stdout, r.stderr[-1000:])
