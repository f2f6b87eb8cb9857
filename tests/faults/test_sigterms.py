"""The fault suite's SIGTERMs (tests/fault_chains.py): a run stopped at seeded instants of every phase (start, the
teacher pass, the evaluation before training, training, a checkpoint write, the final evaluation, the student's save)
says so in two lines without a traceback, and resumed with resume=auto ends as an uninterrupted run does."""
import signal

import pytest

from fault_chains import run_suite


@pytest.mark.slow(seconds=150)
def test_seeded_sigterms_in_every_phase_lose_nothing(tmp_path):
    """Over 60 s (about 40 kdrun processes forked from the zygote, stopped or run to their end, each chain compared
    with an uninterrupted run): that a stop at any instant of any phase loses nothing, which no single stop shows."""
    run_suite(tmp_path, (signal.SIGTERM,), first_seed=100, min_faults=20)
