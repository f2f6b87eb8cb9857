"""Score files (kdrun/data/scores_file.py): the teacher's scores of every training triple written in the Margin-MSE
authors' format and joined back by ids, exactly; missing ids counted and refused above a limit; a malformed line or a
missing file named with the fix."""
import json
import os
import shutil
from functools import partial

import numpy as np
import pytest
import torch

from kdrun import teacher_cache
from kdrun.data import scores_file
from kdrun.data.ranking import RankingData, text_id
from kdrun.errors import ConfigError, DataError
from kdrun.losses import WeightedLoss, Context
from kdrun.models import load_teacher
from kdrun.tasks import build_student as family_student
from kdrun.models.ensemble import Ensemble, combine
from kdrun.runtime import make_runtime
from kdrun.tasks.ranking import RankingTask
from support import f32_close


TEACHER = dict(name=None, gguf_file=None, pooling="mean", similarity="cos", label_index=-1, max_length=64, top_k=0)


build_student = partial(family_student, task="ranking")  # as the ranking family builds it


STUDENT = dict(name=None, path=None, init="teacher_layers", layers=[0, 5], pooling="mean", similarity="dot",
               max_length=64, scratch={}, tokenizer=None, dim=16)


QUERIES = ["what is your name", "how old are you", "do you like music", "what is the weather like today",
           "tell me a joke", "where do you live"]


PASSAGES = [["my name is bot", "it rains a lot here", "i am a computer program"],
            ["i was made last year", "i like jazz", "ask me later"],
            ["yes, especially jazz and some rock", "no", "my name is bot"],
            ["sunny with a light breeze and twenty degrees", "i live in the cloud", "ha ha"],
            ["why did the chicken cross the road? to get to the other side", "no", "sunny"],
            ["in the cloud, on many servers", "i like jazz", "i was made last year"]]


@pytest.fixture(scope="module")
def teacher(tiny_bert):
    return load_teacher(path=tiny_bert, kind="bi_encoder", **TEACHER)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):  # score files are converted under kdrun's cache
    monkeypatch.setenv("KDRUN_CACHE", str(tmp_path / "kdrun_cache"))


def _data(train=None):
    train = train or list(zip(QUERIES, PASSAGES))
    return RankingData(train, QUERIES[:2], [PASSAGES[0], PASSAGES[1]], [[1, 0, 0], [1, 0, 0]], "test")


def _task(teacher, data=None):
    return RankingTask(data or _data(), teacher, None, make_runtime("cpu", "fp32"), eval_batch_size=4)


def test_score_file_round_trip_is_exact_and_joins_by_ids(teacher, tmp_path):
    data = _data()
    scores = _task(teacher).teacher_outputs(teacher)["scores"]
    f = tmp_path / "scores.tsv"
    lines = scores_file.write(str(f), data, scores)
    assert lines == 6 * 2  # one line per (query, positive, negative)
    first = f.read_text().splitlines()[0].split("\t")
    assert first[2:] == [text_id(QUERIES[0]), text_id(PASSAGES[0][0]), text_id(PASSAGES[0][1])]
    before = list(data.train)
    joined, missing = scores_file.join(data, str(f), 0.0)
    assert missing == 0 and data.train == before and torch.equal(joined, scores)


def test_score_file_missing_ids_are_counted_and_fail_above_the_limit(teacher, tmp_path):
    data = _data()
    f = tmp_path / "scores.tsv"
    scores_file.write(str(f), _data(data.train[:4]), torch.rand(4, 3))
    with pytest.raises(DataError, match=r"2 of 6 training examples \(33.3%\).*max_missing_fraction=0.2"):
        scores_file.join(data, str(f), 0.2)
    _, missing = scores_file.join(data, str(f), 0.5)
    assert missing == 2 and len(data.train) == 4


@pytest.mark.parametrize("line,match", [
    ("1.0\t2.0\tq1\tp1\n", r"scores.tsv:2: expected 5 tab-separated columns"),
    ("high\t2.0\tq1\tp1\tp2\n", r"scores.tsv:2: the first two columns must be numbers"),
    ("nan\t2.0\tq1\tp1\tp2\n", r"scores.tsv:2: scores must be finite"),
])
def test_malformed_score_file_lines_name_file_and_line(tmp_path, line, match):
    f = tmp_path / "scores.tsv"
    f.write_text("1.5\t0.5\tq0\tp0\tp1\n" + line)
    with pytest.raises(DataError, match=match):
        scores_file.join(_data(), str(f), 0.0)


def test_missing_score_file_says_how_to_write_one(tmp_path):
    with pytest.raises(DataError, match="no such file.*kdrun mode=score"):
        scores_file.join(_data(), str(tmp_path / "nope.tsv"), 0.0)
