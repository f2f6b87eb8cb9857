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


@pytest.mark.parametrize("arch,query_length", [("bi_encoder", 0), ("late_interaction", 0), ("late_interaction", 12)])
def test_one_embedding_lookup_for_all_length_groups_gives_the_same_scores_and_gradients(teacher, arch, query_length,
                                                                                      monkeypatch):
    """Length groups share one word-embedding lookup (one dense embedding gradient instead of one per group)."""
    from conftest import f32_close

    from kdrun.data.tokens import pretokenize
    from kdrun.models import encoders

    student = build_student(**{**STUDENT, "arch": arch, "query_length": query_length}, layers=[0, 1], teacher=teacher)
    student.eval()  # no dropout: both ways see the same network
    queries = ["what is a cat", "how tall is the tallest mountain on earth today", "why"]
    passages = [["a cat is a small animal", "mountains are tall and some of them are very very tall indeed"],
                ["everest is 8849 metres", "no"], ["because it is what it is, and always was", "yes"]]
    student.token_table, _ = pretokenize(student.tokenizer, queries + [p for ps in passages for p in ps], 64, None, "t")
    student.max_groups = 3
    features = student.featurize(queries, passages)
    groups = len(features["query"]["groups"]) + len(features["passage"]["groups"])
    assert len(features["passage"]["groups"]) >= 2 and groups >= 4

    def run():
        student.zero_grad()
        scores = student(features)["scores"]
        scores.square().sum().backward()
        return scores.detach(), [p.grad.clone() for p in student.parameters() if p.grad is not None]

    calls = []
    table = student.encoder.get_input_embeddings()
    hook = table.register_forward_hook(lambda *a: calls.append(1))
    shared, shared_grads = run()
    assert len(calls) == 2  # one lookup per text column (queries, passages)
    calls.clear()
    monkeypatch.setattr(encoders, "one_lookup", lambda encoder, features: features)
    per_group, grads = run()
    assert len(calls) == groups
    hook.remove()
    assert f32_close(shared, per_group)
    assert len(shared_grads) == len(grads) and all(f32_close(a, b) for a, b in zip(shared_grads, grads))


def test_a_colbert_projection_starts_from_the_principal_directions_of_its_token_states(teacher):
    """student.projection_init=pca: the projection's rows are orthonormal principal directions of the encoder's
    token states on the texts, the same whatever the seed; its MaxSim scores follow the full-width token vectors'
    more closely than a random projection's; rows beyond the states' rank start at zero."""
    from kdrun.models.encoders import maxsim

    texts = ["what is a cat", "a cat is a small furry animal that purrs", "how tall is mount everest",
             "everest is 8849 metres high, the tallest mountain on earth", "why is the sky blue",
             "sunlight is scattered by the air, blue light the most", "who wrote hamlet",
             "shakespeare wrote hamlet around 1600", "def add(a, b): return a + b", "adds two numbers"] * 2

    def colbert(seed, dim=16, init="pca"):
        torch.manual_seed(seed)
        return build_student(**{**STUDENT, "arch": "late_interaction", "dim": dim, "projection_init": init},
                             layers=[0, 5], teacher=teacher).eval()

    a, b = colbert(1), colbert(2)
    assert a.projection_init == "pca" and not torch.equal(a.linear.weight, b.linear.weight)  # random until fitted
    kept = a.init_projection(texts)["student/projection_variance_kept"]
    b.init_projection(texts)
    assert 0.3 < kept < 1.0 and a.projection_init == "pca_done"
    assert torch.equal(a.linear.weight, b.linear.weight)  # no seed in it
    w = a.linear.weight.double()
    assert torch.allclose(w @ w.T, torch.eye(16, dtype=torch.float64), atol=1e-5)

    feats = {k: v for k, v in a.tokenize(texts[:10]).items()}
    with torch.no_grad():
        full = torch.nn.functional.normalize(a.encoder(**feats).last_hidden_state.float(), dim=-1)
        mask = feats["attention_mask"]
        target = maxsim(full, mask, full, mask)
        errors = {}
        for name, model in (("pca", a), ("random", colbert(3, init="random"))):
            v = model._vectors(feats)
            errors[name] = (maxsim(v, mask, v, mask) - target).abs().mean().item()
    assert errors["pca"] < 0.5 * errors["random"], errors

    wide = colbert(1, dim=400)  # more than MiniLM's 384 dimensions
    wide.init_projection(texts)
    assert torch.equal(wide.linear.weight[384:], torch.zeros(16, 384)) and wide.linear.weight[:384].norm() > 0


def test_colbert_query_expansion_scores_mask_tokens_the_same_in_training_evaluation_and_sentence_transformers(
        teacher, tmp_path):
    """student.query_length: short queries padded with [MASK] tokens that are scored but not attended to (ColBERT's
    query augmentation); the same scores from the training forward, kdrun's evaluation, a reloaded student and
    sentence-transformers' MultiVectorEncoder over the saved folder (its query_expansion, strategy "min")."""
    from sentence_transformers import MultiVectorEncoder

    from kdrun.models.encoders import load_scorer, maxsim

    torch.manual_seed(0)
    colbert = build_student(**{**STUDENT, "arch": "late_interaction", "dim": 32, "query_length": 16},
                            layers=[0, 5], teacher=teacher).eval()
    long_query = "a question long enough to fill all of the sixteen query positions with words of its own, and more"
    queries = ["what is a cat", long_query]
    passages = [["a cat is a small furry animal", "everest is 8849 metres high"],
                ["the sky is blue because air scatters blue light", "hamlet was written by shakespeare"]]
    feats = colbert.tokenize(queries)
    n_real = feats["attention_mask"].sum(1)
    assert n_real[0] < 16 < n_real[1]
    expanded, score_mask = colbert.expand_query(feats)
    ids, att = expanded["input_ids"], expanded["attention_mask"]
    assert score_mask[0].sum() == 16 and score_mask[1].sum() == n_real[1]  # a long query is not cut, nor expanded
    assert torch.equal(att, torch.nn.functional.pad(feats["attention_mask"], (0, ids.shape[1] - att.shape[1])))
    assert (ids[0, n_real[0]:16] == colbert.tokenizer.mask_token_id).all()
    assert not (ids[1] == colbert.tokenizer.mask_token_id).any()
    with torch.no_grad():
        trained = colbert(colbert.featurize(queries, passages))["scores"]
        evaluated = torch.stack(colbert.score_lists(queries, passages, 4, "cpu"))
        # the real tokens' vectors are those of the query alone (the encoder attends to no [MASK]), the masks add
        q, _ = colbert.vectors(feats, query=True)
        plain = colbert._vectors(feats)
        real = feats["attention_mask"].bool()
        assert torch.allclose(q[:, :plain.shape[1]][real], plain[real], atol=1e-5)
        p = colbert._vectors(colbert.tokenize(passages[0]))
        p_mask = colbert.tokenize(passages[0])["attention_mask"]
        without = maxsim(plain[:1], feats["attention_mask"][:1], p, p_mask)[0]
        assert (trained[0] > without).all()  # sixteen scored vectors instead of the query's own
        colbert.save(tmp_path)
        reloaded = torch.stack(load_scorer(tmp_path).score_lists(queries, passages, 4, "cpu"))
    assert torch.allclose(trained, evaluated, rtol=1e-4, atol=1e-4)
    assert torch.allclose(reloaded, evaluated, rtol=1e-5, atol=1e-5)
    mv = MultiVectorEncoder(str(tmp_path), device="cpu", local_files_only=True)
    documents = mv.encode_document([t for ts in passages for t in ts])
    sim = torch.as_tensor(mv.similarity(mv.encode_query(queries), documents))
    assert torch.allclose(torch.stack([sim[0, :2], sim[1, 2:]]).float(), evaluated, rtol=1e-4, atol=1e-4)


def test_a_colbert_student_started_from_a_saved_kdrun_colbert_keeps_its_trained_projection(teacher, tmp_path):
    """student.path=DIR of a saved ColBERT: the projection comes from its colbert_linear.safetensors (it was once
    drawn anew, so the continued student started from a different model than the one saved)."""
    torch.manual_seed(0)
    saved = build_student(**{**STUDENT, "arch": "late_interaction", "dim": 32}, layers=[0, 5], teacher=teacher)
    with torch.no_grad():
        saved.linear.weight.mul_(3.0)  # unlike any fresh draw or PCA start
    saved.save(tmp_path)
    again = {**STUDENT, "arch": "late_interaction", "dim": 32, "init": "pretrained", "path": str(tmp_path)}
    torch.manual_seed(1)
    loaded = build_student(**again, layers=None, teacher=teacher)
    assert torch.equal(loaded.linear.weight, saved.linear.weight) and loaded.projection_init == "loaded"
    sliced = build_student(**{**again, "init": "teacher_layers"}, layers=[0], teacher=teacher)  # other states: new
    assert sliced.projection_init != "loaded"
    with pytest.raises(ConfigError, match=r"student.dim=64: .* projects to 32 .* set student.dim=32"):
        build_student(**{**again, "dim": 64}, layers=None, teacher=teacher)


def test_the_evaluation_cache_tells_colbert_students_apart_by_query_length(teacher):
    """An unchanged student's evaluation is read from the cache by a key of its settings and weights: the same
    weights scored with and without query expansion are two evaluations (a sweep over query_length once read the
    other's)."""
    from types import SimpleNamespace

    from kdrun import eval_cache
    from kdrun.runtime import make_runtime

    task = SimpleNamespace(name="ranking", eval_digest=lambda: "held-out")
    colbert = build_student(**{**STUDENT, "arch": "late_interaction", "dim": 32}, layers=[0], teacher=teacher)
    rt = make_runtime("cpu", "fp32")
    keys = []
    for length in (0, 32, 0):
        colbert.query_length = length
        keys.append(eval_cache.key_of(task, colbert, rt, 32))
    assert keys[0] == keys[2] != keys[1]
