"""Causal-LM runs in this process on the tiny Llama (experiment=smoke_causal_lm: SmolLM2's tokenizer and depth at
width 32): every causal-LM loss yaml trains 2 steps (each composed and run by pipeline.run); through the real `kdrun`
entry point, a top-k teacher online and precomputed trains alike and its registered model gives the run's perplexity,
and chat data trains on and off the student's own samples. The demo's quality on the real SmolLM2: the slow test at
the end."""
import math

import pytest

from support import (LM, chats, check_run, compose, every_loss, history, kdrun, losses_for, offline_env, ok, only_run,
                     values)

LM_LOSSES = losses_for("causal_lm")


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory, kdrun_cache):
    tmp = tmp_path_factory.mktemp("lm")
    return every_loss(tmp, kdrun_cache, "lm", [*LM, "train.log_every=1"], LM_LOSSES)


@pytest.mark.parametrize("loss", LM_LOSSES)
def test_causal_lm_loss_trains_through_kdrun(lm_runs, loss):
    c, run = check_run(lm_runs, loss, ["perplexity"], student_only=["top1_agreement", "kl_to_teacher"])
    assert run.data.tags["kdrun.task"] == "causal_lm"
    # (a random tiny teacher is no better than its slice: that the teacher is ahead is the demo test's, below)
    for who in ("student", "teacher"):
        m = run.data.metrics
        assert m[f"eval/{who}/perplexity"] == pytest.approx(math.exp(m[f"eval/{who}/nll"]), rel=1e-6)


def test_causal_lm_topk_teacher_online_and_precomputed_and_a_loadable_save(tmp_path, kdrun_cache):
    env = offline_env(tmp_path, kdrun_cache)
    for mode, save in (("online", "false"), ("precompute", "true")):
        ok(kdrun([*LM, "teacher.top_k=16", f"teacher.mode={mode}", "loss=jsd", "train.log_every=1",
                  f"tracking.log_student={save}", f"tracking.experiment=lm_{mode}", f"hydra.run.dir={tmp_path / mode}",
                  *(["tracking.register_as=kd-lm"] if save == "true" else [])], tmp_path, env))
    found = {m: only_run(tmp_path, f"lm_{m}") for m in ("online", "precompute")}
    assert found["online"][1].data.params["teacher.top_k"] == "16"
    # the same blocks, the same sparse teacher, the same seed: the first step's loss agrees
    first = {m: values(c, run, "train/jsd")[0] for m, (c, run) in found.items()}
    assert first["online"] == pytest.approx(first["precompute"], rel=1e-4)
    from transformers import AutoModelForCausalLM

    c, run = found["precompute"]
    local = c.download_artifacts(run.info.run_id, "student", str(tmp_path / "dl"))
    assert AutoModelForCausalLM.from_pretrained(local).config.num_hidden_layers == 2

    # the registered logged model (transformers flavor, text-generation): its held-out perplexity is the run's
    import mlflow
    import torch

    from kdrun import pipeline
    from kdrun.tasks.causal_lm.task import pack

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    info = mlflow.models.get_model_info("models:/kd-lm/1")
    assert "transformers" in info.flavors and info.signature is not None
    parts = mlflow.transformers.load_model("models:/kd-lm/1", return_type="components")
    assert parts["task"] == "text-generation"
    _, data = pipeline.load_data(compose([a for a in LM if a.startswith(("experiment=", "data."))]))
    blocks = pack(data.eval_texts, parts["tokenizer"], data.block_size, data.max_eval_blocks)
    with torch.inference_mode():
        logits = parts["model"](input_ids=blocks).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)).item()
    assert math.exp(nll) == pytest.approx(run.data.metrics["eval/student/perplexity"], rel=1e-4)


def test_causal_lm_student_with_another_tokenizer_is_a_config_error(tmp_path, kdrun_cache, tiny_bert):
    r = kdrun([*LM, "student.init=pretrained", f"student.path={tiny_bert}", f"hydra.run.dir={tmp_path / 'o'}"],
              tmp_path, offline_env(tmp_path, kdrun_cache))
    assert r.returncode == 2
    assert "different tokenizers" in r.stderr and "Traceback" not in r.stderr


# ---- your own chat and prompt/completion data, on and off the student's own samples ----

OWN = ["experiment=smoke_causal_lm", "data=lm", "data.max_length=48", "train.batch_size=2", "train.max_steps=2",
       "train.log_every=1", "train.on_policy.max_new_tokens=8", "train.on_policy.eval_samples=2",
       "tracking.log_student=false", "train.eval_batch_size=16"]


def _source(tmp_path, kind, rows):
    import json

    if kind == "jsonl":
        path = tmp_path / "rows.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        return str(path)
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    return str(tmp_path / "saved")


def test_causal_lm_trains_on_chat_data_and_on_the_students_own_samples(tmp_path, kdrun_cache):
    """Chat messages from a jsonl file, on-policy (λ=1: every row is the student's own sample; λ=0 leaving the batch
    as it is, is test_lambda_zero_leaves_the_batch_and_the_random_state_alone): the generation is logged apart, and
    every evaluation logs the KL to the teacher on held-out data and on the student's own samples."""
    path = _source(tmp_path, "jsonl", [{"messages": c} for c in chats(24)])
    ok(kdrun([*OWN, f"data.path={path}", "train.on_policy.fraction=1", "tracking.experiment=lm_on",
              f"hydra.run.dir={tmp_path / 'out'}"], tmp_path, offline_env(tmp_path, kdrun_cache)))
    c, on = only_run(tmp_path, "lm_on")
    assert on.info.status == "FINISHED"
    assert on.data.params["data/format_messages"] == "1" and on.data.params["train.on_policy.max_new_tokens"] == "8"
    assert {"eval/student/kl_to_teacher", "eval/student/kl_to_teacher_on_samples"} <= set(on.data.metrics)
    assert on.data.metrics["train/generate_seconds"] > 0 and on.data.metrics["train/generated_tokens_per_s"] > 0
    assert on.data.metrics["train/on_policy_share"] == 1.0
    from kdrun import summary  # the sweep summary's teacher-gap plot (an LM sweep's summary/teacher_gap.png)

    files = summary.write_report(c, [on], tmp_path / "report")
    assert files["teacher_gap.png"].stat().st_size > 10_000
    steps = [s for s, _ in history(c, on, "eval/student/kl_to_teacher_on_samples")]
    assert steps == [0, 2]  # before training and at the end


def test_causal_lm_trains_on_prompt_completion_pairs_from_a_datasets_folder(tmp_path, kdrun_cache):
    rows = [{"prompt": f"Question {i}: what do cats drink?\nAnswer:", "completion": f" Milk, {i} times a day."}
            for i in range(24)]
    ok(kdrun([*OWN, f"data.path={_source(tmp_path, 'folder', rows)}", "train.on_policy.eval_samples=0",
              "tracking.experiment=lm_folder", f"hydra.run.dir={tmp_path / 'out'}"], tmp_path,
             offline_env(tmp_path, kdrun_cache)))
    _, run = only_run(tmp_path, "lm_folder")
    assert run.info.status == "FINISHED"
    assert run.data.params["data/format_prompt_completion"] == "1"
    assert "train/generate_seconds" not in run.data.metrics  # off-policy (λ=0, the default)
    assert float(run.data.params["data/trained_tokens"]) < float(run.data.params["data/train_tokens"]) / 2


# ---- the demo, on the real SmolLM2 ----

@pytest.mark.slow(seconds=110)
def test_causal_lm_demo_distils_a_better_student(tmp_path, kdrun_cache):
    """`kdrun experiment=causal_lm_demo` on SmolLM2-135M, on a quarter of its budget (20 steps, 8 held-out blocks):
    the 8-layer slice's perplexity and KL to the teacher fall by orders of magnitude and its top-1 agreement with the
    teacher rises (at 20 steps: perplexity 5.6e8 -> 6.5e3, KL 16.6 -> 4.2, agreement 0 -> 0.157; AMD EPYC, 2 cores).
    Over 60 s (a real 135M teacher): the one test of the causal-LM demo's promise, which a tiny model cannot show."""
    ok(kdrun(["experiment=causal_lm_demo", "train.max_steps=20", "data.max_eval_blocks=8",
              "tracking.log_student=false",  # (18 s: a causal LM's logged model is checked on the tiny model)
              "train.on_policy.eval_samples=0",  # (9 s of sampling for a metric not checked here)
              f"hydra.run.dir={tmp_path / 'out'}"], tmp_path, offline_env(tmp_path, kdrun_cache)))
    c, run = only_run(tmp_path, "causal_lm_demo")
    ppl, kl = values(c, run, "eval/student/perplexity"), values(c, run, "eval/student/kl_to_teacher")
    agree = values(c, run, "eval/student/top1_agreement")
    assert ppl[-1] < ppl[0] / 1000, ppl
    assert kl[-1] < kl[0] / 2, kl
    assert agree[-1] > agree[0] + 0.1, agree
    assert run.data.metrics["eval/teacher/perplexity"] < ppl[-1]
