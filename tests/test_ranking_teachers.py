"""Ranking teachers fine-tuned by kdrun (kdrun/tasks/ranking/finetune.py), the evaluation cache, the hard-label loss
over a query's own list, and the code-search data set built from installed Python sources."""
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import offline_env, run_kdrun


def _tiny_data(eval_query="which colour is the sky"):
    from kdrun.data.ranking import RankingData

    facts = [("what do cats drink", "cats drink milk"), ("where do fish live", "fish live in water"),
             ("what do cows eat", "cows eat grass"), ("when do owls hunt", "owls hunt at night"),
             ("what do bees make", "bees make honey"), ("where do birds sleep", "birds sleep in nests")]
    passages = [p for _, p in facts]
    train = [(q, [p, passages[(i + k) % len(passages)]]) for i, (q, p) in enumerate(facts) for k in (1, 2)]
    return RankingData(train, [eval_query], [["the sky is blue", "grass is green"]], [[1, 0]])


def _finetune(data, minilm_dir, cache, kind, steps=3):
    from kdrun.runtime import Runtime
    from kdrun.tasks.ranking.finetune import finetuned_teacher

    return finetuned_teacher(minilm_dir, data, kind=kind, pooling="mean", similarity="dot", max_length=32,
                             runtime=Runtime(torch.device("cpu"), "fp32"), steps=steps, lr=1e-4, batch_size=4,
                             warmup_ratio=0.0, seed=0, cache_dir=str(cache))


class _Sealed(list):
    """Held-out queries that fail the test when anything reads them."""
    def __iter__(self):
        raise AssertionError("the fine-tune read a held-out query")

    __getitem__ = __len__ = lambda self, *a: (_ for _ in ()).throw(AssertionError("the fine-tune read a held-out query"))


@pytest.mark.parametrize("kind", ["bi_encoder", "cross_encoder"])
def test_a_fine_tuned_ranking_teacher_never_sees_the_held_out_queries_and_is_cached(minilm_dir, tmp_path, kind):
    data = _tiny_data()
    data.eval_queries, data.eval_rows = _Sealed(data.eval_queries), _Sealed(data.eval_rows)
    path, info = _finetune(data, minilm_dir, tmp_path, kind)
    assert info["teacher/finetune_cache_hit"] == 0.0 and info["teacher/finetune_seconds"] > 0
    assert info["teacher/finetune_first_loss"] > 0 and (Path(path) / "kdrun_scorer.json").is_file()
    # other held-out queries (and candidates): the same teacher, from the cache, with the training's metrics
    again, info2 = _finetune(_tiny_data("how tall is the tower"), minilm_dir, tmp_path, kind)
    assert again == path and info2["teacher/finetune_cache_hit"] == 1.0
    assert info2["teacher/finetune_last_loss"] == info["teacher/finetune_last_loss"]
    # other training examples: another teacher
    other = _tiny_data()
    other.keep(range(other.num_train - 1))
    assert _finetune(other, minilm_dir, tmp_path, kind)[0] != path


def test_out_of_fold_teachers_never_score_a_query_they_trained_on(minilm_dir, tmp_path, monkeypatch):
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
    node = dict(name=None, path=minilm_dir, gguf_file=None, kind="bi_encoder", pooling="mean", similarity="dot",
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


def test_the_fine_tuned_cross_encoder_loads_as_a_teacher_and_scores_with_its_trained_head(minilm_dir, tmp_path):
    from kdrun.errors import ConfigError
    from kdrun.runtime import Runtime
    from kdrun.tasks.ranking import FAMILY

    node = dict(name=None, path=minilm_dir, gguf_file=None, kind="cross_encoder", pooling="mean", similarity="cos",
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


def test_list_ce_is_the_cross_entropy_of_column_zero():
    from kdrun.losses import functional as F

    s = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    expected = [-2.0 + torch.logsumexp(s[0], 0).item(), -0.0 + torch.logsumexp(s[1], 0).item()]
    assert F.list_ce(s).item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    with pytest.raises(ValueError):
        F.list_ce(torch.zeros(3))


def test_ce_in_batch_is_a_ranking_setting():
    from kdrun.errors import ConfigError
    from kdrun.losses import specs

    assert specs.parse({"ce": {"in_batch": False}}, "ranking", ["teacher"], online=False)["ce"].in_batch is False
    with pytest.raises(ConfigError, match="loss.terms.ce.in_batch=False: in-batch negatives are a ranking setting"):
        specs.parse({"ce": {"in_batch": False}}, "classification", ["teacher"], online=False)


def test_ce_scale_turns_cosines_into_logits_for_ranking_only():
    """loss.terms.ce.scale (and teacher.finetune.scale): the scores times the scale before the softmax, as
    sentence-transformers' MultipleNegativesRankingLoss trains a cosine model at 20."""
    from kdrun.errors import ConfigError
    from kdrun.losses import Context, WeightedLoss, specs
    from kdrun.losses import functional as F

    cos = torch.tensor([[0.9, 0.2, 0.1, 0.3], [0.1, 0.4, 0.8, 0.5]])  # [B=2, B*n=4]
    for in_batch, plain in ((True, F.in_batch_ce), (False, F.list_ce)):
        scores = {"in_batch_scores": cos} if in_batch else {"scores": cos}
        scaled = WeightedLoss([("ce", 1.0, {"in_batch": in_batch, "scale": 20.0})], Context(task="ranking"))
        unscaled = WeightedLoss([("ce", 1.0, {"in_batch": in_batch})], Context(task="ranking"))
        assert scaled(scores, {}, {})["loss"].item() == pytest.approx(plain(cos * 20).item(), rel=1e-6)
        assert unscaled(scores, {}, {})["loss"].item() == pytest.approx(plain(cos).item(), rel=1e-6)
        if in_batch:  # each row's positive (columns 0 and 2) leads it: sharper is lower
            assert scaled(scores, {}, {})["loss"] < unscaled(scores, {}, {})["loss"]
    with pytest.raises(ConfigError, match=r"loss.terms.ce.scale=0.0 must be > 0"):
        specs.parse({"ce": {"scale": 0.0}}, "ranking", ["teacher"], online=False)
    with pytest.raises(ConfigError, match=r"loss.terms.ce.scale=20.0: a ranking setting"):
        specs.parse({"ce": {"scale": 20.0}}, "classification", ["teacher"], online=False)


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


def test_ranking_ce_over_its_own_list_needs_no_in_batch_scores():
    from kdrun.losses import Context, WeightedLoss

    own = WeightedLoss([("ce", 1.0, {"in_batch": False})], Context(task="ranking"))
    assert own.student_needs == set()
    assert WeightedLoss([("ce", 1.0)], Context(task="ranking")).student_needs == {"in_batch_scores"}
    s = torch.tensor([[3.0, 1.0], [0.5, 0.5]])
    assert own({"scores": s}, {}, {})["loss"].item() == pytest.approx(
        torch.nn.functional.cross_entropy(s, torch.zeros(2, dtype=torch.long)).item())


# ---- the end-to-end path: kdrun fine-tunes the teacher, then the evaluation cache serves the second run ----

FT = ["teacher=minilm_cross_encoder", "teacher.finetune.steps=3", "teacher.finetune.batch_size=4",
      "teacher.max_length=32", "data.max_train_queries=12", "data.max_eval_queries=6", "data.eval_candidates=5",
      "train.batch_size=8", "train.max_steps=2", "tracking.log_student=false", "tracking.experiment=ft"]


def test_kdrun_fine_tunes_a_cross_encoder_teacher_once_and_evaluates_it_once(tmp_path):
    from mlflow.tracking import MlflowClient

    env = offline_env(tmp_path)
    for seed in (1, 2):
        r = run_kdrun([*FT, f"train.seed={seed}", f"hydra.run.dir={tmp_path / str(seed)}"], cwd=tmp_path, env=env)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("ft").experiment_id], order_by=["params.`train.seed` ASC"])
    first, second = (r.data.metrics for r in runs)
    assert (first["teacher/finetune_cache_hit"], second["teacher/finetune_cache_hit"]) == (0.0, 1.0)
    assert first["teacher/finetune_seconds"] > 0 and "teacher/finetune_last_loss" in second
    assert (first["eval_cache/teacher_hit"], second["eval_cache/teacher_hit"]) == (0.0, 1.0)
    for key in ("mrr_at_10", "ndcg_at_10", "ms_per_example"):
        assert first[f"eval/teacher/{key}"] == second[f"eval/teacher/{key}"]
    # the student before training starts from the same weights in both runs: evaluated once too
    assert second["eval_cache/student_hit"] == 1.0
    for run in runs:  # a cached evaluation leaves the same TREC files
        files = {f.path for f in client.list_artifacts(run.info.run_id, "eval")}
        assert files == {"eval/run.student.trec", "eval/run.teacher.trec", "eval/qrels.trec"}
    teacher_runs = [Path(client.download_artifacts(r.info.run_id, "eval/run.teacher.trec", str(tmp_path / r.info.run_id)))
                    .read_text() for r in runs]
    assert teacher_runs[0] == teacher_runs[1] and teacher_runs[0]


# ---- code search from installed Python sources ----

SOURCE = textwrap.dedent('''
    def area(width, height):
        """Return the area of a rectangle
        given its sides.

        More words here."""
        result = width * height
        return result

    def test_area():
        """Check the area of a rectangle."""
        assert area(1, 2) == 2
        return None

    class Box:
        def __len__(self):
            """Return the number of things."""
            n = 0
            return n

        @property
        def volume(self):
            """Compute the volume of the box."""
            v = self.w * self.h
            return v * self.d

    def short(x):
        """Too short a function body."""
        return x
''')


def test_functions_give_a_summary_and_the_code_without_its_docstring():
    from kdrun.data.code_search import functions

    found = list(functions(SOURCE, 2000))
    assert [q for q, _, _ in found] == ["Return the area of a rectangle given its sides.",
                                        "Compute the volume of the box."]
    code = found[0][1]
    assert code.startswith("def area(width, height):") and "More words" not in code and "return result" in code
    assert found[1][1].startswith("def volume(self):")  # dedented; the decorator left out
    assert list(functions("def broken(:\n", 2000)) == []


def _package(root: Path, name: str, modules: dict) -> None:
    for rel, text in modules.items():
        f = root / name / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(text))
    (root / name / "__init__.py").touch()


def _fn(name, summary, body="x = 1"):
    return f'def {name}(a):\n    """{summary}"""\n    {body}\n    y = a + {len(name)}\n    return y\n'


def test_code_search_drops_ambiguous_summaries_and_repeated_bodies_and_splits_by_unit(tmp_path, monkeypatch):
    from kdrun.data import code_search

    modules = {f"sub{u}/mod.py": "".join(_fn(f"f{u}_{i}", f"Compute thing number {u} {i} for sure") for i in range(6))
               for u in range(8)}
    modules["sub0/dup.py"] = _fn("g1", "Return the same summary twice") + _fn("g2", "Return the same summary twice")
    modules["sub1/copy.py"] = _fn("f1_0", "A copy of a body elsewhere")  # the same body as sub1/mod.py's f1_0
    _package(tmp_path, "kdrun_fake_src", modules)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("KDRUN_CACHE", str(tmp_path / "cache"))
    args = dict(packages=["kdrun_fake_src"], max_code_chars=2000, eval_fraction=0.3, split_salt="s",
                negatives_per_query=1, examples_per_pair=1, mine_depth=5, eval_candidates=4, max_train_queries=None,
                max_eval_queries=None, seed=0)
    data = code_search.load(**args)
    assert data.stats["ambiguous_summaries_dropped"] == 2 and data.stats["repeated_bodies_dropped"] == 1
    assert data.stats["pairs"] == 48 and data.stats["extraction_cache_hit"] == 0.0
    assert "kdrun_fake_src:" in data.stats["licences"]
    units = lambda queries: {q.split()[3] for q in queries}  # "Compute thing number U I ..."
    train_units, eval_units = units(q for q, _ in data.train), units(data.eval_queries)
    assert train_units and eval_units and not train_units & eval_units  # a unit is on one side only
    assert all(len(c) == 4 and sum(y) == 1 for c, y in zip(data.eval_candidates, data.eval_labels))
    again = code_search.load(**args)
    assert again.stats["extraction_cache_hit"] == 1.0 and again.train == data.train
    # a changed source file extracts again
    (tmp_path / "kdrun_fake_src" / "sub3" / "mod.py").write_text(_fn("h", "A brand new function here"))
    assert code_search.load(**args).stats["extraction_cache_hit"] == 0.0


def test_code_search_names_a_source_that_is_not_installed():
    from kdrun.data.code_search import find_source
    from kdrun.errors import DataError

    with pytest.raises(DataError, match="'no_such_pkg_x' is not an installed Python package"):
        find_source("no_such_pkg_x")
    std = find_source("stdlib")
    assert std.licence == "PSF-2.0" and std.version == sys.version.split()[0]


@pytest.mark.demo  # CI time (48 s): builds the full code_search data; the quick reproduction test uses it small
def test_the_default_code_search_data_has_over_10000_queries_split_by_source_unit(kdrun_cache, monkeypatch):
    """The data set as the config builds it from this machine's Python (counts in README, "Data"); its extraction
    stays in the session's cache for the reproduction test (tests/test_sweeps.py)."""
    from kdrun.data import code_search
    from omegaconf import OmegaConf

    monkeypatch.setenv("KDRUN_CACHE", str(kdrun_cache))
    cfg = OmegaConf.load(Path(__file__).parent.parent / "conf" / "data" / "code_search.yaml")
    args = {k: cfg[k] for k in ("packages", "eval_fraction", "negatives_per_query", "examples_per_pair", "mine_depth",
                                "eval_candidates")}
    data = code_search.load(**args, max_code_chars=2000, split_salt="kdrun-v1", max_train_queries=None,
                            max_eval_queries=None, seed=13)
    assert data.stats["pairs"] >= 10_000
    assert data.stats["eval_queries"] >= 1_000 and data.stats["split_units"] >= 100
    assert not set(data.eval_queries) & {q for q, _ in data.train}
