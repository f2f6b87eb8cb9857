"""Random override lists, valid and invalid, never end in a raw traceback: a finished run or one readable error.
Through the real entry point in this process, on the tiny models (experiment=smoke); an exception that would end the
process is returned with its traceback, as the process would print it."""
import random

import pytest

from support import kdrun, offline_env

VALID = ["loss=margin_mse", "loss=listwise_kl", "loss=pointwise_mse", "student=colbert", "optimizer.lr=1e-4",
         "train.grad_accum=2", "hardware.length_groups=2", "hardware.pad_to_multiple_of=16", "student.dropout=0",
         "data.negatives_per_query=2", "teacher.mode=online", "optimizer.schedule=constant", "train.log_every=1",
         "train.checkpoint_every=1", "resume=auto", "tracking.fallback=local"]
INVALID = ["loss=nope", "train.max_steps=abc", "train.batch_size=0", "hardware.length_groups=0",
           "teacher.path=/nonexistent", "student.path=/nonexistent", "student.init=pretrained", "data=triples",
           "data.eval_fraction=2", "teacher.kind=ranker", "hardware=multi_gpu", "student.layers=[9,9]",
           "student.dropout=2", "nonsense_key=1", "optimizer.lr=-1", "hardware.device=cuda", "data.max_train_queries=0",
           "train.batch_size=100000", "loss=kd_kl", "teacher=smollm2", "data=fortunes", "experiment=nope",
           "loss.terms.margin_mse.weight=-1", "train.epochs=0", "train.max_steps=0", "hardware.precision=fp16",
           "data.eval_candidates=1", "student.layers=[0,99]", "tracking.uri=http://127.0.0.1:9",
           "resume=/nonexistent", "train.keep_checkpoints=0", "train.checkpoint_every=-1", "tracking.fallback=cloud",
           "output_dir=/proc/kdrun-out"]
SMALL = ["experiment=smoke", "train.max_steps=1", "train.batch_size=4", "data.max_train_queries=8",
         "data.max_eval_queries=4", "tracking.log_student=false"]


def _case(seed: int) -> list:
    rng = random.Random(seed)
    picks = rng.sample(VALID, rng.randint(0, 3)) + rng.sample(INVALID, rng.choice([0, 1, 1, 2]))
    rng.shuffle(picks)
    return picks


@pytest.mark.slow  # 16 runs or failures of the whole command, each a few seconds
@pytest.mark.parametrize("seed", range(16))
def test_random_overrides_run_or_fail_in_one_readable_line(tmp_path, seed):
    picks = _case(seed)
    r = kdrun(SMALL + picks + [f"hydra.run.dir={tmp_path / 'out'}"], tmp_path, offline_env(tmp_path))
    text = r.stdout + r.stderr
    assert "Traceback" not in text, (picks, text[-3000:])
    if r.returncode != 0:  # one line of kdrun's, exit status 2, whoever found the mistake (Hydra included)
        errors = [line for line in r.stderr.splitlines() if line.startswith("kdrun: error:")]
        assert r.returncode == 2 and len(errors) == 1, (picks, r.returncode, r.stderr[-3000:])
    else:
        assert "student before" in r.stdout, (picks, r.stdout[-2000:])
