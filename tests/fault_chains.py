"""The fault-injection suite (issue 20), shared by tests/faults/test_sig*.py: `kdrun` processes (forked from a
zygote that imported kdrun once: tests/zygote.py) killed with SIGKILL or SIGTERM at seeded random offsets, so that
every phase gets hit (start, the teacher pass, training, a checkpoint write, an evaluation, the student's save), two
chains at a time against one MLflow store and one token cache. Each chain is up to 5 faults on one output dir, each
followed by `resume=auto`, then a last `resume=auto` to the end. Every trial must leave: the final student bit-identical
to an uninterrupted run's, every metric key once per step with the uninterrupted run's held-out metrics, no RUNNING run,
no traceback printed, no planted secret on screen, on disk or in the store. The totals are printed (pytest -s) and
asserted. The suite runs as two tests that can run on two test processes at once, one per signal
(tests/faults/test_sigkills.py, tests/faults/test_sigterms.py), each with its own seeds until 20 faults have landed:
40 in all, as the one suite did before."""
import json
import random
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from support import offline_env
from zygote import Zygote

MAX_CHAINS, FAULTS_PER_CHAIN, PARALLEL = 12, 5, 2  # per half: chains until its faults have been injected
SECRET, PASSWORD = "hf_" + "F" * 32, "Fau1tInj3ctPw"
ARGS = ["teacher=tiny", "student=scratch", "student.scratch.num_layers=1", "student.scratch.hidden_size=64",
        "student.scratch.num_heads=2", "student.scratch.intermediate_size=128", "student.max_length=32",
        "teacher.max_length=32", "data.max_train_queries=24", "data.max_eval_queries=8", "data.eval_candidates=10",
        "train.max_steps=8", "train.batch_size=4", "train.log_every=1", "train.eval_every=4", "train.checkpoint_every=2",
        f"+tracking.tags.api_token={SECRET}", f"+tracking.tags.db=postgresql://kd:{PASSWORD}@db/kd"]


def run_args(out: Path, experiment: str, cache: Path, *extra) -> list:
    return [*ARGS, f"hydra.run.dir={out}", f"tracking.experiment={experiment}", f"teacher.cache_dir={cache}", *extra]


def _history(client, run_id: str) -> dict:
    run = client.get_run(run_id)
    return {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in run.data.metrics}


def _leaks(texts, paths) -> list:
    found = [i for i, t in enumerate(texts) if SECRET in t or PASSWORD in t]
    for root in paths:
        for f in Path(root).rglob("*"):
            if f.is_file() and not f.is_symlink():
                data = f.read_bytes()
                if SECRET.encode() in data or PASSWORD.encode() in data:
                    found.append(str(f))
    return found


class Totals:
    def __init__(self):
        self.lock = threading.Lock()
        self.faults = self.sigkill = self.sigterm = self.finished_first = self.lost = self.tracebacks = 0
        self.leaks = self.running = 0
        self.problems: list = []
        self.phases: dict = {}

    def add(self, **counts):
        with self.lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def phase(self, name):
        with self.lock:
            self.phases[name] = self.phases.get(name, 0) + 1

    def problem(self, text):
        with self.lock:
            self.problems.append(text)


# Where a fault lands: (phase, what shows that the process is in it, the most seconds to wait after that). Watched
# in the output dir and the process's log, polled every 5 ms; the signal and the wait are drawn from the seed.
PHASES = [
    ("start", lambda out, cache, log: True, 2.0),
    ("teacher pass", lambda out, cache, log: any(cache.glob("ranking/*.partial")), 0.2),
    ("evaluation before training", lambda out, cache, log: "MLflow run" in log, 0.5),
    ("training", lambda out, cache, log: (out / "checkpoints" / "ckpt-00000002").is_dir(), 0.4),
    ("checkpoint write", lambda out, cache, log: any((out / "checkpoints").glob(".tmp-ckpt-*")), 0.0),
    ("final evaluation", lambda out, cache, log: (out / "checkpoints" / "ckpt-00000008").is_dir(), 0.3),
    ("student save", lambda out, cache, log: (out / "student").is_dir(), 0.0),
]


def _behind(phase, cache) -> bool:
    """A phase this chain has passed although it leaves no mark behind (its mark is a file while it runs): the teacher
    pass once the teacher's outputs are cached. Drawn anyway, it never comes and the whole run goes by unsignalled."""
    return phase == "teacher pass" and any(p.is_dir() and not p.name.endswith(".partial")
                                           for p in (cache / "ranking").glob("*"))


def _fault(proc, rng, out, cache, logfile, signals):
    """Wait for a phase drawn from the seed, then send one of `signals`; (phase, signal) or None if it ended first."""
    fresh = [p for p in PHASES if p[0] == "start" or not p[1](out, cache, "") and not _behind(p[0], cache)]
    name, seen, most = rng.choice(fresh)
    sig = rng.choice(signals)
    delay = rng.uniform(0, most)
    while proc.poll() is None:
        if seen(out, cache, logfile.read_text(errors="replace") if logfile.exists() else ""):
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(sig)
                return name, sig
            break
        time.sleep(0.005)
    return None


def _chain(zygote, seed, tmp, env, ref, totals, signals):
    from mlflow.tracking import MlflowClient

    rng = random.Random(seed)
    out, cache, experiment = tmp / f"chain{seed}", tmp / f"teacher-cache{seed}", f"chain{seed}"
    outputs = []
    for k in range(FAULTS_PER_CHAIN):
        logfile = tmp / f"chain{seed}-{k}.out"
        proc = zygote.kdrun(run_args(out, experiment, cache, *(["resume=auto"] if k else [])), tmp, env,
                            stdout=logfile, stderr=tmp / f"chain{seed}-{k}.err")
        fault = _fault(proc, rng, out, cache, logfile, signals)
        proc.wait(timeout=300)
        so, se = logfile.read_text(errors="replace"), (tmp / f"chain{seed}-{k}.err").read_text(errors="replace")
        outputs.append(so + se)
        if fault is None:
            totals.add(finished_first=1)  # it ended before its phase came: the chain is done
            break
        name, sig = fault
        totals.add(faults=1, sigkill=int(sig == signal.SIGKILL), sigterm=int(sig == signal.SIGTERM))
        totals.phase(f"{name} ({signal.Signals(sig).name})")
        early = name == "start" and proc.returncode == -signal.SIGTERM and not so.strip()  # before Python ran kdrun's
        if sig == signal.SIGTERM and proc.returncode not in (0, 128 + signal.SIGTERM) and not early:  # first line
            totals.problem(f"chain {seed} fault {k} ({name}): SIGTERM ended with status {proc.returncode}: {se[-800:]}")
    last = zygote.kdrun(run_args(out, experiment, cache, "resume=auto"), tmp, env)
    so, se = last.communicate(timeout=600)
    outputs.append(so + se)
    if last.returncode != 0:
        totals.add(lost=1)
        totals.problem(f"chain {seed}: the last resume failed ({last.returncode}): {se[-1500:]}")
        return
    tracebacks = sum("Traceback" in o for o in outputs)
    if tracebacks:
        totals.add(tracebacks=tracebacks)
        totals.problem(f"chain {seed}: a traceback: {[o[-1500:] for o in outputs if 'Traceback' in o][0]}")
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    running = [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    if running:
        totals.add(running=len(running))
        totals.problem(f"chain {seed}: runs left RUNNING: {running}")
    final_id = (out / "kdrun-run-id").read_text().strip()
    final = client.get_run(final_id)
    got, want = _history(client, final_id), ref["history"]
    student = load_file(out / "student" / "model.safetensors")
    lost = []
    if final.info.status != "FINISHED":
        lost.append(f"final run {final.info.status}")
    if student.keys() != ref["student"].keys() or not all(torch.equal(student[k], ref["student"][k]) for k in student):
        lost.append("the student differs from the uninterrupted run's")
    for key, points in got.items():
        steps = [s for s, _ in points]
        if len(steps) != len(set(steps)):
            lost.append(f"{key} logged twice at a step: {steps}")
    for key in [k for k in want if k.startswith(("eval/student/", "eval/teacher/", "train/loss"))]:
        if [s for s, _ in got.get(key, [])] != [s for s, _ in want[key]]:
            lost.append(f"{key}: steps {[s for s, _ in got.get(key, [])]}, uninterrupted {[s for s, _ in want[key]]}")
        elif key.startswith("eval/") and not key.endswith("ms_per_example") and \
                any(abs(a - b) > 1e-6 for (_, a), (_, b) in zip(got[key], want[key])):
            lost.append(f"{key}: {got[key]} vs uninterrupted {want[key]}")
    if lost:
        totals.add(lost=1)
        totals.problem(f"chain {seed}: {lost[:4]}")
    leaks = _leaks(outputs, [out])
    if leaks:
        totals.add(leaks=len(leaks))
        totals.problem(f"chain {seed}: planted secret in {leaks[:4]}")


def run_suite(tmp_path, signals, first_seed: int, min_faults: int) -> None:
    """Chains of `signals` (seeds from `first_seed`), two at a time, until `min_faults` were injected; asserts that
    nothing was lost and prints the totals."""
    from mlflow.tracking import MlflowClient

    env = offline_env(tmp_path)
    zygote = Zygote(env, tmp_path / "zygote")
    t0 = time.time()
    ref = zygote.run(run_args(tmp_path / "ref", "ref", tmp_path / "teacher-cache-ref"), tmp_path, env)
    duration = time.time() - t0
    assert ref.returncode == 0, ref.stderr[-3000:]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    [ref_run] = client.search_runs([client.get_experiment_by_name("ref").experiment_id])
    reference = {"history": _history(client, ref_run.info.run_id),
                 "student": load_file(tmp_path / "ref" / "student" / "model.safetensors")}
    totals = Totals()
    seed = first_seed
    while totals.faults < min_faults and seed < first_seed + MAX_CHAINS:  # (a process may end before its fault is due)
        threads = [threading.Thread(target=_chain, args=(zygote, s, tmp_path, env, reference, totals, signals))
                   for s in range(seed, seed + PARALLEL)]
        seed += PARALLEL
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    zygote.close()
    store_leaks = _leaks([], [tmp_path / "mlflow.db"]) if (tmp_path / "mlflow.db").exists() else []
    totals.add(leaks=len(store_leaks))
    report = {k: getattr(totals, k) for k in ("faults", "sigkill", "sigterm", "finished_first", "lost", "tracebacks",
                                              "leaks", "running")}
    report["survived"] = totals.faults - totals.lost if not totals.problems else None
    report["phases"] = totals.phases
    print(f"\nfault suite: {json.dumps(report)} (uninterrupted run: {duration:.1f} s)", file=sys.stderr)
    assert not totals.problems, "\n".join(totals.problems[:6])
    assert totals.faults >= min_faults
