"""Loading models (kdrun/models/): a frozen teacher that ranks as all-MiniLM-L6-v2 does, a student cut from the
teacher's layers with its own copy of them, saved students that plain transformers loads, and one clear error for a
bad path or a model the hub cannot give."""
from functools import partial

import pytest
import torch

from kdrun.errors import ConfigError, ModelLoadError
from kdrun.models import load_teacher
from kdrun.tasks import build_student as family_student
from kdrun.models.hub import resolve_source



build_student = partial(family_student, task="ranking")  # as the ranking family builds it


STUDENT = dict(name=None, path=None, init="teacher_layers", pooling="mean", similarity="dot", max_length=64,
               scratch={}, tokenizer=None, arch="bi_encoder", dim=128)


TEACHER = dict(name=None, gguf_file=None, pooling="mean", similarity="cos", label_index=-1, max_length=64, top_k=0)


@pytest.fixture(scope="module")
def teacher(minilm_dir):
    return load_teacher(path=minilm_dir, kind="bi_encoder", **TEACHER)


def test_teacher_is_frozen_and_in_eval_mode(teacher):
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())


def test_student_keeps_embeddings_and_the_listed_teacher_layers(teacher, minilm_dir):
    student = build_student(**STUDENT, layers=[0, 5], teacher=teacher)
    t_layers, s_layers = teacher.encoder.encoder.layer, student.encoder.encoder.layer
    assert len(s_layers) == 2 and student.encoder.config.num_hidden_layers == 2
    for s_idx, t_idx in [(0, 0), (1, 5)]:
        for a, b in zip(s_layers[s_idx].parameters(), t_layers[t_idx].parameters()):
            assert torch.equal(a, b)
    assert torch.equal(student.encoder.embeddings.word_embeddings.weight,
                       teacher.encoder.embeddings.word_embeddings.weight)
    assert all(p.requires_grad for p in student.parameters())
    # its own copy: training the student cannot touch the teacher
    assert student.encoder.embeddings.word_embeddings.weight.data_ptr() != \
        teacher.encoder.embeddings.word_embeddings.weight.data_ptr()


def test_layer_index_beyond_teacher_depth_is_a_config_error(teacher):
    with pytest.raises(ConfigError, match="has 6 layers"):
        build_student(**STUDENT, layers=[0, 6], teacher=teacher)


def test_teacher_scores_rank_the_right_answer_first(teacher):
    feats = teacher.featurize(["What is the capital of France?"],
                              [["Paris is the capital of France.", "Bananas are yellow."]])
    with torch.inference_mode():
        scores = teacher(feats)["scores"]
    assert scores.shape == (1, 2)
    assert scores[0, 0] > scores[0, 1]


def test_saved_student_loads_back_with_plain_transformers(tmp_path, teacher):
    from transformers import AutoModel, AutoTokenizer

    student = build_student(**STUDENT, layers=[0, 5], teacher=teacher).eval()
    student.save(tmp_path)
    model, tok = AutoModel.from_pretrained(tmp_path).eval(), AutoTokenizer.from_pretrained(tmp_path)
    assert model.config.num_hidden_layers == 2
    text = ["a short test sentence"]
    enc = tok(text, return_tensors="pt")
    with torch.inference_mode():
        ours = student.embed({k: v for k, v in enc.items()})
        theirs = model(**enc).last_hidden_state.mean(1)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "1_Pooling" / "config.json").is_file() and (tmp_path / "modules.json").is_file()


def test_bad_local_paths_name_the_key(tmp_path):
    with pytest.raises(ModelLoadError, match=r"teacher.path=.*no such directory"):
        resolve_source("teacher", None, str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_source("student", None, str(tmp_path))


def test_unreachable_hub_names_the_model_and_the_path_fix(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # read per call by kdrun's reachability probe
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read per call: an empty cache
    with pytest.raises(ModelLoadError) as e:
        resolve_source("teacher", "nboost/pt-bert-base-uncased-msmarco", None)
    msg = str(e.value)
    assert "nboost/pt-bert-base-uncased-msmarco" in msg and "not available offline" in msg
    assert "teacher.path=" in msg
    # the download command it recommends is the one the installed huggingface_hub ships (`huggingface-cli` is gone)
    assert "`hf download nboost/pt-bert-base-uncased-msmarco --local-dir DIR`" in msg
    import sys
    from pathlib import Path

    assert Path(sys.executable).with_name("hf").is_file()
