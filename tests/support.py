"""What kdrun's tests share: float tolerances that hold on any CPU, an offline environment, and two ways to run
`kdrun` — in this process (`kdrun`: the real command-line entry point, Hydra and all, without a new interpreter;
what most end-to-end tests use) and as a new process (`run_kdrun`: the console script, for what needs a process:
exit codes seen by a shell, signals and kills, torchrun, launchers' worker processes). Tests that start dozens of
processes to kill them fork each from a zygote that imported kdrun once (tests/zygote.py).

The smoke presets (conf/experiment/smoke*.yaml) are the small runs: tiny models, a few steps. The lists below add
what a test needs beyond them (fewer queries, no saved student) so that each test says only what it is about."""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

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


# ---- the small runs: the smoke presets, and what tests add to them ------------------------------------------------

QUIET = ["tracking.log_student=false", "tracking.system_metrics=false"]
# ranking on chatterbot-corpus: the tiny BERT teaches its 2-layer slice (experiment=smoke), on a few queries
RANK = ["experiment=smoke", "data.max_train_queries=8", "data.max_eval_queries=4", "data.eval_candidates=10",
        "train.max_steps=2", *QUIET]
# classification on fortunes: the tiny BERT fine-tuned 8 steps, then its slice (experiment=smoke_classification)
CLS = ["experiment=smoke_classification", "data.max_train=48", "data.max_eval=24", "teacher.max_length=32",
       "student.max_length=32", "train.max_steps=2", *QUIET]
# causal LM on fortunes text: the tiny Llama teaches its 2-layer slice (experiment=smoke_causal_lm)
LM = ["experiment=smoke_causal_lm", "data.block_size=24", "data.max_train_blocks=8", "data.max_eval_blocks=2",
      "train.batch_size=2", "train.max_steps=2", "train.on_policy.eval_samples=0", *QUIET]
# the real models (all-MiniLM-L6-v2 and its slice), where the numbers of a real model are the point
REAL_RANK = ["train.max_steps=2", "train.batch_size=4", "train.log_every=1", "data.max_train_queries=8",
             "data.max_eval_queries=4", *QUIET]


# chat rows (messages in the format chat templates take), for the causal-LM family's chat data
CHATS = [
    [{"role": "user", "content": "What do cats drink?"}, {"role": "assistant", "content": "Cats drink milk."}],
    [{"role": "user", "content": "Where do fish live?"}, {"role": "assistant", "content": "Fish live in water."},
     {"role": "user", "content": "And birds?"}, {"role": "assistant", "content": "Birds live in nests."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What do cows eat?"},
     {"role": "assistant", "content": "Cows eat grass."}],
]


def chats(n):
    """n distinct conversations (the held-out split is a hash of the row)."""
    out = []
    for i in range(n):
        c = [dict(m) for m in CHATS[i % len(CHATS)]]
        c[-1]["content"] += f" ({i})"
        out.append(c)
    return out


# ---- the environment -----------------------------------------------------------------------------------------------

_shared: dict = {}


def share_models(root: Path) -> None:
    """Where the models every test's kdrun cache shares live (tiny models, de-quantised GGUF files): built once per
    test session, whatever cache a test gives kdrun (conftest sets it)."""
    _shared["models"] = Path(root)


def _link_shared(cache: Path) -> None:
    """Give a kdrun cache the session's tiny and GGUF models (symbolic links: built once, by whoever needs them
    first; kdrun writes a new entry next to its final name and renames it, so the two test processes never see
    half a model)."""
    models = _shared.get("models")
    if models is None:
        return
    cache.mkdir(parents=True, exist_ok=True)
    for sub in ("tiny", "gguf"):
        (models / sub).mkdir(parents=True, exist_ok=True)
        link = cache / sub
        if not link.exists() and not link.is_symlink():
            link.symlink_to(models / sub, target_is_directory=True)


def empty_store(db: Path) -> str:
    """A new MLflow SQLite store at `db` (its URI): a copy of one made once per test process. A new store migrates
    its tables on first use (seconds, for every test that made its own); a copy is a file copy."""
    template = _shared.get("store")
    if template is None or not template.is_file():
        from mlflow.tracking import MlflowClient

        template = Path(tempfile.mkdtemp(prefix="kdrun-store-")) / "empty.db"
        MlflowClient(tracking_uri=f"sqlite:///{template}").search_experiments()
        _shared["store"] = template
    if not db.exists():
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, db)
    return f"sqlite:///{db}"


def offline_env(tmp_path: Path, cache: Path = None) -> dict:
    """An environment where the hub cannot be reached and nothing is cached (but kdrun's own cache, when given, and
    the session's tiny models), with an MLflow store of its own in tmp_path/mlflow.db."""
    env = dict(os.environ)
    cache = Path(cache or tmp_path / "kdrun_cache")
    _link_shared(cache)
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="0",
               MLFLOW_TRACKING_URI=empty_store(tmp_path / "mlflow.db"), KDRUN_CACHE=str(cache))
    return env


# ---- kdrun in this process -------------------------------------------------------------------------------------------

@dataclass
class Result:
    """What a kdrun command left: its exit status and what it printed (as subprocess.CompletedProcess has them)."""
    returncode: int
    stdout: str
    stderr: str


@contextlib.contextmanager
def _isolated(env: dict, cwd: Path):
    """What a run changes in the process, given back afterwards: the environment, the working directory, argv, the
    streams, logging, signal handlers, Hydra's and MLflow's global state."""
    import signal

    saved_env, saved_argv, saved_cwd = dict(os.environ), list(sys.argv), os.getcwd()
    saved_streams = sys.stdout, sys.stderr
    root = logging.getLogger()
    saved_handlers, saved_level, saved_factory = list(root.handlers), root.level, logging.getLogRecordFactory()
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    active = sys.modules["mlflow"].active_run() if "mlflow" in sys.modules else None
    caller_run = active.info.run_id if active is not None else None
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in saved_handlers:
                with contextlib.suppress(Exception):
                    handler.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        logging.setLogRecordFactory(saved_factory)
        sys.stdout, sys.stderr = saved_streams
        sys.argv[:] = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for s, handler in saved_signals.items():
            signal.signal(s, handler)
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.hydra_config import HydraConfig

        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
        if "mlflow" in sys.modules:  # a run the command left active (it failed): not the caller's own
            import mlflow

            while mlflow.active_run() is not None and mlflow.active_run().info.run_id != caller_run:
                mlflow.end_run("KILLED")


def entry(main, args, cwd: Path, env: dict = None, prog: str = "kdrun") -> Result:
    """`PROG ARGS` run by its console script's function `main` (it reads sys.argv) in this process, in `cwd` with
    `env` (default: offline_env(cwd)). What it prints is returned, not shown; an exception that would end the process
    with a traceback is returned as status 1 and the traceback on stderr."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with _isolated(env or offline_env(Path(cwd)), Path(cwd)):
        sys.argv[:] = [prog, *map(str, args)]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main() or 0  # (a console script exits with what its function returns)
            except SystemExit as e:  # as the interpreter ends: an int is the status, anything else is printed
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if e.code is not None and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
            except BaseException:  # noqa: BLE001 - the process would die with this traceback
                traceback.print_exc()
                code = 1
            finally:
                for stream in (sys.stdout, sys.stderr):  # kdrun's redacting streams hold partial lines
                    with contextlib.suppress(Exception):
                        stream.flush()
    return Result(code, out.getvalue(), err.getvalue())


def kdrun(args, cwd: Path, env: dict = None) -> Result:
    """`kdrun ARGS` run by its real entry point (kdrun.cli.main: Hydra's composition, run directory, sweeper and
    basic launcher, kdrun's messages and exit status) in this process: no interpreter start, no re-import of torch,
    transformers and MLflow."""
    from kdrun import cli

    return entry(cli.main, args, cwd, env)


def pipeline_run(overrides, cwd: Path, env: dict = None) -> dict:
    """The run these overrides compose, by `kdrun.pipeline.run(cfg)` in this process (lightning-hydra-template's way of
    testing its train(cfg)): the config composed once through Hydra's compose API and set as the Hydra config a run
    sees (its group choices and overrides become the run's tags, its run dir the output dir), without the command
    line's sweeper, launcher and callbacks around it. For wiring tests that run many configs."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    from kdrun import pipeline

    with _isolated(env or offline_env(Path(cwd)), Path(cwd)):
        sys.argv[:] = ["kdrun", *map(str, overrides)]  # (what the run's kdrun.command tag shows)
        cfg = compose(overrides, hydra=True)
        with read_write(cfg.hydra.runtime), open_dict(cfg.hydra.runtime):
            cfg.hydra.runtime.output_dir = str(Path(str(cfg.hydra.run.dir)).resolve())
        HydraConfig.instance().set_config(cfg)
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]  # (as Hydra hands a job its config)
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        return pipeline.run(cfg)


def ok(result: Result) -> Result:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def compose(overrides=(), hydra: bool = False):
    """kdrun's config as these overrides compose it (Hydra's compose API), without running anything."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir

    from kdrun import config

    config.register()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return _compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra)


# ---- kdrun as a new process ----------------------------------------------------------------------------------------

def _console_script() -> list:
    exe = Path(sys.executable).with_name("kdrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "kdrun"]


def run_kdrun(args, cwd: Path, env=None, timeout=600) -> subprocess.CompletedProcess:
    """The real console script, as a user types it, in a new process."""
    return subprocess.run(_console_script() + list(map(str, args)), cwd=cwd, env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def start_kdrun(args, cwd: Path, env: dict, stderr=subprocess.PIPE) -> subprocess.Popen:
    """The real console script started in a new process, to signal it or run beside another: stdout piped, stderr
    piped (or stderr=subprocess.STDOUT), text."""
    return subprocess.Popen(_console_script() + list(map(str, args)), cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=stderr, text=True)


def wait_until(proc: subprocess.Popen, ready, timeout: float = 300, every: float = 0.05) -> None:
    """Poll ready() until it is true; fail with the process's last output if it ends first or time runs out."""
    deadline = time.time() + timeout
    while not ready():
        in_time = proc.poll() is None and time.time() <= deadline
        if not in_time and proc.poll() is None:
            proc.kill()  # (past the deadline: its output now, not a wait for its end)
        assert in_time, f"waited {timeout} s: {_tail(proc.communicate())} (status {proc.returncode})"
        time.sleep(every)


def _tail(outputs) -> str:
    out, err = outputs
    return (err or out or "")[-3000:]


# ---- reading what landed in MLflow ---------------------------------------------------------------------------------

def client(tmp: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{Path(tmp) / 'mlflow.db'}")


def runs(tmp: Path, experiment: str):
    """(client, the experiment's runs but sweep parents)."""
    c = client(tmp)
    found = c.search_runs([c.get_experiment_by_name(experiment).experiment_id])
    return c, [r for r in found if "kdrun.sweep_parent" not in r.data.tags]


def only_run(tmp: Path, experiment: str):
    """(client, the experiment's one run)."""
    c, found = runs(tmp, experiment)
    assert len(found) == 1, [r.info.run_name for r in found]
    return c, found[0]


def history(c, run, key: str) -> list:
    """[(step, value)] of a metric, in step order."""
    return [(m.step, m.value) for m in sorted(c.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def values(c, run, key: str) -> list:
    return [v for _, v in history(c, run, key)]


def held_out_texts(overrides) -> dict:
    """{qid or pid: text} of the held-out ranking data these overrides give."""
    from kdrun import pipeline

    _, data = pipeline.load_data(compose(overrides))
    text = {qid: q for qid, q in zip(data.eval_qids, data.eval_queries)}
    for i in range(len(data.eval_rows)):
        text.update(zip(data.eval_pids(i), data.eval_texts(i)))
    return text


def trec_scores(path: Path) -> dict:
    """{(qid, pid): score} of a TREC run file."""
    out = {}
    for line in Path(path).read_text().splitlines():
        qid, _, pid, _, score, _ = line.split()
        out[(qid, pid)] = float(score)
    return out


# ---- every loss of a family ----------------------------------------------------------------------

def losses_for(task: str):
    """The loss yamls whose every term fits `task`."""
    from omegaconf import OmegaConf

    from kdrun.losses.specs import TERMS

    out = []
    for path in sorted((CONF / "loss").glob("*.yaml")):
        names = list(OmegaConf.load(path).terms)
        if all(task in TERMS[n].tasks for n in names):
            out.append(path.stem)
    return out


def every_loss(tmp, cache, name, base, losses):
    """(client, runs): a run of each loss yaml on `base` (composed and run in this process by pipeline_run, one after
    the other into one store: what `kdrun -m loss=A,B,...` runs, without the sweeper around it)."""
    env = offline_env(tmp, cache)
    for loss in losses:
        pipeline_run([*base, f"loss={loss}", f"tracking.experiment={name}", f"hydra.run.dir={tmp / loss}"], tmp, env)
    c, found = runs(tmp, name)
    assert len(found) == len(losses)
    return c, found


def run_of(swept, loss):
    """(client, the sweep's run of loss `loss`, the loss yaml's terms)."""
    from omegaconf import OmegaConf

    from kdrun.summary import term_names

    c, jobs = swept
    yaml_terms = list(OmegaConf.load(CONF / "loss" / f"{loss}.yaml").terms)
    matching = [r for r in jobs if r.data.tags.get("kdrun.choice.loss") == loss]  # (two presets may share terms)
    assert len(matching) == 1, f"loss={loss}: {len(matching)} runs"
    assert sorted(term_names(matching[0])) == sorted(yaml_terms)
    return c, matching[0], yaml_terms


def check_run(swept, loss, eval_keys, student_only=()):
    """The run of `loss` finished, logged every term at steps 1 and 2 (finite), and the held-out metrics."""
    c, run, terms = run_of(swept, loss)
    assert run.info.status == "FINISHED"
    for term in ["loss", *terms]:
        got = history(c, run, f"train/{term}")
        assert [s for s, _ in got] == [1, 2], (loss, term, got)
        assert all(v == v and abs(v) < 1e6 for _, v in got), (loss, term, got)  # finite
    for key in eval_keys:
        assert f"eval/student/{key}" in run.data.metrics and f"eval/teacher/{key}" in run.data.metrics, key
    for key in student_only:
        assert f"eval/student/{key}" in run.data.metrics, key
    if "taid" in terms:
        t = history(c, run, "train/taid_t")
        assert 0.4 <= t[0][1] <= t[-1][1] <= 1.0
    return c, run


# ---- a sweep in two joblib worker processes (tests/run/test_sweeps.py, tests/tracking/test_report.py) ------------

SWEEP = ["experiment=smoke", "train.max_steps=3", "train.batch_size=4", "train.log_every=1", "data.max_train_queries=8",
         "data.max_eval_queries=4", "tracking.log_student=false", "tracking.experiment=sweep"]


def parallel_sweep_in(tmp):
    """4 jobs in 2 joblib worker processes, into one SQLite store: (tmp, result, client, runs)."""
    # MLflow samples its system metrics every 10 s: a job shorter than that has none, so the jobs' metric sets would
    # depend on the machine's speed (found in a CI run under load); test_ecosystem.py checks that they are logged
    r = run_kdrun(["-m", *SWEEP, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "tracking.system_metrics=false",
                   "optimizer.lr=1e-4,2e-4,3e-4,4e-4", f"hydra.sweep.dir={tmp / 'multirun'}"],
                  cwd=tmp, env=offline_env(tmp))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    c = client(tmp)
    found = c.search_runs([c.get_experiment_by_name("sweep").experiment_id])
    return tmp, r, c, found


# ---- a real tracking server ----------------------------------------------------------------------------------------

# ---- a small ranking setting for the teachers' unit tests (tests/teachers, tests/tasks/ranking) ----

TEACHER = dict(name=None, gguf_file=None, pooling="mean", similarity="cos", label_index=-1, max_length=64, top_k=0)
STUDENT = dict(name=None, path=None, init="teacher_layers", layers=[0, 5], pooling="mean", similarity="dot",
               max_length=64, scratch={}, tokenizer=None, dim=16)
QUERIES = ["what is your name", "how old are you", "do you like music", "what is the weather like today",
           "tell me a joke", "where do you live"]
PASSAGES = [["my name is bot", "it rains a lot here", "i am a computer program"],
            ["i was made last year", "i like jazz", "ask me later"],
            ["yes, especially jazz and some rock", "no", "my name is bot"],
            ["sunny with a light breeze and twenty degrees", "i live in the cloud", "ha ha"],
            ["why did the chicken cross the road? to get to the other side", "no", "sunny"],
            ["in the cloud, on many servers", "i like jazz", "i was made last year"]]


def build_ranking_student(*args, **kwargs):
    """kdrun.tasks.build_student as the ranking family calls it."""
    from kdrun.tasks import build_student

    return build_student(*args, task="ranking", **kwargs)


def ranking_data(train=None):
    """QUERIES x PASSAGES to train on (first passage positive), the first two queries held out."""
    from kdrun.data.ranking import RankingData

    train = train or list(zip(QUERIES, PASSAGES))
    return RankingData(train, QUERIES[:2], [PASSAGES[0], PASSAGES[1]], [[1, 0, 0], [1, 0, 0]], "test")


def ranking_task(teacher, data=None):
    from kdrun.runtime import make_runtime
    from kdrun.tasks.ranking import RankingTask

    return RankingTask(data or ranking_data(), teacher, None, make_runtime("cpu", "fp32"), eval_batch_size=4)


def ranking_rows(n=40, scores=False) -> list:
    """Rows in sentence-transformers' column layout (anchor, positive, negative_1, negative_2; with a teacher's
    margins where scores=True), for a user's own ranking file or `datasets` folder."""
    rows = []
    for i in range(n):
        row = {"anchor": f"what does animal {i} eat", "positive": f"animal {i} eats food number {i}",
               "negative_1": f"animal {i + 1} sleeps in place {i}", "negative_2": f"plants grow in soil {i}"}
        if scores:
            row["margin"] = [3.0 + i % 3, 5.0]
        rows.append(row)
    return rows


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_server(tmp: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` (what `make server` starts: without MLflow's job runners, which kdrun does not use) on
    127.0.0.1:port, its SQLite store and artifacts in tmp (kept across restarts); returns once /health answers. Stop it
    with os.killpg(proc.pid, signal)."""
    import urllib.request

    import pytest

    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}",
                             "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], cwd=tmp, stdout=open(tmp / "server.log", "a"),
                            stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
        assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
    os.killpg(proc.pid, 9)
    pytest.fail("mlflow server did not come up in 180 s: " + (tmp / "server.log").read_text()[-3000:])
