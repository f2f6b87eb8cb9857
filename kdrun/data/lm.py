"""Causal-LM data from a user's file, a save_to_disk folder or a hub dataset (`data=lm`; sources.py reads them), in
the three layouts TRL's trainers take:

    text               {"text": "..."}                               documents, packed into blocks (as fortunes_lm)
    prompt_completion  {"prompt": "...", "completion": "..."}        loss on the completion (and EOS) only
                       {"prompt": [messages], "completion": [messages]}   conversational: the chat template renders
    messages           {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
                                                                     loss on the assistant's turns only

`format=auto` picks the layout from the columns. Rows are split into training and held-out by a hash of the row
(or data.eval_split); the task tokenises them (kdrun/tasks/causal_lm/task.py: `encode_chat`)."""
from __future__ import annotations

import json
from typing import Dict, List, Optional

from kdrun.data import sources
from kdrun.data.ranking import hash_split
from kdrun.data.text import CorpusData
from kdrun.errors import DataError

FORMATS = ("auto", "text", "prompt_completion", "messages")


def detect(columns: List[str], text_field: str, where: str) -> str:
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt_completion"
    if text_field in columns:
        return "text"
    raise DataError(f"{where}: cannot tell the layout from the columns {columns}: give a 'messages' column (chat), "
                    f"'prompt' and 'completion', or the text column (data.text_field={text_field}); or set data.format")


def _messages(value, where: str, column: str) -> List[Dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {column!r} must be a non-empty list of {{'role', 'content'}} messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {column}[{j}] must be a message {{'role': str, 'content': str}}, got "
                            f"{json.dumps(m, default=str)[:80]}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def record(row: dict, fmt: str, where: str) -> dict:
    """One conversation of a prompt_completion or messages row, checked."""
    if fmt == "messages":
        msgs = _messages(row.get("messages"), where, "messages")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            raise DataError(f"{where}: no assistant message with content: nothing to train on")
        return {"messages": msgs, "train_from": 0}
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):  # conversational prompt/completion
        p, c = _messages(prompt, where, "prompt"), _messages(completion, where, "completion")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in c):
            raise DataError(f"{where}: the completion has no assistant message with content")
        return {"messages": p + c, "train_from": len(p)}
    return {"prompt": sources.text_value(prompt, where, "prompt"),
            "completion": sources.text_value(completion, where, "completion")}


def load(*, name: Optional[str], path: Optional[str], format: str, text_field: str, train_split: str,
         eval_split: Optional[str], eval_fraction: float, split_salt: str, seed: int, block_size: int, max_length: int,
         max_train: Optional[int], max_eval: Optional[int], max_train_blocks: Optional[int],
         max_eval_blocks: Optional[int]) -> CorpusData:
    if format not in FORMATS:
        raise DataError(f"data.format={format}: choose one of {list(FORMATS)}")
    ds, where = sources.open_source(name, path)
    train = sources.split(ds, train_split, where, "train_split")
    fmt = detect(train.column_names, text_field, where) if format == "auto" else format
    needed = {"text": [text_field], "prompt_completion": ["prompt", "completion"], "messages": ["messages"]}[fmt]

    def rows(split_name: str) -> list:
        part = sources.split(ds, split_name, where, "train_split" if split_name == train_split else "eval_split")
        missing = [c for c in needed if c not in part.column_names]
        if missing:
            raise DataError(f"{where} ({split_name}): data.format={fmt} needs the column(s) {missing}; it has "
                            f"{part.column_names}")
        out = []
        for i, row in enumerate(part.select_columns(needed)):
            at = sources.row_where(where, split_name, i)
            out.append(sources.text_value(row[text_field], at, text_field) if fmt == "text" else record(row, fmt, at))
        return out

    key = (lambda r: r) if fmt == "text" else (lambda r: json.dumps(r, sort_keys=True))
    if eval_split:
        kept, held = rows(train_split), rows(eval_split)
    else:
        kept, held = hash_split(rows(train_split), split_salt, eval_fraction, text=key)
    kept, held = kept[:max_train or None], held[:max_eval or None]
    if not kept or not held:
        raise DataError(f"{where}: {len(kept)} training and {len(held)} held-out rows after the split; both must be "
                        "non-empty (check data.eval_fraction, data.eval_split and the caps)")
    stats = {"train_rows": len(kept), "eval_rows": len(held), "format_" + fmt: 1.0}
    source = f"{where} ({fmt})"
    if fmt == "text":
        return CorpusData(kept, held, block_size, max_train_blocks, max_eval_blocks, source=source, stats=stats)
    return CorpusData([], [], block_size, source=source, stats=stats, train_chats=kept, eval_chats=held,
                      max_length=max_length)
