"""kdrun-bench (kdrun/bench/): every contender side by side and the scale runs, end to end (figures are not tested:
they are the script's output, not its correctness); the FLOPs it counts; an unknown case in one line."""
import json
import subprocess
import sys

import pytest


@pytest.mark.slow(seconds=55)  # four trainers on all-MiniLM-L6-v2 in a process of their own, as `kdrun-bench` runs them
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


@pytest.mark.slow(seconds=75)  # kdrun cold and warm per size, each a process of its own, as `kdrun-bench --scale` runs them
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
