"""Errors meant for people: each carries one message naming the place and the fix."""


class KdrunError(Exception):
    """A problem the user can fix; the CLI prints its message alone, no traceback."""


class ConfigError(KdrunError):
    """A config value is wrong (the message names the key)."""


class DataError(KdrunError):
    """A data file is missing, unreadable or malformed (the message names file and line)."""


class ModelLoadError(KdrunError):
    """A model cannot be loaded (the message names it and how to pass a local copy)."""


class NonFiniteLossError(KdrunError):
    """The loss became NaN or inf."""


class Stopped(BaseException):
    """SIGTERM/SIGINT outside the training loop, raised from the signal handler wherever the program is: a
    BaseException (as KeyboardInterrupt is), so that no `except Exception` on the way swallows or rewraps it. The CLI
    prints it in one line with what to do next, and exits with 128 + the signal."""

    def __init__(self, signum: int, phase: str = "while starting", path=None):
        import signal

        self.signum, self.path, self.step = signum, path, None
        super().__init__(f"stopped by {signal.Signals(signum).name} {phase}" + (f"; checkpoint {path}" if path else ""))


def on_stop_signals(handler) -> dict:
    """`handler` for SIGTERM and SIGINT from now on (in the main thread; elsewhere Python allows no handlers): the
    handlers it replaces, by signal, to restore."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
