"""Speed features that take long to exercise: torch.compile, and kdrun-bench end to end (figures are not tested)."""
import json
import subprocess
import sys

import pytest

from conftest import offline_env, run_kdrun

SMALL = ["train.max_steps=2", "train.batch_size=4", "train.log_every=1", "data.max_train_queries=8",
         "data.max_eval_queries=8", "tracking.log_student=false", "student.dropout=0"]


def _losses(env, name):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    run = client.search_runs([client.get_experiment_by_name("kdrun").experiment_id],
                             filter_string=f"attributes.run_name = '{name}'")[0]
    return [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]


def test_flops_per_token_count_the_layers_every_token_passes(minilm_dir):
    """2 x the parameters applied to each token: embedding tables (a lookup) and BERT's pooler (the first token,
    once per sequence) left out, so a student with 2 of the teacher's 6 layers costs a third of it per token."""
    from transformers import AutoModel

    from kdrun.pipeline import flops_per_token

    teacher = AutoModel.from_pretrained(minilm_dir)
    layer = sum(p.numel() for p in teacher.encoder.layer[0].parameters())
    norm = sum(p.numel() for p in teacher.embeddings.LayerNorm.parameters())
    assert flops_per_token(teacher) == 2.0 * (6 * layer + norm)
    teacher.encoder.layer = teacher.encoder.layer[:1] + teacher.encoder.layer[5:]
    assert flops_per_token(teacher) == 2.0 * (2 * layer + norm)
    assert flops_per_token(teacher) / (2.0 * (6 * layer + norm)) == pytest.approx(1 / 3, rel=1e-3)


@pytest.mark.demo  # minutes; not in CI (make test-demo)
def test_compiled_student_trains_like_the_eager_one(tmp_path):
    env = offline_env(tmp_path)
    for name, extra in (("eager", []), ("compiled", ["hardware.compile=true"])):
        r = run_kdrun(SMALL + extra + [f"tracking.run_name={name}", f"hydra.run.dir={tmp_path / name}"],
                      cwd=tmp_path, env=env, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
    eager, compiled = _losses(env, "eager"), _losses(env, "compiled")
    assert len(compiled) == 2 and compiled == pytest.approx(eager, rel=1e-3)


@pytest.mark.demo  # minutes; not in CI (make test-demo)
def test_bench_runs_every_contender_side_by_side(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "kdrun.bench", "--steps", "2", "--warmup", "1", "--batch-size", "4",
                        "--examples", "200", "--max-length", "64", "--json", str(out)],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for word in ("kdrun", "sentence-transformers", "st-bucketed", "plain", "samples/s", "real tokens/s", "padding",
                 "CPU ms/step", "peak MB", "kdrun / sentence-transformers:", "kdrun / st-bucketed:", "kdrun / plain:"):
        assert word in r.stdout, r.stdout
    result = json.loads(out.read_text())["results"]["minilm"]
    for name in ("kdrun", "sentence-transformers", "st-bucketed", "plain"):
        assert result[name]["samples_per_s"] > 0 and 0 <= result[name]["padding_fraction"] < 1
        assert result[name]["peak_mb"] > 0 and result[name]["cpu_ms_per_step"] > 0
    assert result["kdrun/plain"] == pytest.approx(result["kdrun"]["samples_per_s"] / result["plain"]["samples_per_s"])
    # the bucketed peer pads less than the peer as its example trains
    assert result["st-bucketed"]["padding_fraction"] < result["sentence-transformers"]["padding_fraction"]


def test_bench_rejects_unknown_cases_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kdrun.bench", "--cases", "gpt5"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "unknown case 'gpt5'" in r.stderr and "Traceback" not in r.stderr


def test_bench_flops_count_params_and_attention_on_real_tokens(minilm_dir):
    """MFU's numerator: 3 x (2 x params x tokens + 4 x layers x width x tokens^2) per student text, plus the
    teacher's forward over both pairs when it runs online."""
    from transformers import AutoTokenizer

    from kdrun.bench import SHAPES, flops_per_example

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    ex = {"query": "cat", "positive": "the cat sat", "negative": "a dog"}  # 3, 5 and 4 tokens with [CLS] [SEP]
    s = SHAPES["minilm"]
    params = 6 * (4 * 384 ** 2 + 2 * 384 * 1536)
    fwd = lambda t, p=params, layers=6, d=384: 2 * p * t + 4 * layers * d * t * t
    assert flops_per_example(tok, [ex], "minilm", None, 128) == pytest.approx(3 * (fwd(3) + fwd(5) + fwd(4)))
    b = SHAPES["bert-base"]
    tparams = 12 * (4 * 768 ** 2 + 2 * 768 * 3072)
    teacher = fwd(7, tparams, 12, 768) + fwd(6, tparams, 12, 768)  # [CLS] cat [SEP] the cat sat [SEP]; ... a dog [SEP]
    assert flops_per_example(tok, [ex], "minilm", "bert-base", 128) == pytest.approx(
        3 * (fwd(3) + fwd(5) + fwd(4)) + teacher)
    assert s["num_hidden_layers"] == 6 and b["hidden_size"] == 768


@pytest.mark.demo  # minutes; not in CI (make test-demo)
def test_bench_scale_runs_kdrun_cold_and_warm_per_size(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kdrun.bench", "--scale", "400,800", "--steps", "2",
                        "--scale-dir", str(tmp_path / "scale")], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    for word in ("400 passages", "800 passages", "cold: peak RSS", "warm: peak RSS", "first step at",
                 "peak_rss_mb (warm) ~ size^", "kdrun cache per passage"):
        assert word in r.stdout, r.stdout
    rows = json.loads((tmp_path / "scale" / "scale.json").read_text())
    assert [r["passages"] for r in rows] == [400, 800]
    assert all(r["warm"]["first_step_seconds"] > 0 and r["warm"]["peak_rss_mb"] > 0 for r in rows)
    assert rows[1]["triples"] > rows[0]["triples"] > 0
