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

from kdrun.config import package_dir
from kdrun.data import ranking
from kdrun.errors import DataError

log = logging.getLogger(__name__)


def read_pairs(directory: Path) -> Tuple[List[Tuple[str, str]], int]:
    """(pairs, skipped entries) from every *.yml file of a chatterbot-corpus language folder."""
    files = sorted(directory.glob("*.yml"))
    if not files:
        raise DataError(f"{directory}: no *.yml files (is data.language a chatterbot-corpus language?)")
    pairs, skipped = [], 0
    for f in files:
        try:
            doc = yaml.safe_load(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise DataError(f"{f}: cannot read as YAML: {e}") from e
        convs = doc.get("conversations") if isinstance(doc, dict) else None
        if not isinstance(convs, list):
            raise DataError(f"{f}: expected a mapping with a 'conversations' list")
        for conv in convs:
            if not isinstance(conv, list) or len(conv) < 2:
                skipped += 1
                continue
            turns = [str(t).strip() for t in conv]
            pairs += [(a, b) for a, b in zip(turns, turns[1:]) if a and b]
    return pairs, skipped


def load(*, language: str, eval_fraction: float, split_salt: str, negatives_per_query: int, examples_per_pair: int,
         mine_depth: int, eval_candidates: int, max_train_queries: Optional[int], max_eval_queries: Optional[int],
         seed: int) -> ranking.RankingData:
    directory = Path(package_dir("chatterbot_corpus", "data")) / language
    if not directory.is_dir():
        langs = sorted(p.name for p in directory.parent.iterdir() if p.is_dir())
        raise DataError(f"data.language={language}: chatterbot-corpus has no such language; choose one of {langs}")
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
