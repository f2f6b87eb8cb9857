"""Teacher modes end to end through the real `kdrun` entry point, in this process, on the tiny models: a learning-rate
sweep runs the teacher once (the cache), the cached and score-file runs train as the online teacher does (to float32
rounding: the cache ran the teacher in batches of other shapes), every ranking student architecture trains from every
kind of teacher, and two teachers are cached apart and averaged."""
import math

import pytest

from support import QUIET, TRAINING_ULPS, f32_close, kdrun, offline_env, ok as _ok, pipeline_run, runs as _runs, values

SMALL = ["experiment=smoke", "train.max_steps=3", "train.batch_size=4", "train.log_every=1", "data.max_train_queries=8",
         "data.max_eval_queries=4", "optimizer.warmup_ratio=0", *QUIET]


def _losses(client, run):
    return values(client, run, "train/loss")


@pytest.fixture(scope="module")
def modes(tmp_path_factory):
    """One store and one empty teacher cache: an online run, a 3-lr sweep with the cached teacher, a score file
    written by `kdrun mode=score`, and a run trained from that file."""
    tmp = tmp_path_factory.mktemp("modes")
    env = offline_env(tmp)
    _ok(kdrun(SMALL + ["teacher.mode=online", "optimizer.lr=2e-4", "tracking.experiment=online",
                           f"hydra.run.dir={tmp / 'online'}"], cwd=tmp, env=env))
    _ok(kdrun(["-m", *SMALL, "teacher.mode=precompute", "optimizer.lr=1e-4,2e-4,3e-4", "tracking.experiment=sweep",
                   f"hydra.sweep.dir={tmp / 'sweep'}"], cwd=tmp, env=env))
    scored = _ok(kdrun(SMALL + ["mode=score", f"scores_out={tmp / 'scores.tsv'}", f"hydra.run.dir={tmp / 'score'}"],
                           cwd=tmp, env=env))
    _ok(kdrun(SMALL + ["teacher.mode=scores_file", f"teacher.scores_file={tmp / 'scores.tsv'}", "optimizer.lr=2e-4",
                           "tracking.experiment=file", f"hydra.run.dir={tmp / 'file'}"], cwd=tmp, env=env))
    return tmp, scored


def test_a_three_lr_sweep_runs_the_teacher_over_the_training_data_once(modes):
    tmp, _ = modes
    client, runs = _runs(tmp, "sweep")
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    by_lr = {float(r.data.params["optimizer.lr"]): r.data.metrics for r in runs}
    first = by_lr[1e-4]  # job 0 fills the cache; jobs 1 and 2 read it
    assert first["teacher/train_forward_calls"] > 0 and first["teacher/cache_misses"] == 1
    assert first["teacher/seconds"] > 0
    for lr in (2e-4, 3e-4):
        m = by_lr[lr]
        assert m["teacher/train_forward_calls"] == 0, lr  # the teacher never ran over the training data
        assert (m["teacher/cache_hits"], m["teacher/cache_misses"], m["teacher/seconds"]) == (1, 0, 0)
    online = _runs(tmp, "online")[1][0].data.metrics
    assert online["teacher/train_forward_calls"] >= 3 * 2  # online: query and passage forwards every step


def test_cached_teacher_trains_like_the_online_teacher(modes):
    tmp, _ = modes
    client, online = _runs(tmp, "online")
    _, sweep = _runs(tmp, "sweep")
    cached = next(r for r in sweep if float(r.data.params["optimizer.lr"]) == 2e-4)
    a, b = _losses(client, online[0]), _losses(client, cached)
    assert len(a) == 3 and all(math.isfinite(x) for x in a)
    assert f32_close(b, a, TRAINING_ULPS), (a, b)


def test_a_score_file_from_the_scoring_command_trains_like_the_online_teacher(modes):
    tmp, scored = modes
    assert "read from the teacher cache" in scored.stdout and "teacher.mode=scores_file" in scored.stdout
    lines = (tmp / "scores.tsv").read_text().splitlines()
    assert lines and all(len(line.split("\t")) == 5 for line in lines)
    client, online = _runs(tmp, "online")
    _, file_runs = _runs(tmp, "file")
    run = file_runs[0]
    assert run.info.status == "FINISHED" and run.data.metrics["teacher/scores_missing"] == 0
    assert "eval/teacher/mrr_at_10" not in run.data.metrics  # no teacher model to evaluate
    a, b = _losses(client, online[0]), _losses(client, run)
    assert f32_close(b, a, TRAINING_ULPS), (a, b)


@pytest.fixture(scope="module")
def local_cross_encoder(tmp_path_factory, tiny_bert):
    """A cross-encoder directory (the tiny BERT + an untrained 2-logit head): plumbing, not quality."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    d = tmp_path_factory.mktemp("cross_encoder")
    AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(d)
    return d


STUDENTS = {"teacher_slice": "bi_encoder", "colbert": "late_interaction", "cross_encoder": "cross_encoder"}


def test_every_student_architecture_trains_from_every_teacher_mode(modes, local_cross_encoder):
    """bi-encoder / late-interaction / cross-encoder students x online, cached and score-file bi-encoder teachers,
    plus a cross-encoder teacher: 2 steps each."""
    tmp, _ = modes
    env = offline_env(tmp)
    two = ["experiment=smoke", "train.max_steps=2", "train.batch_size=4", "train.log_every=1",
           "data.max_train_queries=6", "data.max_eval_queries=3", *QUIET]
    for student in STUDENTS:  # each combination composed and run in this process (pipeline_run)
        for mode in ("online", "precompute", "scores_file"):
            pipeline_run([*two, f"student={student}", f"teacher.mode={mode}", f"teacher.scores_file={tmp / 'scores.tsv'}",
                          "teacher.max_missing_fraction=0.9", "tracking.experiment=matrix",
                          f"hydra.run.dir={tmp / 'matrix' / student / mode}"], tmp, env)
        pipeline_run([*two, f"student={student}", "teacher=bert", f"teacher.path={local_cross_encoder}",
                      "teacher.max_length=64", "tracking.experiment=matrix",
                      f"hydra.run.dir={tmp / 'matrix' / student / 'cross_encoder'}"], tmp, env)
    client, runs = _runs(tmp, "matrix")
    seen = set()
    for r in runs:
        assert r.info.status == "FINISHED"
        p = r.data.params
        seen.add((p["student.arch"], p["teacher.kind"], p["teacher.mode"]))
        losses = _losses(client, r)
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses), (p["student.arch"], p["teacher.mode"])
        assert r.data.metrics["eval/student/mrr_at_10"] >= 0
    archs = set(STUDENTS.values())
    expected = {(a, "bi_encoder", m) for a in archs for m in ("online", "precompute", "scores_file")}
    expected |= {(a, "cross_encoder", "online") for a in archs}
    assert len(runs) == 12 and seen == expected, seen


def test_two_teachers_are_cached_apart_and_averaged(modes):
    tmp, _ = modes
    _ok(kdrun(SMALL + ["+teacher@teachers.cls=tiny", "teachers.cls.pooling=cls",
                           "teachers.cls.similarity=dot", "teachers.cls.weight=0.5",
                           "loss=margin_mse", "tracking.experiment=two", f"hydra.run.dir={tmp / 'two'}"],
                  cwd=tmp, env=offline_env(tmp)))
    _, runs = _runs(tmp, "two")
    m = runs[0].data.metrics
    # the main teacher's entry is already cached (same data, weights and settings as the sweep); the cls one is new
    assert (m["teacher/cache_hits"], m["teacher/cache_misses"]) == (1, 1)
    assert runs[0].data.params["teachers.cls.weight"] == "0.5"
    assert runs[0].data.tags["kdrun.choice.teachers.cls"] == "tiny"  # the extra teacher's option, as a tag
