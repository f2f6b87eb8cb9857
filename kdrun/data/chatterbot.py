"""Question/answer pairs from the chatterbot-corpus PyPI package (BSD-3-Clause, (c) Gunther Cox).

Each YAML file under chatterbot_corpus/data/<language>/ has `conversations`: lists of utterances,
each one a reply to the one before. Every consecutive (utterance, reply) is a (query, relevant
passage) pair. The English files hold 2,306 such pairs, 1,015 distinct queries and 1,137 distinct
answers (chatterbot-corpus 1.3.3). Entries that are not lists (one in trivia.yml) are skipped and counted.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional, Tuple

import yaml

from kdrun.names import package_dir
from kdrun.data import ranking
from kdrun.errors import DataError

log = logging.getLogger(__name__)
# libyaml's parser where PyYAML was built with it (the wheels are): the same documents, ~15x faster than the pure-Python
# one (the English files: 1.2 s -> 0.08 s, measured), a second of every run on the default data
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def conversations(directory: Path) -> Tuple[List[List[str]], int]:
    """(conversations as lists of stripped turns, skipped entries) from every *.yml file of a chatterbot-corpus
    language folder."""
    files = sorted(directory.glob("*.yml"))
    if not files:
        raise DataError(f"{directory}: no *.yml files (is data.language a chatterbot-corpus language?)")
    convs_out, skipped = [], 0
    for f in files:
        try:
            doc = yaml.load(f.read_text(encoding="utf-8"), Loader=_LOADER)  # noqa: S506 - a safe loader
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise DataError(f"{f}: cannot read as YAML: {e}") from e
        convs = doc.get("conversations") if isinstance(doc, dict) else None
        if not isinstance(convs, list):
            raise DataError(f"{f}: expected a mapping with a 'conversations' list")
        for conv in convs:
            if not isinstance(conv, list) or len(conv) < 2:
                skipped += 1
                continue
            convs_out.append([str(t).strip() for t in conv])
    return convs_out, skipped


def read_pairs(directory: Path) -> Tuple[List[Tuple[str, str]], int]:
    """(pairs, skipped entries): every consecutive (utterance, reply) of every conversation."""
    convs, skipped = conversations(directory)
    return [(a, b) for turns in convs for a, b in zip(turns, turns[1:]) if a and b], skipped


def load(*, language: str, eval_fraction: float, split_salt: str, negatives_per_query: int, examples_per_pair: int,
         mine_depth: int, eval_candidates: int, max_train_queries: Optional[int], max_eval_queries: Optional[int],
         seed: int) -> ranking.RankingData:
    directory = _language_dir(language)
    pairs, skipped = read_pairs(directory)
    if skipped:
        log.info("chatterbot-corpus/%s: skipped %d entries that are not conversations", language, skipped)
    data = ranking.build(pairs, eval_fraction=eval_fraction, split_salt=split_salt,
                         negatives_per_query=negatives_per_query, examples_per_pair=examples_per_pair,
                         mine_depth=mine_depth, eval_candidates=eval_candidates,
                         max_train_queries=max_train_queries, max_eval_queries=max_eval_queries,
                         seed=seed, source=f"chatterbot-corpus/{language}")
    data.stats["skipped_entries"] = skipped
    return data


def chat_file(language: str) -> Path:
    """Every conversation of the language as a chat-data file (JSON lines, one {"messages": [...]} each: the turns
    alternate user / assistant), written once under kdrun's cache: the file `data=chatterbot_chat` trains on, in
    the layout a user's own chat data has (kdrun/data/lm.py)."""
    import hashlib
    import json

    from kdrun.store import cache_root, cached, publish, staging_dir

    directory = _language_dir(language)
    files = sorted(directory.glob("*.yml"))
    digest = hashlib.sha256(b"chat-v1" + b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
    out = cache_root() / "data" / "chatterbot_chat" / f"{language}-{digest}"
    if not cached(out):
        lines = [json.dumps({"messages": [{"role": ("user", "assistant")[i % 2], "content": t}
                                          for i, t in enumerate(turns)]})
                 for turns in conversations(directory)[0] if all(turns)]
        stage = staging_dir(out)
        stage.mkdir(parents=True, exist_ok=True)
        (stage / "chats.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        publish(stage, out, f"chatterbot-corpus/{language} as chat data\n")
    return out / "chats.jsonl"


def load_chat(*, language: str, name=None, path=None, format: str = "messages", **settings):
    """chatterbot-corpus conversations as causal-LM chat data (the loss on the assistant's turns), read through the
    same loader as a user's chat file (`data=lm data.path=chats.jsonl`)."""
    from kdrun.data import lm

    if name or path:
        raise DataError("data=chatterbot_chat reads chatterbot-corpus; for your own file use data=lm data.path=FILE")
    return lm.load(name=None, path=str(chat_file(language)), format="messages", **settings)


def _language_dir(language: str) -> Path:
    directory = Path(package_dir("chatterbot_corpus", "data")) / language
    if not directory.is_dir():
        langs = sorted(p.name for p in directory.parent.iterdir() if p.is_dir())
        raise DataError(f"data.language={language}: chatterbot-corpus has no such language; choose one of {langs}")
    return directory
