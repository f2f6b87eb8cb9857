"""Ranking teachers fine-tuned by kdrun (kdrun/tasks/ranking/finetune.py, kdrun/finetune.py): a teacher that never
sees the held-out queries and is cached by content, out-of-fold teachers that never score a query they trained on,
fine-tunes on fewer negatives or at another score scale under keys of their own, parallel jobs that train a missing
teacher once, and a fine-tuned cross-encoder that scores with its trained head. On the tiny BERT: the mechanics, not
the teacher's quality (the reproduction's teachers: scripts/reproduce_margin_mse)."""
from pathlib import Path

import pytest
import torch


def _tiny_data(eval_query="which colour is the sky"):
    from kdrun.data.ranking import RankingData

    facts = [("what do cats drink", "cats drink milk"), ("where do fish live", "fish live in water"),
             ("what do cows eat", "cows eat grass"), ("when do owls hunt", "owls hunt at night"),
             ("what do bees make", "bees make honey"), ("where do birds sleep", "birds sleep in nests")]
    passages = [p for _, p in facts]
    train = [(q, [p, passages[(i + k) % len(passages)]]) for i, (q, p) in enumerate(facts) for k in (1, 2)]
    return RankingData(train, [eval_query], [["the sky is blue", "grass is green"]], [[1, 0]])


def _finetune(data, base, cache, kind, steps=3):
    from kdrun.runtime import Runtime
    from kdrun.tasks.ranking.finetune import finetuned_teacher

    return finetuned_teacher(base, data, kind=kind, pooling="mean", similarity="dot", max_length=32,
                             runtime=Runtime(torch.device("cpu"), "fp32"), steps=steps, lr=1e-4, batch_size=4,
                             warmup_ratio=0.0, seed=0, cache_dir=str(cache))


class _Sealed(list):
    """Held-out queries that fail the test when anything reads them."""
    def __iter__(self):
        raise AssertionError("the fine-tune read a held-out query")

    __getitem__ = __len__ = lambda self, *a: (_ for _ in ()).throw(AssertionError("the fine-tune read a held-out query"))


@pytest.mark.parametrize("kind", ["bi_encoder", "cross_encoder"])
def test_a_fine_tuned_ranking_teacher_never_sees_the_held_out_queries_and_is_cached(tiny_bert, tmp_path, kind):
    data = _tiny_data()
    data.eval_queries, data.eval_rows = _Sealed(data.eval_queries), _Sealed(data.eval_rows)
    path, info = _finetune(data, tiny_bert, tmp_path, kind)
    assert info["teacher/finetune_cache_hit"] == 0.0 and info["teacher/finetune_seconds"] > 0
    assert info["teacher/finetune_first_loss"] > 0 and (Path(path) / "kdrun_scorer.json").is_file()
    # other held-out queries (and candidates): the same teacher, from the cache, with the training's metrics
    again, info2 = _finetune(_tiny_data("how tall is the tower"), tiny_bert, tmp_path, kind)
    assert again == path and info2["teacher/finetune_cache_hit"] == 1.0
    assert info2["teacher/finetune_last_loss"] == info["teacher/finetune_last_loss"]
    # other training examples: another teacher
    other = _tiny_data()
    other.keep(range(other.num_train - 1))
    assert _finetune(other, tiny_bert, tmp_path, kind)[0] != path


def test_out_of_fold_teachers_never_score_a_query_they_trained_on(tiny_bert, tmp_path, monkeypatch):
    """teacher.finetune.folds=2: fold f's teacher is fine-tuned on the training queries outside fold f, and it is the
    one that scores fold f's queries (and the held-out ones of fold f)."""
    from kdrun.models.ensemble import OutOfFold, fold_of
    from kdrun.runtime import Runtime
    from kdrun.tasks.ranking import FAMILY
    from kdrun.tasks.ranking import finetune as ft

    data = _tiny_data()
    seen = []
    real = ft.finetuned_teacher

    def spy(source, part, **kw):
        seen.append(set(part.queries.texts(part.train_q)))
        return real(source, part, **kw)

    monkeypatch.setattr(ft, "finetuned_teacher", spy)
    node = dict(name=None, path=tiny_bert, gguf_file=None, kind="bi_encoder", pooling="mean", similarity="dot",
                label_index=-1, max_length=32, top_k=0)
    teacher = FAMILY.build_teacher(data=data, runtime=Runtime(torch.device("cpu"), "fp32"), hardware=None,
                                   finetune=dict(steps=2, lr=1e-4, batch_size=4, warmup_ratio=0.0, seed=0,
                                                 cache_dir=str(tmp_path), in_batch=None, folds=2), **node)
    assert isinstance(teacher, OutOfFold) and len(teacher.folds) == 2
    everything = set(data.queries.texts(data.train_q))
    for f, trained_on in enumerate(seen):
        assert trained_on and all(fold_of(q, 2) != f for q in trained_on)
        assert trained_on == {q for q in everything if fold_of(q, 2) != f}  # all of the other folds' queries
    queries, lists = data.batch_texts(range(data.num_train))
    got = teacher.score_lists(queries, lists, 4, torch.device("cpu"))
    for q, cands, row in zip(queries, lists, got):
        want = teacher.folds[fold_of(q, 2)].score_lists([q], [cands], 4, torch.device("cpu"))[0]
        assert torch.allclose(row, want, rtol=1e-5, atol=1e-5)  # (batched otherwise: padding may differ)
    assert teacher.finetune_info["teacher/finetune_folds"] == 2.0
    # in-batch scores from the cached embeddings (in_batch_kl, teacher.mode=precompute): query b against every passage
    # of the batch, as its own fold's teacher scores them
    from kdrun.models.encoders import in_batch_from_embeddings
    from kdrun.tasks.ranking.task import precompute_teacher_embeddings

    q, p, fold = teacher.embed_lists(queries, lists, 4, torch.device("cpu"))
    assert p.shape[:3] == (len(queries), 2, 2) and fold.tolist() == [fold_of(x, 2) for x in queries]
    rows = [0, 3, 5, 8]
    in_batch = in_batch_from_embeddings(q[rows], p[rows], fold[rows])
    flat = [t for i in rows for t in lists[i]]
    for r, i in enumerate(rows):
        want = teacher.folds[fold_of(queries[i], 2)].score_lists([queries[i]], [flat], 4, torch.device("cpu"))[0]
        assert torch.allclose(in_batch[r], want, rtol=1e-4, atol=1e-4)
    out = precompute_teacher_embeddings(teacher, data, 4, Runtime(torch.device("cpu"), "fp32"), 0, data.num_train,
                                        chunk=5)  # in chunks, as a sharded teacher pass computes it
    assert torch.allclose(out["scores"], torch.stack(got), rtol=1e-4, atol=1e-4)  # the own lists: the same scores
    from kdrun.pipeline import flops_per_token

    assert flops_per_token(teacher) == flops_per_token(teacher.folds[0])  # one fold's model runs per query


def test_a_fine_tune_on_fewer_negatives_reads_the_first_ones_and_has_its_own_key(tmp_path, monkeypatch):
    """teacher.finetune.negatives=N: each example's positive and its first N mined negatives (a cheaper step); the
    data the students train on keeps all of them."""
    from kdrun.data.ranking import RankingData
    from kdrun.runtime import Runtime
    from kdrun.tasks.ranking import finetune as ft

    facts = _tiny_data().train
    train = [(q, [ps[0], f"negative {i} a", f"negative {i} b"]) for i, (q, ps) in enumerate(facts)]
    data = RankingData(train, ["which colour is the sky"], [["the sky is blue", "grass is green"]], [[1, 0]])
    seen = []

    class Stop(Exception):
        pass

    def fake_train(source, part, **kw):
        seen.append((part.batch_texts(range(part.num_train)), part.fingerprint()))
        raise Stop

    monkeypatch.setattr(ft, "_train", fake_train)
    for negatives in (1, None):
        with pytest.raises(Stop):
            ft.finetuned_teacher("base", data, kind="bi_encoder", pooling="mean", similarity="dot", max_length=32,
                                 runtime=Runtime(torch.device("cpu"), "fp32"), steps=3, lr=1e-4, batch_size=4, warmup_ratio=0.0, seed=0,
                                 cache_dir=str(tmp_path), negatives=negatives)
    (queries, lists), key = seen[0]
    assert lists == [ps[:2] for _, ps in train] and queries == [q for q, _ in train]
    assert seen[1][0][1] == [ps for _, ps in train] and seen[1][1] != key  # all of them: another key
    assert data.train_p.shape == (len(train), 3) and data.fingerprint() == seen[1][1]  # the data itself is untouched


def test_parallel_jobs_that_miss_a_fine_tuned_teacher_train_it_once(tmp_path):
    """Two sweep jobs at once (joblib) used to fine-tune the same teacher twice: now one trains under the entry's
    lock, the other waits and reads its entry (a cache hit with the first one's metrics)."""
    import threading
    import time

    from kdrun import finetune

    calls = []

    class Saved:
        def save(self, d):
            Path(d).mkdir(parents=True, exist_ok=True)
            (Path(d) / "weights").write_text("w")

    def train():
        calls.append(threading.get_ident())
        time.sleep(0.5)  # long enough for the other job to arrive while this one trains
        return Saved(), {"teacher/finetune_last_loss": 1.5}

    from kdrun.runtime import Runtime

    fp32 = Runtime(torch.device("cpu"), "fp32")
    results = []
    jobs = [threading.Thread(target=lambda: results.append(finetune.cached(
        "ranking", "base", "data", {"steps": 3}, str(tmp_path), train, "bi-encoder", fp32))) for _ in range(2)]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()
    assert len(calls) == 1 and len({path for path, _ in results}) == 1
    hits = sorted(info["teacher/finetune_cache_hit"] for _, info in results)
    assert hits == [0.0, 1.0] and all(info["teacher/finetune_last_loss"] == 1.5 for _, info in results)
    # trained in another precision, it is another teacher (the key holds the device type and the precision)
    bf16, _ = finetune.cached("ranking", "base", "data", {"steps": 3}, str(tmp_path), train, "bi-encoder",
                              Runtime(torch.device("cpu"), "bf16"))
    assert len(calls) == 2 and bf16 != results[0][0]


def test_the_fine_tuned_cross_encoder_loads_as_a_teacher_and_scores_with_its_trained_head(tiny_bert, tmp_path):
    from kdrun.errors import ConfigError
    from kdrun.runtime import Runtime
    from kdrun.tasks.ranking import FAMILY

    node = dict(name=None, path=tiny_bert, gguf_file=None, kind="cross_encoder", pooling="mean", similarity="cos",
                label_index=-1, max_length=32, top_k=0)
    plain = dict(steps=0, lr=1e-4, batch_size=4, warmup_ratio=0.0, seed=0, cache_dir=str(tmp_path), in_batch=None)
    with pytest.raises(ConfigError, match="no trained relevance head.*teacher.finetune.steps"):
        FAMILY.build_teacher(data=_tiny_data(), runtime=Runtime(torch.device("cpu"), "fp32"), finetune=plain, **node)
    teacher = FAMILY.build_teacher(data=_tiny_data(), runtime=Runtime(torch.device("cpu"), "fp32"),
                                   finetune={**plain, "steps": 3}, **node)
    assert teacher.finetune_info["teacher/finetune_cache_hit"] == 0.0
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    scores = teacher.score_lists(["what do cats drink"], [["cats drink milk", "cows eat grass"]], 8, "cpu")[0]
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_a_fine_tune_at_another_scale_has_its_own_key_and_trains_at_it(tmp_path, monkeypatch):
    from kdrun.data.ranking import RankingData
    from kdrun.runtime import Runtime
    from kdrun.tasks.ranking import finetune as ft

    data = RankingData(_tiny_data().train, ["which colour is the sky"], [["the sky is blue", "grass is green"]], [[1, 0]])
    seen = []

    class Stop(Exception):
        pass

    def fake_cached(family, source, fingerprint, settings, cache_dir, train, *args):
        seen.append(settings)
        return train()

    def fake_train(source, part, **kw):
        seen.append(kw.get("scale", 1.0))
        raise Stop

    monkeypatch.setattr("kdrun.finetune.cached", fake_cached)
    monkeypatch.setattr(ft, "_train", fake_train)
    for scale in (1.0, 20.0):
        with pytest.raises(Stop):
            ft.finetuned_teacher("base", data, kind="bi_encoder", pooling="mean", similarity="cos", max_length=32,
                                 runtime=Runtime(torch.device("cpu"), "fp32"), steps=3, lr=1e-4, batch_size=4,
                                 warmup_ratio=0.0, seed=0, cache_dir=str(tmp_path), scale=scale)
    assert "scale" not in seen[0] and seen[2]["scale"] == 20.0  # (the key of a fine-tune at 1 is as it was)
    assert (seen[1], seen[3]) == (1.0, 20.0)  # and the training's cross-entropy gets it
