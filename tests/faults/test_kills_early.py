"""The fault suite's first phases (tests/fault_chains.py): SIGKILL and SIGTERM at seeded offsets into a run's start,
its teacher pass, its evaluation before training and its training; each resumed with resume=auto loses nothing."""
import pytest

from fault_chains import run_suite


@pytest.mark.slow
def test_seeded_kills_from_the_start_to_training_lose_nothing(tmp_path):
    run_suite(tmp_path, ("start", "teacher pass", "evaluation before training", "training"), min_faults=24)
