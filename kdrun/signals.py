"""SIGTERM and SIGINT, wherever a run is: `Stopped` raised from the handler outside the training loop (PhaseSignals:
naming the phase and the newest checkpoint), a checkpoint requested at the end of the step inside it (StopSignals),
signals held while C++ extensions import (held_signals) or deferred past a tracking-store call (deferred_signals),
a stop that a finalizer swallowed raised again at the next phase (raise_lost), and signals ignored once a run's
result is recorded (work_done). Imports nothing of kdrun."""
from __future__ import annotations

import logging
import signal
from typing import Callable, Optional

log = logging.getLogger(__name__)


class Stopped(BaseException):
    """SIGTERM/SIGINT outside the training loop, raised from the signal handler wherever the program is: a
    BaseException (as KeyboardInterrupt is), so that no `except Exception` on the way swallows or rewraps it. The CLI
    prints it in one line with what to do next, and exits with 128 + the signal."""

    def __init__(self, signum: int, phase: str = "while starting", path=None):
        self.signum, self.path, self.step = signum, path, None
        super().__init__(f"stopped by {signal.Signals(signum).name} {phase}" + (f"; checkpoint {path}" if path else ""))


_command = False  # True in the kdrun command itself (not a program or a test that imports kdrun)
_lost = None  # a Stopped that Python swallowed (raised while a finalizer ran), for raise_lost


def _unraisable(hook):
    def quiet(unraisable):
        """A signal handler's Stopped raised while Python runs a finalizer (a weakref callback, __del__) cannot
        propagate: Python prints it as "Exception ignored" with a traceback and goes on. Kept here instead, without
        the traceback, for raise_lost; anything else goes to the hook as before."""
        global _lost
        if isinstance(unraisable.exc_value, Stopped):
            _lost = _lost or unraisable.exc_value
        else:
            hook(unraisable)

    quiet.kdrun = True
    return quiet


def raise_lost() -> None:
    """Raise again a stop that a finalizer swallowed (see _unraisable): called at each phase boundary, and before a
    run is marked FINISHED (found by the fault suite: SIGTERM during the final evaluation ended FINISHED, status 0)."""
    global _lost
    if _lost is not None:
        lost, _lost = _lost, None
        raise lost


def on_stop_signals(handler, command: bool = False) -> dict:
    """`handler` for SIGTERM and SIGINT from now on (in the main thread; elsewhere Python allows no handlers): the
    handlers it replaces, by signal, to restore."""
    import sys
    import threading

    global _command
    _command = _command or command
    if not getattr(sys.unraisablehook, "kdrun", False):
        sys.unraisablehook = _unraisable(sys.unraisablehook)
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}


class StopHandlers:
    """A context that puts `_handle` on SIGTERM and SIGINT and gives the handlers it replaced back on exit."""

    def __enter__(self):
        self._old = on_stop_signals(self._handle)
        return self

    def _handle(self, signum, frame):
        raise NotImplementedError

    def release(self) -> None:
        """Give nothing back on exit: whoever calls this has set the handlers that stay."""
        self._old = {}

    def __exit__(self, *exc):
        for s, old in getattr(self, "_old", {}).items():  # (idempotent: a second call finds nothing to restore)
            signal.signal(s, old)
        self._old = {}
        return False


class held_signals(StopHandlers):
    """SIGTERM/SIGINT recorded, not raised, inside this block; on leaving it a recorded one raises Stopped. For
    imports of C++ extensions (torch): an exception raised from a signal handler while pybind11 runs Python code
    ends in std::terminate (status -6; found by the fault suite)."""

    def __enter__(self):
        self.signum = 0
        return super().__enter__()

    def _handle(self, signum, frame):
        self.signum = self.signum or signum

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if self.signum and exc[0] is None:
            raise Stopped(self.signum)
        return False


class deferred_signals(held_signals):
    """SIGTERM/SIGINT recorded inside this block and handed, on leaving it, to the handler it found there: a raising
    one raises Stopped after the block, the training loop's records its checkpoint request as before. For calls that
    must not be cut in the middle: a tracking-store call. An exception raised from a signal handler inside SQLAlchemy
    can leave a SQLite transaction open in a connection nobody holds, so the store stays locked for every process
    until this one exits (found by the fault suite: a run SIGTERMed in its final evaluation could not mark itself
    KILLED, and a parallel run could not start, for minutes). Records as held_signals does; hands over instead of
    raising."""

    def __exit__(self, *exc):
        handler = self._old.get(self.signum)
        StopHandlers.__exit__(self, *exc)  # the handlers back, without held_signals' own raise
        if self.signum:
            if callable(handler):
                handler(self.signum, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(self.signum)
        return False


def work_done() -> bool:
    """A single run of the kdrun command has finished and recorded its result: SIGTERM and SIGINT are ignored from
    here to the exit, which is only Hydra's bookkeeping and the interpreter's shutdown. A scheduler's signal now could
    only name a phase that is over, or, once Python has reset its handlers while shutting down, turn a finished run's
    exit status into 'killed by SIGTERM'. Not in a sweep (its next job can still be stopped), nor in a program that
    imports kdrun. True when the signals are now ignored."""
    import threading

    if not _command or threading.current_thread() is not threading.main_thread():
        return False
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return False
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)
    return True


class PhaseSignals(StopHandlers):
    """Outside the training loop (loading, the teacher pass, evaluations, saving): SIGTERM or SIGINT raises
    Stopped at once, naming the phase and the newest checkpoint, so the run ends KILLED with a resume hint
    instead of dying where it stands (SIGTERM's default) or with a KeyboardInterrupt traceback. The loop's own
    StopSignals takes over while it trains and hands back to this when it ends."""

    def __init__(self, last_checkpoint: Optional[Callable[[], Optional[str]]] = None):
        """`last_checkpoint`: the newest checkpoint's path now (named in the message and the resume hint), or None."""
        self._phase, self.last_checkpoint = "while starting", last_checkpoint

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, name: str) -> None:
        self.check()  # a new phase starts only if no stop was lost in the last one
        self._phase = name

    def _handle(self, signum, frame):
        for s in self._old:  # a second signal while this one unwinds: not again
            signal.signal(s, signal.SIG_IGN)
        raise Stopped(signum, self.phase, self.last_checkpoint() if self.last_checkpoint else None)

    @staticmethod
    def check() -> None:
        """A stop raised while a finalizer ran, which Python swallowed, raised again (raise_lost)."""
        raise_lost()


class StopSignals(StopHandlers):
    """While training: SIGTERM or SIGINT asks the loop to checkpoint at the end of the step and stop (a second SIGINT
    stops at once). Under DDP the ranks agree on the step (one tiny all-reduce per step)."""

    def __init__(self):
        self.signum = 0

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum
        log.warning("%s: finishing this step, writing a checkpoint, then stopping (Ctrl-C again: stop now)",
                    signal.Signals(signum).name)

    def requested(self, rt) -> int:
        """The signal number when a stop was asked for (on any rank), else 0."""
        return rt.max_int(self.signum)
