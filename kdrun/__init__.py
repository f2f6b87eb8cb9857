"""kdrun: a command-line runner for knowledge-distillation experiments."""

__version__ = "0.1.0"

import time as _time

STARTED = _time.time()  # when kdrun was first imported: the clock of train/first_step_seconds
