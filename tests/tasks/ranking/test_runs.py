"""Ranking runs in this process on the tiny models (experiment=smoke): every ranking loss yaml trains 2 steps (each
composed and run by pipeline.run); through the real `kdrun` entry point, embedding alignment logs its asymmetric
evaluation, a user's sentence-transformers columns train, and a cross-encoder teacher fine-tuned by kdrun is trained
and evaluated once per cache. Checked in the MLflow store the runs logged to."""
import json

import pytest

from support import (RANK, check_run, every_loss, history, kdrun, losses_for, offline_env, ok, only_run, ranking_rows,
                     runs)


RANK_LOSSES = losses_for("ranking")


@pytest.fixture(scope="module")
def rank_runs(tmp_path_factory, kdrun_cache):
    tmp = tmp_path_factory.mktemp("rank")
    return every_loss(tmp, kdrun_cache, "rank", [*RANK, "train.batch_size=4", "train.log_every=1", "teacher.mode=online"],
                 RANK_LOSSES)


@pytest.mark.parametrize("loss", RANK_LOSSES)
def test_ranking_loss_trains_through_kdrun(rank_runs, loss):
    check_run(rank_runs, loss, ["mrr_at_10", "ndcg_at_10"])


@pytest.mark.parametrize("mode", ["precompute"])  # (online: the ranking loss sweep above)
def test_embedding_alignment_trains_through_kdrun_and_logs_the_asymmetric_evaluation(tmp_path, kdrun_cache, mode):
    ok(kdrun([*RANK, "loss=embedding_align", f"teacher.mode={mode}", "data.max_train_queries=16",
              "data.max_eval_queries=6", "train.batch_size=4", "train.log_every=1", "tracking.experiment=align",
              f"hydra.run.dir={tmp_path / 'o'}"], tmp_path, offline_env(tmp_path, kdrun_cache)))
    c, run = only_run(tmp_path, "align")
    steps = [s for s, _ in history(c, run, "eval/asymmetric/mrr_at_10")]
    assert steps == [0, 2] and "eval/student/mrr_at_10" in run.data.metrics
    assert run.data.metrics["train/loss"] > 0
    if mode == "precompute":  # from the cache entry of the teacher's embeddings (one pass, no forward per step)
        assert run.data.metrics["teacher/cache_hits"] + run.data.metrics["teacher/cache_misses"] == 1


# ---- your own ranking data: sentence-transformers' columns, from a jsonl file or a `datasets` folder ----

def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _source(tmp_path, kind, rows):
    """rows as a jsonl file, or as a save_to_disk folder (a DatasetDict with a train split)."""
    if kind == "jsonl":
        return _jsonl(tmp_path / "rows.jsonl", rows)
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    return str(tmp_path / "saved")


@pytest.mark.parametrize("kind", ["jsonl", "folder"])
def test_ranking_trains_from_sentence_transformers_columns(tmp_path, kdrun_cache, kind):
    rows = ranking_rows(40, scores=kind == "folder")
    extra = ["teacher.mode=scores_file", "loss=margin_mse"] if kind == "folder" else []  # the data's own margins
    ok(kdrun(["experiment=smoke", "data=ranking_columns", f"data.path={_source(tmp_path, kind, rows)}",
              "data.eval_candidates=10", "train.max_steps=2", "train.log_every=1", "tracking.log_student=false",
              "train.eval_batch_size=16", *extra, f"tracking.experiment=st_{kind}", f"hydra.run.dir={tmp_path / 'out'}"],
             tmp_path, offline_env(tmp_path, kdrun_cache)))
    _, run = only_run(tmp_path, f"st_{kind}")
    assert run.info.status == "FINISHED"
    assert run.data.params["data/rows"] == "40" and "eval/student/mrr_at_10" in run.data.metrics
    if kind == "folder":
        assert run.data.metrics["teacher/scores_missing"] == 0 and "eval/teacher/mrr_at_10" not in run.data.metrics


# ---- kdrun fine-tunes the teacher, then the evaluation cache serves the second run ----

FT = ["experiment=smoke", "teacher=minilm_cross_encoder", "teacher.path=null", "teacher.name=kdrun-tiny/bert",
      "teacher.finetune.steps=3", "teacher.finetune.batch_size=4", "teacher.max_length=32", "data.max_train_queries=12",
      "data.max_eval_queries=6", "data.eval_candidates=5", "train.batch_size=8", "train.max_steps=2",
      "tracking.log_student=false", "tracking.experiment=ft"]


def test_kdrun_fine_tunes_a_cross_encoder_teacher_once_and_evaluates_it_once(tmp_path):
    from pathlib import Path

    env = offline_env(tmp_path)
    for seed in (1, 2):
        ok(kdrun([*FT, f"train.seed={seed}", f"hydra.run.dir={tmp_path / str(seed)}"], tmp_path, env))
    c, found = runs(tmp_path, "ft")
    found = sorted(found, key=lambda r: int(r.data.params["train.seed"]))
    first, second = (r.data.metrics for r in found)
    assert (first["teacher/finetune_cache_hit"], second["teacher/finetune_cache_hit"]) == (0.0, 1.0)
    assert first["teacher/finetune_seconds"] > 0 and "teacher/finetune_last_loss" in second
    assert (first["eval_cache/teacher_hit"], second["eval_cache/teacher_hit"]) == (0.0, 1.0)
    for key in ("mrr_at_10", "ndcg_at_10", "ms_per_example"):
        assert first[f"eval/teacher/{key}"] == second[f"eval/teacher/{key}"]
    # the student before training starts from the same weights in both runs: evaluated once too
    assert second["eval_cache/student_hit"] == 1.0
    for run in found:  # a cached evaluation leaves the same TREC files
        files = {f.path for f in c.list_artifacts(run.info.run_id, "eval")}
        assert files == {"eval/run.student.trec", "eval/run.teacher.trec", "eval/qrels.trec"}
    teacher_runs = [Path(c.download_artifacts(r.info.run_id, "eval/run.teacher.trec", str(tmp_path / r.info.run_id)))
                    .read_text() for r in found]
    assert teacher_runs[0] == teacher_runs[1] and teacher_runs[0]
