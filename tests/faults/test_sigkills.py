"""The fault suite's SIGKILLs (tests/fault_chains.py): a run killed at seeded instants of every phase (start, the
teacher pass, the evaluation before training, training, a checkpoint write, the final evaluation, the student's save),
each time resumed with resume=auto, ends as an uninterrupted run does and loses nothing."""
import signal

import pytest

from fault_chains import run_suite


@pytest.mark.slow(seconds=150)
def test_seeded_sigkills_in_every_phase_lose_nothing(tmp_path):
    """Over 60 s (about 40 kdrun processes forked from the zygote, killed or run to their end, each chain compared
    with an uninterrupted run): that a kill at any instant of any phase loses nothing, which no single kill shows."""
    run_suite(tmp_path, (signal.SIGKILL,), first_seed=0, min_faults=20)
