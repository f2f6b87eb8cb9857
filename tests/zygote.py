"""`kdrun` processes without the import bill: a zygote (as Android's and Chromium's process launchers have) imports
kdrun, torch, transformers and MLflow once, then forks a child per command that runs `kdrun.cli.main` exactly as the
console script does (`sys.exit(main())`: its own pid, signal handlers, atexit hooks, stdout and stderr files). A test
signals and kills the child as it would a `kdrun` it started; only Python's start and imports (6 s a process on 2
cores, most of a tiny run) are shared. For the tests that start many processes to kill them (tests/faults); the CLI's
own start-up is covered by tests that start the console script (tests/run/test_pipeline.py, tests/cli).

    with Zygote(env) as z:
        proc = z.kdrun(args, cwd, stdout=path, stderr=path)   # poll(), wait(), send_signal(), returncode, pid
"""
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

# What a kdrun run imports (cli and pipeline import little at the top; the task families, BERT, MLflow's client, the
# data, metrics and logged-model libraries and Hydra's launcher plugins come later): imported before the first fork, so
# a child starts at its first line of kdrun. (The second half, those imported lazily during a run, took a tiny run in a
# child from 6.0 s to 4.4 s; a second run in one process takes 2.1-2.7 s.)
PRELOAD = ["torch", "transformers", "mlflow", "mlflow.tracking", "kdrun.cli", "kdrun.pipeline", "kdrun.tasks.ranking",
           "kdrun.tracking", "kdrun.logged_model", "transformers.models.bert.modeling_bert",
           "sentence_transformers", "mlflow.sentence_transformers", "datasets", "ir_measures", "git", "rich", "sklearn",
           "scipy.sparse", "kdrun.tasks.ranking.task", "kdrun.data.chatterbot", "kdrun.data.bm25", "kdrun.train",
           "kdrun.model_card", "kdrun.tasks.classification", "kdrun.tasks.causal_lm",
           "hydra_plugins.hydra_joblib_launcher.joblib_launcher", "hydra_plugins.hydra_submitit_launcher.submitit_launcher",
           "hydra_plugins.kdrun_optuna_sweeper.optuna_sweeper"]


def _serve() -> None:  # the zygote process: one thread (a fork copies only the forking thread)
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    requests, replies = sys.stdin.buffer, os.fdopen(os.dup(1), "w", buffering=1)
    replies.write("ready\n")
    pending = b""
    while True:
        while True:  # report the children that ended: "exit <pid> <returncode as Popen gives it>"
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            replies.write(f"exit {pid} {-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)}\n")
        ready, _, _ = select.select([requests], [], [], 0.01)
        if not ready:
            continue
        chunk = os.read(requests.fileno(), 65536)
        if not chunk:
            return  # the test closed the pipe: children go on to their end, as processes a test started would
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            req = json.loads(line)
            pid = os.fork()
            if pid == 0:
                replies.close()  # (this child's copy: the test reads the zygote's replies only)
                _child(req)  # never returns
            replies.write(f"pid {req['id']} {pid}\n")


def _child(req: dict) -> None:
    os.setpgid(0, 0) if req.get("new_group") else None
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout = open(1, "w", closefd=False)  # block-buffered on a file, as a process's stdout is
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)
    sys.argv = ["kdrun", *req["args"]]
    from kdrun.cli import main

    sys.exit(main())  # SystemExit unwinds out of the zygote's loop: atexit hooks run, as in the console script


class Child:
    """A forked `kdrun`: the part of subprocess.Popen the tests use."""

    def __init__(self, zygote: "Zygote", pid: int, stdout: Path, stderr: Path):
        self.zygote, self.pid, self.stdout_path, self.stderr_path = zygote, pid, stdout, stderr

    @property
    def returncode(self):
        return self.zygote.exits.get(self.pid)

    def poll(self):
        return self.returncode

    def send_signal(self, sig) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout=None) -> int:
        with self.zygote.cond:
            if not self.zygote.cond.wait_for(lambda: self.pid in self.zygote.exits or self.zygote.dead, timeout):
                raise subprocess.TimeoutExpired(["kdrun"], timeout)
        if self.pid not in self.zygote.exits:
            raise RuntimeError(f"the zygote ended before kdrun (pid {self.pid}): {self.zygote.stderr_tail()}")
        return self.zygote.exits[self.pid]

    def communicate(self, timeout=None):
        self.wait(timeout)
        return (Path(self.stdout_path).read_text(errors="replace"), Path(self.stderr_path).read_text(errors="replace"))


class Zygote:
    """The zygote process for one test (its environment: HF_HUB_OFFLINE and HF_HOME are read at import time)."""

    def __init__(self, env: dict, logdir: Path):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._err = open(self.logdir / "zygote.err", "w")
        self.proc = subprocess.Popen([sys.executable, "-c", "import zygote; zygote._serve()"], env={
            **env, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])},
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True, bufsize=1)
        self.exits, self.pids, self.dead = {}, {}, False
        self.cond, self._send, self._n = threading.Condition(), threading.Lock(), 0
        first = self.proc.stdout.readline()
        if first.strip() != "ready":
            raise RuntimeError(f"the zygote did not start: {self.stderr_tail()}")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def stderr_tail(self) -> str:
        self._err.flush()
        return (self.logdir / "zygote.err").read_text(errors="replace")[-3000:]

    def _read(self) -> None:
        for line in self.proc.stdout:
            kind, a, b = line.split()
            with self.cond:
                (self.exits if kind == "exit" else self.pids)[int(a)] = int(b)
                self.cond.notify_all()
        with self.cond:
            self.dead = True
            self.cond.notify_all()

    def kdrun(self, args, cwd, env, stdout=None, stderr=None) -> Child:
        """Start `kdrun ARGS` in `cwd` with `env`; its stdout and stderr go to the files named (else to new files)."""
        with self._send:
            self._n += 1
            n = self._n
        stdout = Path(stdout or self.logdir / f"kdrun-{n}.out")
        stderr = Path(stderr or self.logdir / f"kdrun-{n}.err")
        req = {"id": n, "args": [str(a) for a in args], "cwd": str(cwd), "env": dict(env), "stdout": str(stdout),
               "stderr": str(stderr)}
        with self._send:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
        with self.cond:
            if not self.cond.wait_for(lambda: n in self.pids or self.dead, 60):
                raise RuntimeError(f"the zygote did not fork: {self.stderr_tail()}")
            if n not in self.pids:
                raise RuntimeError(f"the zygote ended: {self.stderr_tail()}")
            return Child(self, self.pids[n], stdout, stderr)

    def run(self, args, cwd, env, timeout=600) -> subprocess.CompletedProcess:
        """subprocess.run(capture_output=True, text=True) for a forked kdrun."""
        child = self.kdrun(args, cwd, env)
        out, err = child.communicate(timeout)
        return subprocess.CompletedProcess(["kdrun", *args], child.returncode, out, err)

    def close(self) -> None:
        """Wait for the children still running (a test's processes end with it), then end the zygote."""
        deadline = time.time() + 60
        with self.cond:
            self.cond.wait_for(lambda: self.dead or set(self.pids.values()) <= set(self.exits), deadline - time.time())
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self._err.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:  # a failed test: its children must not outlive it
            for pid in set(self.pids.values()) - set(self.exits):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.close()
