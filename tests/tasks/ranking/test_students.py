"""Ranking students (kdrun/models/encoders.py, the ranking family's builders): bi-encoder, late-interaction (ColBERT)
and cross-encoder students score, train and agree with their evaluation path; MaxSim; ColBERT's projection (from the
principal directions of its token states, kept when a saved ColBERT is continued) and query augmentation; one
embedding lookup for all length groups; scratch students, other tokenizers, and saved students that transformers,
sentence-transformers and kdrun's own scorer load back. On all-MiniLM-L6-v2, whose real token states the projection
and the scores are about."""
from functools import partial

import pytest
import torch

from kdrun.errors import ConfigError
from kdrun.models import load_teacher
from kdrun.tasks import build_student as family_student
from support import PASSAGES, QUERIES, f32_close
from support import STUDENT as ARCH_STUDENT  # (with the layers: an architecture test names no layers)
from kdrun.models.encoders import LateInteraction, load_scorer, maxsim

# the builders' arguments, as the ranking family gives them: layers named per test, or the first and last
STUDENT = dict(name=None, path=None, init="teacher_layers", pooling="mean", similarity="dot", max_length=64,
               scratch={}, tokenizer=None, arch="bi_encoder", dim=128)


build_student = partial(family_student, task="ranking")  # as the ranking family builds it


TEACHER = dict(name=None, gguf_file=None, pooling="mean", similarity="cos", label_index=-1, max_length=64, top_k=0)


@pytest.fixture(scope="module")
def teacher(minilm_dir):
    return load_teacher(path=minilm_dir, kind="bi_encoder", **TEACHER)


@pytest.mark.parametrize("arch,query_length", [("bi_encoder", 0), ("late_interaction", 0), ("late_interaction", 12)])
def test_one_embedding_lookup_for_all_length_groups_gives_the_same_scores_and_gradients(teacher, arch, query_length,
                                                                                      monkeypatch):
    """Length groups share one word-embedding lookup (one dense embedding gradient instead of one per group)."""
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


def test_maxsim_known_values_and_padding_ignored():
    q = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])  # the third query token is padding
    q_mask = torch.tensor([[1, 1, 0]])
    p = torch.tensor([[[0.6, 0.8], [1.0, 0.0], [9.0, 9.0]]])  # the third passage token is padding
    p_mask = torch.tensor([[1, 1, 0]])
    # query token 1: max(0.6, 1.0) = 1.0; query token 2: max(0.8, 0.0) = 0.8
    assert torch.allclose(maxsim(q, q_mask, p, p_mask), torch.tensor([[1.8]]))


@pytest.mark.parametrize("arch", ["bi_encoder", "late_interaction", "cross_encoder"])
def test_every_student_architecture_scores_trains_and_agrees_with_its_eval_path(teacher, arch):
    student = build_student(**ARCH_STUDENT, arch=arch, teacher=teacher)
    scores = student(student.featurize(QUERIES, PASSAGES))["scores"]
    assert scores.shape == (6, 3) and scores.requires_grad
    scores.sum().backward()
    embeddings = student.get_submodule("encoder" if arch != "cross_encoder" else "model").get_input_embeddings()
    assert embeddings.weight.grad is not None and embeddings.weight.grad.abs().sum() > 0
    student.eval()  # no dropout: the training path and the eval path must give the same scores
    student.request({"in_batch_scores"})
    out = student(student.featurize(QUERIES[:3], PASSAGES[:3]))
    assert out["in_batch_scores"].shape == (3, 9)
    own = student(student.featurize(QUERIES[:3], PASSAGES[:3]))["scores"]
    student.request(set())
    with torch.inference_mode():
        lists = torch.stack(student.score_lists(QUERIES, PASSAGES, 4, torch.device("cpu")))
        plain = student(student.featurize(QUERIES, PASSAGES))["scores"]
    assert f32_close(lists, plain) and f32_close(own, plain[:3])  # other batches and padding: float32 rounding


def test_late_interaction_student_has_a_projection_of_the_configured_size(teacher):
    student = build_student(**ARCH_STUDENT, arch="late_interaction", teacher=teacher)
    assert isinstance(student, LateInteraction) and student.linear.weight.shape == (16, 384)
    assert student.linear.weight.requires_grad


def test_scratch_ranking_student_and_a_tokenizer_from_elsewhere(teacher, minilm_dir):
    student = build_student(**{**ARCH_STUDENT, "init": "scratch", "layers": None, "tokenizer": minilm_dir,
                               "scratch": {"num_layers": 2, "hidden_size": 64, "num_heads": 2,
                                           "intermediate_size": 128}}, arch="bi_encoder", teacher=teacher)
    cfg = student.encoder.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (2, 64, 2)
    assert student.tokenizer.get_vocab() == teacher.tokenizer.get_vocab()


def test_a_tokenizer_larger_than_the_student_vocabulary_is_refused(teacher, tmp_path, minilm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    tok.add_tokens([f"newtoken{i}" for i in range(10)])
    tok.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="student.tokenizer=.*tokens but the student's embeddings hold"):
        build_student(**{**ARCH_STUDENT, "tokenizer": str(tmp_path)}, arch="bi_encoder", teacher=teacher)


def test_scores_file_student_without_a_teacher_model(minilm_dir):
    student = build_student(**ARCH_STUDENT, arch="cross_encoder", teacher=None, teacher_source=minilm_dir)
    assert student.model.config.num_labels == 1 and student.model.config.num_hidden_layers == 2
    with pytest.raises(ConfigError, match="no model to start from"):
        build_student(**ARCH_STUDENT, arch="bi_encoder", teacher=None, teacher_source=None)


def test_saved_students_load_back_with_plain_transformers_and_sentence_transformers(teacher, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    texts = ["what is your name", "my name is bot and i like jazz"]
    for arch in ("bi_encoder", "late_interaction", "cross_encoder"):
        student = build_student(**ARCH_STUDENT, arch=arch, teacher=teacher).eval()
        d = tmp_path / arch
        d.mkdir()
        student.save(d)
        with torch.inference_mode():
            mine = student(student.featurize(QUERIES[:2], PASSAGES[:2]))["scores"]
            again = load_scorer(d).eval()
            assert torch.allclose(again(again.featurize(QUERIES[:2], PASSAGES[:2]))["scores"], mine, atol=1e-5)
            tok = AutoTokenizer.from_pretrained(d)
            if arch == "cross_encoder":
                model = AutoModelForSequenceClassification.from_pretrained(d).eval()
                enc = tok([QUERIES[0]] * 3, PASSAGES[0], padding=True, return_tensors="pt")
                assert torch.allclose(model(**enc).logits[:, 0], mine[0], atol=1e-5)
                continue
            hidden = AutoModel.from_pretrained(d).eval()(**tok(texts, padding=True, return_tensors="pt")).last_hidden_state
            assert hidden.shape[0] == 2 and torch.isfinite(hidden).all()
            if arch == "bi_encoder":
                st = SentenceTransformer(str(d), device="cpu")
                ours = student.embed(student.tokenize(texts))
                assert torch.allclose(torch.as_tensor(st.encode(texts)), ours, atol=1e-5)
