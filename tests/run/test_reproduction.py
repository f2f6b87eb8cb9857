"""`make reproduce` (scripts/reproduce_margin_mse), its quick form capped further: a sweep per data set and student on
the real models, each student from its own fine-tuned teacher, each parent run holding the results table."""
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT, offline_env

SWEEPS = ("chatterbot/teacher_slice", "code_search/colbert")  # of the four: each data set and each student once

@pytest.mark.slow(seconds=120)
def test_the_quick_reproduction_sweeps_leave_the_results_tables(tmp_path, kdrun_cache):
    """scripts/reproduce_margin_mse --quick (capped further here): two of its four sweeps, so that each data set and
    each student has one (--only chatterbot/teacher_slice,code_search/colbert; the script's --only is checked by
    tests/cli/test_scripts.py), 2 of the 6 losses, 1 seed, the student's teacher fine-tuned first (the bi-encoder's a
    dot-product one, ColBERT's a cosine one);
    each parent's results.md has its teacher's row (its own held-out metrics) and one row per loss;
    hydra.sweep.dir=DIR puts the sweeps under DIR/<data set>/<student>. In fp32 (the presets' bf16 is emulated, ~10x
    slower, on a CPU without AVX512-BF16: the tables' mechanics are the point here), one job at a time (--jobs 1: the
    other test process has the other core; tests/run/test_sweeps.py runs the joblib launcher); over 60 s (eight teacher
    3-step fine-tunes, two folds per sweep, and four runs in two sweeps of the real script): what `make reproduce`
    promises, which no smaller test shows."""
    from mlflow.tracking import MlflowClient

    env = offline_env(tmp_path, cache=kdrun_cache)
    script = ROOT / "scripts" / "reproduce_margin_mse"
    r = subprocess.run([str(script), "--quick", "--jobs", "1", "--only", ",".join(SWEEPS), "loss=in_batch_kl_ce,ce", "train.max_steps=3", "train.batch_size=4",
                        "teacher.finetune.steps=3", "teacher.finetune.batch_size=4", "hardware.precision=fp32",
                        "data.max_train_queries=16", "data.max_eval_queries=8", "data.eval_candidates=10",
                        f"hydra.sweep.dir={tmp_path / 'sw'}"],
                       cwd=tmp_path, env={**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"},
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    losses = ("ce", "in_batch_kl_ce")  # of the 6 (tests/cli/test_config.py checks the presets sweep all 6)
    for data in ("chatterbot", "code_search"):
        runs = client.search_runs([client.get_experiment_by_name(f"reproduce_{data}").experiment_id])
        parents = [x for x in runs if x.data.tags.get("kdrun.sweep_parent") == "1"]
        assert len(runs) == 3 and len(parents) == 1 and all(x.info.status == "FINISHED" for x in runs)
        for student, similarity, flops in (("teacher_slice", "dot", (1 / 3, 1 / 3 + 1e-3)), ("colbert", "cos", (1 / 3, 0.36))):
            if f"{data}/{student}" not in SWEEPS:
                assert not (tmp_path / "sw" / data / student).exists()
                continue
            children = [x for x in runs if x not in parents and x.data.params["student.arch"] ==
                        {"teacher_slice": "bi_encoder", "colbert": "late_interaction"}[student]]
            assert len(children) == 2 and {x.data.params["teacher.similarity"] for x in children} == {similarity}
            child = children[0]
            assert child.data.params["data.negatives_per_query"] == "4" and "teacher/finetune_first_loss" in child.data.metrics
            # one teacher pass per sweep: in_batch_kl_ce's (ce reads no teacher: it skips the pass)
            assert sum(x.data.metrics.get("teacher/cache_misses", 0) for x in children) == 1
            assert (tmp_path / "sw" / data / student / "summary" / "results.md").is_file()
            [parent] = [p for p in parents if p.info.run_id in {x.data.tags.get("mlflow.parentRunId") for x in children}]
            local = Path(client.download_artifacts(parent.info.run_id, "summary/results.md", str(tmp_path / data / student)))
            lines = local.read_text().splitlines()
            # (one student per sweep: the table leaves out the column that does not vary)
            assert lines[0].startswith("| model | loss | seeds | mrr_at_10 (before → after) | ndcg_at_10 (before")
            assert "latency per query vs teacher" in lines[0] and "FLOPs per token vs teacher" in lines[0]
            rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
            assert rows[0][:3] == ["teacher", "", "1"] and float(rows[0][3].split()[0]) > 0  # its teacher's MRR@10
            assert sorted(row[1] for row in rows[1:]) == sorted(losses)
            assert all(row[2] == "1" for row in rows[1:])
            # 2 of the teacher's 6 layers (ColBERT: and its projection to 128 dimensions)
            assert all(flops[0] - 1e-3 < float(row[-2]) < flops[1] for row in rows[1:])
        assert lines[0] in r.stdout and "| student | in_batch_kl_ce | 1 |" in r.stdout  # printed at the end
