"""Several teachers (kdrun/models/ensemble.py): their outputs averaged with their weights, each one's own kept for
a loss term that names it."""
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


def test_several_teachers_average_with_weights_and_a_term_can_name_one(teacher, tiny_bert):
    second = load_teacher(path=tiny_bert, kind="bi_encoder", **{**TEACHER, "pooling": "cls", "similarity": "dot"})
    ens = Ensemble({"teacher": teacher, "cls": second}, {"teacher": 1.0, "cls": 3.0})
    out = ens(ens.featurize(QUERIES[:2], PASSAGES[:2]))
    a = teacher(teacher.featurize(QUERIES[:2], PASSAGES[:2]))["scores"]
    b = second(second.featurize(QUERIES[:2], PASSAGES[:2]))["scores"]
    assert f32_close(out["scores"], (a + 3 * b) / 4) and torch.equal(out["scores@cls"], b)
    lists = ens.score_lists(QUERIES[:2], PASSAGES[:2], 4, torch.device("cpu"))
    assert f32_close(torch.stack(lists), (a + 3 * b) / 4)  # other batch shapes: equal to float32 rounding
    student = {"scores": torch.zeros(2, 3)}
    both = WeightedLoss([("margin_mse", 1.0, {"teacher": None}), ("pointwise_mse", 1.0, {"teacher": "cls"})],
                        Context(task="ranking"))(student, out, {})
    from kdrun.losses import functional as F

    assert torch.allclose(both["margin_mse"], F.margin_mse(student["scores"], out["scores"]))
    assert torch.allclose(both["pointwise_mse"], F.pointwise_mse(student["scores"], b))
    assert combine({"teacher": {"logits": torch.ones(2, 4)}}, {"teacher": 2.0})["logits"].eq(1).all()
