"""The teacher's outputs computed once and cached on disk (kdrun/teacher_cache.py): an online teacher frozen in low
precision, scores that do not depend on the batch, a cache that fills then hits with the same outputs, a killed pass
that goes on from its shards, damaged entries and shards rebuilt, keys that follow data, weights, settings and
precision, a full disk or an unusable cache dir that costs the cache and nothing else, and parallel jobs that compute
a missing entry once. On the tiny BERT: the cache's mechanics, not the teacher's quality."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from kdrun import store, teacher_cache
from kdrun.losses import WeightedLoss, Context
from kdrun.runtime import make_runtime
from support import PASSAGES, QUERIES, STUDENT, TEACHER, build_ranking_student, f32_close, ranking_data, ranking_task


def test_online_teacher_is_frozen_in_low_precision_and_outside_the_optimizer(tiny_bert):
    from omegaconf import OmegaConf

    from kdrun.pipeline import build_teachers
    from kdrun.train import make_optim

    cfg = OmegaConf.create({"teacher": {"_target_": "kdrun.tasks.build_teacher", "path": tiny_bert, "kind": "bi_encoder",
                                        "mode": "online", "cache": True, "cache_dir": None, "scores_file": None,
                                        "max_missing_fraction": 0.0, "weight": 1.0, "finetune": {"steps": 0}, **TEACHER},
                            "teachers": {}, "data": {"task": "ranking"},
                            "hardware": {"pad_to_multiple_of": 8, "length_groups": 1}})
    rt = make_runtime("cpu", "bf16")
    teacher, _ = build_teachers(cfg, None, rt)
    assert not teacher.training and teacher.exact
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}  # the profile's low precision
    assert not any(p.requires_grad for p in teacher.parameters())
    student = build_ranking_student(**STUDENT, arch="bi_encoder", teacher=teacher)
    loss = WeightedLoss([("margin_mse", 1.0)], Context(task="ranking"))
    optim = make_optim([student, loss], rt, 2, lr=1e-3, weight_decay=0.0, betas=[0.9, 0.999], eps=1e-8,
                       schedule="constant", warmup_ratio=0.0, max_grad_norm=1.0)
    in_optim = {id(p) for g in optim.optimizer.param_groups for p in g["params"]}
    assert not in_optim & {id(p) for p in teacher.parameters()}
    before = [p.clone() for p in teacher.parameters()]
    from kdrun import train as loop

    batch = {"student": student.featurize(QUERIES[:2], [p[:2] for p in PASSAGES[:2]]),
             "teacher": teacher.featurize(QUERIES[:2], [p[:2] for p in PASSAGES[:2]]), "size": 2}
    loop.train(student, teacher, loss, iter([batch]), optim, rt, max_steps=1, grad_accum=1, log_every=1,
               eval_every=0, log=lambda *a: None, evaluate=lambda s: {})
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))


def test_teacher_scores_do_not_depend_on_the_batch(teacher):
    """Batch-invariant padding: a text's tokens and mask do not depend on the other texts of its batch, so its score
    in a training batch, alone and in score_lists agree to float32 rounding on any CPU (the kernels may still
    regroup sums by batch shape: AMX/AVX-512 machines differ in the last bits), and the same batch twice gives the
    same bits."""
    batch = teacher(teacher.featurize(QUERIES, PASSAGES))["scores"]
    alone = torch.cat([teacher(teacher.featurize([q], [ps]))["scores"] for q, ps in zip(QUERIES, PASSAGES)])
    lists = torch.stack(teacher.score_lists(QUERIES, PASSAGES, 3, torch.device("cpu")))
    assert f32_close(alone, batch) and f32_close(lists, batch)
    assert torch.equal(teacher(teacher.featurize(QUERIES, PASSAGES))["scores"], batch)  # same shapes: same bits
    # what makes it batch-invariant: a text is padded to its own length group, whatever else its batch holds
    alone, together = teacher.featurize(QUERIES[:1], PASSAGES[:1]), teacher.featurize(QUERIES, PASSAGES)
    for side in ("query", "passage"):
        for row in range(len(alone[side]["groups"][0]["index"])):
            assert _padded_row(alone[side], row) == _padded_row(together[side], row)


def _padded_row(features, row):
    """Text `row`'s padded input ids and attention mask in a `tokenize_groups` batch."""
    for group in features["groups"]:
        where = (group["index"] == row).nonzero()
        if len(where):
            i = where.item()
            return group["input_ids"][i].tolist(), group["attention_mask"][i].tolist()
    raise AssertionError(f"row {row} is in no group")


def test_cache_fills_then_hits_with_identical_outputs(teacher, tmp_path):
    task = ranking_task(teacher)
    first, second = teacher_cache.CacheInfo(), teacher_cache.CacheInfo()
    a = teacher_cache.teacher_outputs(task, teacher, task.rt, str(tmp_path), True, first)
    b = teacher_cache.teacher_outputs(task, teacher, task.rt, str(tmp_path), True, second)
    assert (first.hits, first.misses, second.hits, second.misses) == (0, 1, 1, 0)
    assert isinstance(b["scores"], np.memmap)  # read back memory-mapped: a batch costs its own rows
    assert np.array_equal(a["scores"], b["scores"]) and a["scores"].shape == (6, 3)
    assert first.teacher_seconds > 0 and second.teacher_seconds == 0


def test_scores_alone_are_read_from_an_entry_that_kept_the_embeddings_too(teacher, tmp_path):
    """A sweep's in-batch loss keeps the teacher's embeddings beside its scores; its other losses read the scores
    there instead of running the teacher again."""
    task = ranking_task(teacher)
    want = np.array(teacher_cache.teacher_outputs(task, teacher, task.rt, None, False, teacher_cache.CacheInfo())["scores"])
    wide, scores_only = teacher_cache.CacheInfo(), teacher_cache.CacheInfo()
    teacher.request({"in_batch_scores"})
    try:
        full = teacher_cache.teacher_outputs(task, teacher, task.rt, str(tmp_path), True, wide)
    finally:
        teacher.request(set())
    got = teacher_cache.teacher_outputs(task, teacher, task.rt, str(tmp_path), True, scores_only)
    assert {"scores", "query_emb", "passage_emb", "fold"} <= set(full) and set(got) == {"scores"}
    assert (wide.misses, scores_only.hits, scores_only.misses, scores_only.teacher_seconds) == (1, 1, 0, 0)
    assert scores_only.entries["teacher"] == wide.entries["teacher"]
    assert f32_close(np.array(got["scores"]), want)
    # the other way round stays a miss: an entry of scores alone holds no embeddings
    other = str(tmp_path / "other")
    teacher_cache.teacher_outputs(task, teacher, task.rt, other, True, teacher_cache.CacheInfo())
    teacher.request({"in_batch_scores"})
    try:
        info = teacher_cache.CacheInfo()
        assert "query_emb" in teacher_cache.teacher_outputs(task, teacher, task.rt, other, True, info)
    finally:
        teacher.request(set())
    assert (info.hits, info.misses) == (0, 1)


def test_a_killed_teacher_pass_goes_on_from_its_finished_shards(teacher, tmp_path, monkeypatch):
    task = ranking_task(teacher)
    task.teacher_chunk = 2  # 3 shards of 2 examples
    calls = []
    real = task.teacher_outputs_range

    def dies_on_the_third(t, start, stop):
        calls.append(start)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the pass is killed while the third shard is being computed
        return real(t, start, stop)

    monkeypatch.setattr(task, "teacher_outputs_range", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        teacher_cache.teacher_outputs(task, teacher, task.rt, str(tmp_path), True, teacher_cache.CacheInfo())
    partial = next((tmp_path / "ranking").glob("*.partial"))
    assert sorted(p.name for p in partial.iterdir() if p.is_dir()) == ["000000000000-000000000002",
                                                                       "000000000002-000000000004"]
    calls.clear()
    info = teacher_cache.CacheInfo()
    resumed = teacher_cache.teacher_outputs(task, teacher, task.rt, str(tmp_path), True, info)
    assert calls == [4]  # only the missing shard ran
    assert info.metrics()["teacher/resumed_examples"] == 4 and info.metrics()["teacher/examples_per_s"] > 0
    assert not partial.exists()  # folded into the entry
    whole = task.teacher_outputs(teacher)["scores"]
    assert f32_close(torch.as_tensor(np.array(resumed["scores"])), whole)


def test_a_damaged_shard_of_a_killed_pass_is_computed_again(teacher, tmp_path, monkeypatch, caplog):
    """Issue 20: the shards a killed pass leaves carry checksums; a flipped byte is caught before it reaches the
    entry (whose own checksum would be made from the flipped data)."""
    task = ranking_task(teacher)
    task.teacher_chunk = 2
    real, calls = task.teacher_outputs_range, []

    def dies_on_the_third(t, start, stop):
        calls.append(start)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(t, start, stop)

    monkeypatch.setattr(task, "teacher_outputs_range", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        teacher_cache.teacher_outputs(task, teacher, task.rt, str(tmp_path), True, teacher_cache.CacheInfo())
    shard = next((tmp_path / "ranking").glob("*.partial")) / "000000000000-000000000002" / "scores.npy"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0x40
    shard.write_bytes(bytes(raw))
    calls.clear()
    resumed = teacher_cache.teacher_outputs(task, teacher, task.rt, str(tmp_path), True, teacher_cache.CacheInfo())
    assert calls == [0, 4] and "computing it again" in caplog.text  # the damaged shard and the missing one
    monkeypatch.undo()
    assert f32_close(torch.as_tensor(np.array(resumed["scores"])), task.teacher_outputs(teacher)["scores"])


def test_reading_a_cache_entry_costs_memory_for_the_batch_not_the_entry(tmp_path):
    """An entry of 512 MB read and batched through by a process whose data segment may grow by 192 MB only."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import json, resource, numpy as np
        from pathlib import Path
        from kdrun import store, teacher_cache
        entry = Path({str(tmp_path / "entry")!r})
        entry.mkdir()
        n = 64 * 2**20  # [n, 2] float32: 512 MiB
        whole = np.lib.format.open_memmap(entry / "scores.npy", mode="w+", dtype=np.float32, shape=(n, 2))
        for i in range(0, n, 2**22):
            whole[i:i + 2**22] = (np.arange(i, min(i + 2**22, n)) % 1000).astype(np.float32)[:, None]
        whole.flush(); del whole
        files = {{"scores": {{"sha256": store.file_sha256(entry / "scores.npy"), "shape": [n, 2],
                              "dtype": "float32"}}}}
        (entry / "meta.json").write_text(json.dumps({{"key": "k", "description": {{}}, "files": files}}))
        (entry / "kdrun_complete").write_text("k")
        data = int(open("/proc/self/status").read().split("VmData:")[1].split()[0]) * 1024
        resource.setrlimit(resource.RLIMIT_DATA, (data + 192 * 2**20, resource.RLIM_INFINITY))
        try:
            np.ones(n * 2, dtype=np.float32)  # the limit bites: the entry cannot be held in memory
            raise SystemExit("the limit did not bite")
        except MemoryError:
            pass
        outputs, why = teacher_cache.read(entry, "k", {{}}, n)
        assert outputs is not None, why
        total = 0.0
        rng = np.random.default_rng(0)
        for _ in range(200):  # batches of rows, as the collate takes them
            rows = rng.integers(0, n, 64)
            total += float(np.asarray(outputs["scores"][rows]).sum())
        assert float(outputs["scores"][n - 1, 0]) == (n - 1) % 1000
        print("ok", total > 0)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.startswith("ok True"), r.stdout + r.stderr[-3000:]


def test_cache_key_follows_data_weights_settings_and_precision(teacher, tmp_path):
    task = ranking_task(teacher)
    rt = task.rt
    base = teacher_cache.key_of(teacher_cache.describe(teacher, task.fingerprint(), rt))
    other_data = ranking_task(teacher, ranking_data(list(zip(QUERIES[:5], PASSAGES[:5]))))
    assert teacher_cache.key_of(teacher_cache.describe(teacher, other_data.fingerprint(), rt)) != base
    assert teacher_cache.key_of(teacher_cache.describe(teacher, task.fingerprint(), make_runtime("cpu", "bf16"))) != base
    teacher.max_length = 32
    try:
        assert teacher_cache.key_of(teacher_cache.describe(teacher, task.fingerprint(), rt)) != base
    finally:
        teacher.max_length = 64
    fp = store.weights_fingerprint(teacher)
    with torch.no_grad():
        p = next(teacher.parameters())
        p[0, 0] += 1e-3
        assert store.weights_fingerprint(teacher) != fp
        p[0, 0] -= 1e-3


@pytest.mark.parametrize("damage", ["flip_bytes", "truncate", "other_inputs", "no_marker", "wrong_shape",
                                    "meta_null", "plain_file"])
def test_a_damaged_cache_entry_is_rebuilt_not_used(teacher, tmp_path, damage):
    task = ranking_task(teacher)
    info = teacher_cache.CacheInfo()
    good = np.array(teacher_cache.teacher_outputs(task, teacher, task.rt, str(tmp_path), True, info)["scores"])
    entry = next(p for p in (tmp_path / "ranking").iterdir() if p.is_dir())  # (not the entry's .lock file)
    outputs, meta = entry / "scores.npy", entry / "meta.json"
    if damage == "flip_bytes":
        raw = bytearray(outputs.read_bytes())
        raw[-4:] = b"\x00\x00\xc0\x7f"  # the last score becomes NaN
        outputs.write_bytes(bytes(raw))
    elif damage == "truncate":
        outputs.write_bytes(outputs.read_bytes()[:20])
    elif damage == "other_inputs":
        m = json.loads(meta.read_text())
        m["description"]["data"] = "0" * 64
        meta.write_text(json.dumps(m))
    elif damage == "no_marker":
        (entry / "kdrun_complete").unlink()
    elif damage == "meta_null":
        meta.write_text("null")
    elif damage == "plain_file":  # the whole entry replaced by a file
        shutil.rmtree(entry)
        entry.write_text("not an entry")
    else:
        np.save(outputs, np.zeros((5, 3), dtype=np.float32))
        m = json.loads(meta.read_text())
        m["files"]["scores"]["sha256"] = store.file_sha256(outputs)
        meta.write_text(json.dumps(m))
    again = teacher_cache.CacheInfo()
    rebuilt = teacher_cache.teacher_outputs(task, teacher, task.rt, str(tmp_path), True, again)
    assert (again.hits, again.misses, again.rebuilt) == (0, 1, 1)
    assert np.array_equal(rebuilt["scores"], good)
    third = teacher_cache.CacheInfo()
    teacher_cache.teacher_outputs(task, teacher, task.rt, str(tmp_path), True, third)
    assert third.hits == 1  # the rebuilt entry is sound


def test_a_directory_where_the_lock_goes_is_repaired(teacher, tmp_path):
    task = ranking_task(teacher)
    info = teacher_cache.CacheInfo()
    key = teacher_cache.key_of(teacher_cache.describe(teacher, task.fingerprint(), task.rt))
    (tmp_path / "ranking" / f"{key}.lock" / "junk").mkdir(parents=True)
    teacher_cache.teacher_outputs(task, teacher, task.rt, str(tmp_path), True, info)
    assert info.misses == 1 and (tmp_path / "ranking" / f"{key}.lock").is_file()
    again = teacher_cache.CacheInfo()
    teacher_cache.teacher_outputs(task, teacher, task.rt, str(tmp_path), True, again)
    assert again.hits == 1


def test_an_unusable_cache_dir_runs_the_teacher_uncached(teacher, tmp_path, caplog):
    task = ranking_task(teacher)
    want = np.array(teacher_cache.teacher_outputs(task, teacher, task.rt, None, False, teacher_cache.CacheInfo())["scores"])
    (tmp_path / "file").write_text("x")
    for where in ("/dev/null", str(tmp_path / "file")):
        info = teacher_cache.CacheInfo()
        got = teacher_cache.teacher_outputs(task, teacher, task.rt, where, True, info)
        assert np.array_equal(np.array(got["scores"]), want) and info.misses == 1
    assert "runs without the cache" in caplog.text


@pytest.mark.parametrize("fails", ["shard", "assemble", "publish"])
def test_a_full_disk_while_caching_keeps_the_computed_outputs(teacher, tmp_path, monkeypatch, caplog, fails):
    """No space for the shards, the entry's files or its completion mark: the outputs computed are used (uncached),
    nothing is left in the cache dir, and the next run with space caches them."""
    import errno

    task = ranking_task(teacher)
    want = np.array(teacher_cache.teacher_outputs(task, teacher, task.rt, None, False, teacher_cache.CacheInfo())["scores"])

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    target = {"shard": "kdrun.teacher_cache._save", "assemble": "numpy.lib.format.open_memmap",
              "publish": "kdrun.teacher_cache.publish"}[fails]
    with monkeypatch.context() as m:
        m.setattr(target, full)
        info = teacher_cache.CacheInfo()
        got = teacher_cache.teacher_outputs(task, teacher, task.rt, str(tmp_path), True, info)
    assert np.array_equal(np.array(got["scores"]), want)
    assert "No space left on device" in caplog.text and "in memory" in caplog.text
    left = {p.name.split(".")[-1] for p in (tmp_path / "ranking").iterdir()}
    assert not any(x.startswith("tmp") for x in left), left  # no staging dir left behind
    again = teacher_cache.CacheInfo()
    teacher_cache.teacher_outputs(task, teacher, task.rt, str(tmp_path), True, again)
    third = teacher_cache.CacheInfo()
    teacher_cache.teacher_outputs(task, teacher, task.rt, str(tmp_path), True, third)
    assert third.hits == 1


_RACER = """
import sys, time, torch
sys.path.insert(0, {tests!r})
import support as t
from kdrun import teacher_cache
from kdrun.models import load_teacher
from kdrun.runtime import make_runtime
from kdrun.tasks.ranking import RankingTask

class Slow(RankingTask):
    def teacher_outputs(self, teacher):
        time.sleep(3)  # a long teacher pass: the other process arrives while this one computes
        return super().teacher_outputs(teacher)

teacher = load_teacher(path={minilm!r}, kind="bi_encoder", **t.TEACHER)
task = Slow(t.ranking_data(), teacher, None, make_runtime("cpu", "fp32"), eval_batch_size=4)
info = teacher_cache.CacheInfo()
teacher_cache.teacher_outputs(task, teacher, task.rt, {cache!r}, True, info)
print("MISSES", info.misses, "HITS", info.hits)
"""


def test_parallel_jobs_compute_a_missing_entry_once(tmp_path, tiny_bert):
    import subprocess
    import sys
    from pathlib import Path

    code = _RACER.format(tests=str(Path(__file__).parents[1]), minilm=tiny_bert, cache=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
    lines = sorted(o.strip().splitlines()[-1] for o, _ in outs)
    assert lines == ["MISSES 0 HITS 1", "MISSES 1 HITS 0"], lines


def test_a_tokenizers_fingerprint_does_not_change_when_it_is_called(minilm_dir):  # (a real tokenizer)
    """Fast tokenizers serialise the last call's truncation and padding: the cache keys must not see them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    before = store.tokenizer_fingerprint(tok)
    tok(["a question", "a longer answer than that"], truncation=True, max_length=8, padding=True)
    assert store.tokenizer_fingerprint(tok) == before
