"""Causal-LM data from your own files, folders and saved `datasets` (kdrun/data/lm.py, sources.py): every layout
(text, prompt/completion, chat messages) and what a bad file, folder, column or row says (file and line, or row)."""
import json

import pytest

from kdrun.errors import DataError
from support import CHATS, chats as _chats


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _lm_load(path, **kw):
    from kdrun.data.lm import load

    args = dict(name=None, path=path, format="auto", text_field="text", train_split="train", eval_split=None,
                eval_fraction=0.3, split_salt="s", seed=1, block_size=16, max_length=64, max_train=None,
                max_eval=None, max_train_blocks=None, max_eval_blocks=None)
    return load(**{**args, **kw})


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
