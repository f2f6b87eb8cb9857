"""Ranking data in MS MARCO's layout (data=triples): ids join training triples, qrels, runs and score files."""
from pathlib import Path

import pytest
import torch

from support import QUIET, kdrun, offline_env, ok
from kdrun.data import scores_file
from kdrun.data.triples import load
from kdrun.errors import DataError

ARGS = dict(eval_queries=None, eval_candidates_file=None, negatives_per_query=1, eval_depth=10,
            max_train_examples=None, max_eval_queries=None, seed=13, eval_fraction=0.2, split_salt="x")


def _write(d, name, rows):
    f = d / name
    with open(f, "w") as out:
        out.writelines("\t".join(map(str, r)) + "\n" for r in rows)
    return str(f)


@pytest.fixture
def files(tmp_path):
    collection = _write(tmp_path, "collection.tsv", [(f"p{i}", f"passage number {i} about topic {i % 3}") for i in range(12)])
    queries = _write(tmp_path, "queries.tsv", [(f"q{i}", f"question {i} on topic {i % 3}") for i in range(6)])
    triples = _write(tmp_path, "triples.tsv", [("q0", "p0", "p1"), ("q0", "p0", "p2"), ("q0", "p0", "p3"),
                                               ("q1", "p4", "p5"), ("q1", "p4", "p6")])
    qrels = _write(tmp_path, "qrels.tsv", [("q4", 0, "p7", 1), ("q5", 0, "p8", 1), ("q5", 0, "p9", 0)])
    return dict(collection=collection, queries=queries, triples=triples, qrels=qrels)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDRUN_CACHE", str(tmp_path / "cache"))


def _train(data):
    qs, ps = data.batch_texts(range(data.num_train))
    return list(zip(qs, ps))


def test_triples_group_negatives_and_keep_the_files_ids(files, tmp_path):
    data = load(**files, **{**ARGS, "negatives_per_query": 2})
    assert _train(data) == [("question 0 on topic 0", ["passage number 0 about topic 0", "passage number 1 about topic 1",
                                                       "passage number 2 about topic 2"]),
                            ("question 1 on topic 1", ["passage number 4 about topic 1", "passage number 5 about topic 2",
                                                       "passage number 6 about topic 0"])]
    assert [data.example_ids(i) for i in range(data.num_train)] == [("q0", ["p0", "p1", "p2"]), ("q1", ["p4", "p5", "p6"])]
    assert data.eval_qids == ["q4", "q5"] and data.eval_queries == ["question 4 on topic 1", "question 5 on topic 2"]
    assert data.qrels == {"q4": {"p7": 1}, "q5": {"p8": 1, "p9": 0}}  # every judgment kept, rel 0 too
    # no run file: BM25's top of the collection, nothing injected: every candidate shares a query term
    for i, q in enumerate(data.eval_queries):
        words = set(q.split()) - {"on"}
        assert len(data.eval_rows[i]) and all(words & set(t.split()) for t in data.eval_texts(i))
    assert (tmp_path / "cache" / "bm25").is_dir() and (tmp_path / "cache" / "data").is_dir()  # converted once
    again = load(**files, **{**ARGS, "negatives_per_query": 2})
    assert [list(r) for r in again.eval_rows] == [list(r) for r in data.eval_rows]


def test_negatives_group_per_query_and_positive_in_file_order_across_the_file(files, tmp_path):
    _write(tmp_path, "triples.tsv", [("q0", "p0", "p1"), ("q1", "p4", "p5"), ("q0", "p0", "p2"), ("q1", "p4", "p6"),
                                     ("q0", "p0", "p3"), ("q0", "p9", "p8")])
    data = load(**files, **{**ARGS, "negatives_per_query": 2})
    assert [data.example_ids(i) for i in range(data.num_train)] == [("q0", ["p0", "p1", "p2"]), ("q1", ["p4", "p5", "p6"])]
    data = load(**files, **{**ARGS, "negatives_per_query": 1, "max_train_examples": 4})
    assert [data.example_ids(i) for i in range(data.num_train)] == [
        ("q0", ["p0", "p1"]), ("q0", ["p0", "p2"]), ("q0", ["p0", "p3"]), ("q1", ["p4", "p5"])]


def files_text(files):
    return dict(line.split("\t", 1) for line in open(files["collection"]).read().splitlines())


def test_bm25_candidates_rank_like_the_hand_written_bm25(tmp_path, monkeypatch):
    from kdrun.data.bm25 import BM25, search

    monkeypatch.setenv("KDRUN_CACHE", str(tmp_path))
    import random

    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    docs = [" ".join(rng.choices(words, k=rng.randint(5, 40))) for _ in range(500)]
    queries = [" ".join(rng.choices(words, k=4)) for _ in range(20)]
    ours = BM25(docs)
    found = search(iter(docs), len(docs), queries, 50, "test-key")
    for q, top in zip(queries, found):
        scores = ours.scores(q)
        mine = sorted(scores.items(), key=lambda kv: -kv[1])[:50]
        # bm25s' scores are ours over the constant k1 + 1 (in float32): the same top 50 in the same order, up to
        # swaps of scores equal to float32 precision
        assert [scores[i] for i in top] == pytest.approx([s for _, s in mine], rel=1e-5)
    # a query with a word the collection lacks keeps its known words; one with none (or only stopwords) finds nothing
    # (bm25s refused either: its empty token has no scores)
    again = search(iter(docs), len(docs), [queries[0] + " neverseen", "neverseen zzz", "the of and"], 50, "test-key")
    assert again[0] == found[0] and again[1:] == [[], []]
    # the same queries again (a sweep's next job): read back from the cache, without searching
    import kdrun.data.bm25 as bm25_module

    monkeypatch.setattr(bm25_module, "_search", lambda *a: pytest.fail("searched again"))
    assert search(iter(()), len(docs), queries, 50, "test-key") == found
    assert len(list((tmp_path / "bm25").glob("*-found-*"))) == 2


def test_a_run_file_gives_the_eval_candidates_to_its_depth_in_rank_order(files, tmp_path):
    run = _write(tmp_path, "run.trec", [("q4", "Q0", "p7", 2, 8.0, "bm25"), ("q4", "Q0", "p3", 1, 9.0, "bm25"),
                                        ("q4", "Q0", "p5", 3, 7.0, "bm25"), ("q5", "Q0", "p1", 1, 9.0, "bm25")])
    data = load(**files, **{**ARGS, "eval_candidates_file": run, "eval_depth": 2})
    assert [data.eval_pids(i) for i in range(2)] == [["p3", "p7"], ["p1"]]  # the run's top 2, no positive injected (q5's p8 is not there)
    assert data.eval_labels == [[0, 1], [0]]
    assert data.stats["eval_queries_without_candidates"] == 0


def test_msmarco_top1000_and_pair_files_serve_as_runs_and_queries_without_candidates_are_counted(files, tmp_path):
    top = _write(tmp_path, "top1000.dev", [("q4", "p7", "question 4", "passage 7"), ("q4", "p2", "q", "p")])
    data = load(**files, **{**ARGS, "eval_candidates_file": top})
    assert data.eval_qids == ["q4"] and data.eval_pids(0) == ["p7", "p2"]
    assert data.stats["eval_queries_without_candidates"] == 1  # q5 is in no run: left out, as trec_eval does


def test_graded_qrels_keep_their_grades(files, tmp_path):
    _write(tmp_path, "qrels.tsv", [("q4", 0, "p7", 3), ("q4", 0, "p3", 1), ("q4", 0, "p1", 0)])
    run = _write(tmp_path, "run.tsv", [("q4", "p1"), ("q4", "p3"), ("q4", "p7")])
    data = load(**files, **{**ARGS, "eval_candidates_file": run})
    assert data.eval_labels == [[0, 1, 3]] and data.qrels == {"q4": {"p7": 3, "p3": 1, "p1": 0}}


def test_a_margin_mse_score_file_serves_as_the_triples(files, tmp_path):
    scores = _write(tmp_path, "scores.tsv", [(1.5, 0.2, "q0", "p0", "p1"), (1.1, 0.9, "q1", "p4", "p5")])
    data = load(**{**files, "triples": scores}, **ARGS)
    joined, missing = scores_file.join(data, scores, 0.0)
    assert missing == 0 and joined.tolist() == [[1.5, pytest.approx(0.2)], [pytest.approx(1.1), pytest.approx(0.9)]]


def test_scores_join_by_ids_when_two_queries_share_a_text(files, tmp_path):
    """MS MARCO has duplicate texts under different ids: each keeps its own scores."""
    _write(tmp_path, "queries.tsv", [("q0", "same words"), ("q1", "same words")] +
           [(f"q{i}", f"question {i} on topic {i % 3}") for i in range(2, 6)])
    scores = _write(tmp_path, "scores.tsv", [(1.5, 0.2, "q0", "p0", "p1"), (7.0, 3.0, "q1", "p4", "p5")])
    data = load(**{**files, "triples": scores}, **ARGS)
    joined, missing = scores_file.join(data, scores, 0.0)
    assert missing == 0 and joined.tolist() == [[1.5, pytest.approx(0.2)], [7.0, 3.0]]
    out = tmp_path / "written.tsv"
    scores_file.write(str(out), data, torch.as_tensor(joined))
    assert [line.split("\t")[2] for line in out.read_text().splitlines()] == ["q0", "q1"]


@pytest.mark.parametrize("name,rows,match", [
    ("triples.tsv", [("q0", "p0")], r"triples.tsv:1: expected `qid<TAB>pos_pid<TAB>neg_pid`"),
    ("triples.tsv", [("q0", "p0", "p1"), ("q9", "p0", "p1")], r"triples.tsv:2: query id 'q9' is not in data.queries"),
    ("triples.tsv", [("q0", "p0", "p99")], r"triples.tsv:1: passage id 'p99' is not in data.collection"),
    ("qrels.tsv", [("q4", 0, "p7", "yes")], r"qrels.tsv:1: relevance 'yes' is not an integer"),
    ("collection.tsv", [("p0",)], r"collection.tsv:1: expected `id<TAB>text`"),
])
def test_bad_lines_name_file_and_line(files, tmp_path, name, rows, match):
    _write(tmp_path, name, rows)
    with pytest.raises(DataError, match=match):
        load(**files, **ARGS)


@pytest.mark.parametrize("name,content,match", [
    ("collection.tsv", "p0\tfirst\np1\t  \n", r"collection.tsv:2: the text of id 'p1' is empty"),
    ("queries.tsv", "q0\tquestion\nq1\tsecond\nq0\tagain\n", r"queries.tsv: the id 'q0' appears more than once"),
    ("collection.tsv", "p0\tok\np1\tcaf\xe9\n", r"collection.tsv:2: not UTF-8 text \(byte b'\\xe9' at column 7\)"),
])
def test_empty_duplicate_and_undecodable_texts_name_file_and_line(files, tmp_path, name, content, match):
    """Issue 20, defect 11: an empty passage was accepted silently; invalid UTF-8 was reported without its line."""
    (tmp_path / name).write_bytes(content.encode("latin-1"))
    with pytest.raises(DataError, match=match):
        load(**files, **ARGS)


def test_a_byte_order_mark_is_not_part_of_the_first_id(files, tmp_path):
    """A BOM (Windows editors) made the first id '\\ufeffq0', and the error blamed the triples file for it."""
    q = tmp_path / "queries.tsv"
    q.write_bytes(b"\xef\xbb\xbf" + q.read_bytes())
    c = tmp_path / "collection.tsv"
    c.write_bytes(b"\xef\xbb\xbf" + c.read_bytes())
    data = load(**files, **ARGS)
    assert _train(data)[0][0] == "question 0 on topic 0"


def test_a_missing_file_names_the_key(files):
    with pytest.raises(DataError, match="data.qrels=nope.tsv: no such file"):
        load(**{**files, "qrels": "nope.tsv"}, **ARGS)


def test_an_unreadable_file_names_the_key_and_the_reason(files, monkeypatch):
    import builtins
    import errno
    import os

    real_open = builtins.open

    def guarded(path, *args, **kwargs):  # (tests may run as root, which chmod cannot lock out)
        if str(path) == str(files["qrels"]):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    with pytest.raises(DataError, match=f"data.qrels={files['qrels']}: cannot read it \\(Permission denied\\)"):
        load(**files, **ARGS)


def test_msmarco_layout_scored_then_trained_from_the_file_by_ids(tmp_path):
    """Real text (chatterbot) written in MS MARCO's layout with numeric ids; `kdrun mode=score` writes the
    Margin-MSE file by those ids (the tiny teacher: the ids and the file are the point), and a ColBERT student trains
    from it."""
    from kdrun.data.chatterbot import load as chatterbot

    src = chatterbot(language="english", eval_fraction=0.2, split_salt="kdrun-v1", negatives_per_query=1,
                     examples_per_pair=1, mine_depth=30, eval_candidates=10, max_train_queries=12,
                     max_eval_queries=4, seed=13)
    pid, qid = {}, {}
    for q, ps in src.train:
        qid.setdefault(q, str(1000 + len(qid)))
        for p in ps:
            pid.setdefault(p, str(len(pid)))
    for q, cands in zip(src.eval_queries, src.eval_candidates):
        qid.setdefault(q, str(1000 + len(qid)))
        for p in cands:
            pid.setdefault(p, str(len(pid)))
    flat = lambda t: " ".join(t.split())  # the layout holds one line per text
    files = {"collection": _write(tmp_path, "collection.tsv", [(i, flat(t)) for t, i in pid.items()]),
             "queries": _write(tmp_path, "queries.tsv", [(i, flat(t)) for t, i in qid.items()]),
             "triples": _write(tmp_path, "triples.tsv", [(qid[q], pid[ps[0]], pid[ps[1]]) for q, ps in src.train]),
             "qrels": _write(tmp_path, "qrels.tsv", [(qid[q], 0, pid[p], y) for q, cs, ys in
                                                     zip(src.eval_queries, src.eval_candidates, src.eval_labels)
                                                     for p, y in zip(cs, ys)]),
             "eval_candidates_file": _write(tmp_path, "run.tsv", [(qid[q], pid[p]) for q, cs in
                                                                  zip(src.eval_queries, src.eval_candidates) for p in cs])}
    data = [f"data.{k}={v}" for k, v in {**files}.items()]
    base = ["data=triples", *data, "teacher=tiny", "train.max_steps=2", "train.batch_size=4", *QUIET]
    env = offline_env(tmp_path)
    ok(kdrun(base + ["mode=score", f"scores_out={tmp_path / 'scores.tsv'}", f"hydra.run.dir={tmp_path / 's'}"],
             tmp_path, env))
    first = (tmp_path / "scores.tsv").read_text().splitlines()[0].split("\t")
    assert first[2] == "1000" and first[3].isdigit()  # the files' ids, not text hashes
    ok(kdrun(base + ["student=colbert", "teacher.mode=scores_file", f"teacher.scores_file={tmp_path / 'scores.tsv'}",
                     "tracking.experiment=triples", f"hydra.run.dir={tmp_path / 't'}"], tmp_path, env))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("triples").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.metrics["teacher/scores_missing"] == 0
    assert run.data.params["data/eval_queries"] == "4" and run.data.params["student.arch"] == "late_interaction"
    # the standard protocol's metrics, and the TREC run they came from: ir_measures outside kdrun gives the same
    import ir_measures

    logged = {k.split("/")[-1]: v for k, v in run.data.metrics.items() if k.startswith("eval/student/")}
    assert {"mrr_at_10", "ndcg_at_10", "recall_at_10", "recall_at_1000"} <= set(logged)
    got = Path(client.download_artifacts(run.info.run_id, "eval", str(tmp_path / "art")))
    assert sorted(p.name for p in got.iterdir()) == ["qrels.trec", "run.student.trec"]  # no teacher: a score file
    measures = [ir_measures.parse_measure(m) for m in ("RR@10", "nDCG@10", "R@1000")]
    outside = ir_measures.calc_aggregate(measures, ir_measures.read_trec_qrels(str(got / "qrels.trec")),
                                         ir_measures.read_trec_run(str(got / "run.student.trec")))
    assert [outside[m] for m in measures] == pytest.approx(
        [logged["mrr_at_10"], logged["ndcg_at_10"], logged["recall_at_1000"]], rel=1e-9)


def test_the_data_path_reads_a_collection_larger_than_its_memory_allows(tmp_path):
    """Collection, queries, triples and a score file converted once; then a process whose data segment may grow by
    48 MB only loads them, joins the scores and builds batches: texts and rows are memory-mapped, not held."""
    import subprocess
    import sys
    import textwrap

    n = 250_000
    filler = " ".join(f"word{i}" for i in range(40))
    files = {"collection": _write(tmp_path, "collection.tsv", ((f"p{i}", f"passage {i} {filler}") for i in range(n))),
             "queries": _write(tmp_path, "queries.tsv", ((f"q{i}", f"query {i} words") for i in range(n // 10))),
             "triples": _write(tmp_path, "scores.tsv", ((1.5, 0.5, f"q{i % (n // 10)}", f"p{i}", f"p{(i * 7) % n}")
                                                         for i in range(1, n))),
             "qrels": _write(tmp_path, "qrels.tsv", [("q0", 0, "p0", 1)]),
             "eval_candidates_file": _write(tmp_path, "run.tsv", [("q0", f"p{i}") for i in range(100)])}
    assert Path(files["collection"]).stat().st_size > 64 * 2**20
    args = {**ARGS, **files, "negatives_per_query": 1}
    data = load(**args)  # converts (no limit here)
    scores_file.join(data, files["triples"], 0.0)
    code = textwrap.dedent(f"""
        import resource, numpy as np, pyarrow as pa, pyarrow.compute
        from kdrun import teacher_cache
        from kdrun.data import scores_file
        from kdrun.data.triples import load
        pa.array(np.arange(3))  # (pyarrow's lazy imports, before the limit)
        args = {args!r}
        vm = int(open("/proc/self/status").read().split("VmData:")[1].split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_DATA, (vm + 48 * 2**20, resource.RLIM_INFINITY))
        try:
            bytearray(96 * 2**20)  # the limit bites: the collection's bytes alone could not be held
            raise SystemExit("the limit did not bite")
        except MemoryError:
            pass
        data = load(**args)
        scores, missing = scores_file.join(data, args["triples"], 0.0)
        rng = np.random.default_rng(0)
        for _ in range(100):
            qs, ps = data.batch_texts(rng.integers(0, data.num_train, 32))
            assert qs[0].startswith("query") and ps[0][0].startswith("passage")
        print("ok", data.num_train, missing, data.example_ids(0))
    """)
    import os

    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "KDRUN_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0 and r.stdout.startswith(f"ok {n - 1} 0"), r.stdout + r.stderr[-3000:]
