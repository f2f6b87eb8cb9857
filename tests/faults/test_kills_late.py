"""The fault suite's last phases (tests/fault_chains.py): SIGKILL and SIGTERM at seeded offsets into a checkpoint's
write, the final evaluation and the student's save; each resumed with resume=auto loses nothing."""
import pytest

from fault_chains import run_suite


@pytest.mark.slow
def test_seeded_kills_from_a_checkpoint_write_to_the_student_save_lose_nothing(tmp_path):
    run_suite(tmp_path, ("checkpoint write", "final evaluation", "student save"), min_faults=16)
