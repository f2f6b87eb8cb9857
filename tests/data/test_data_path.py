"""The data and step path: tokenise once, length groups, bucket shards, real-token counts, fused AdamW, SDPA."""
import itertools
import random

import pytest
import torch

from kdrun.data import tokens
from kdrun.data.batching import BucketBatchSampler

from support import CONF, f32_close


def _area(groups, lengths, multiple):
    return sum(len(g) * -(-max(lengths[i] for i in g) // multiple) * multiple for g in groups)


def _brute_force(lengths, max_groups, multiple):
    """The least padded area over every split of the sorted distinct rounded lengths into <= max_groups runs."""
    rounded = sorted({-(-n // multiple) * multiple for n in lengths})
    best = float("inf")
    for g in range(1, min(max_groups, len(rounded)) + 1):
        for cuts in itertools.combinations(range(1, len(rounded)), g - 1):
            bounds = [0, *cuts, len(rounded)]
            area = 0
            for lo, hi in zip(bounds, bounds[1:]):
                keep = set(rounded[lo:hi])
                members = [n for n in lengths if -(-n // multiple) * multiple in keep]
                area += len(members) * rounded[hi - 1]
            best = min(best, area)
    return best


def test_bucket_sampler_covers_everything_once_and_reshuffles():
    lengths = [i % 37 for i in range(1000)]
    s = BucketBatchSampler(lengths, batch_size=32, seed=0, chunk_batches=5)
    e1, e2 = list(s), list(s)
    assert len(e1) == len(s) == 1000 // 32
    flat = [i for b in e1 for i in b]
    assert len(flat) == len(set(flat)) == 31 * 32
    assert all(len(b) == 32 for b in e1)
    assert e1 != e2  # a new order each epoch
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in e1) / len(e1)
    assert spread < 10  # similar lengths within a batch (random batches would span ~36)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_groups,multiple", [(1, 8), (2, 8), (3, 1), (4, 8), (8, 1)])
def test_length_groups_are_optimal_and_cover_every_row_once(seed, max_groups, multiple):
    rng = random.Random(seed)
    rows = rng.randint(1, 40 if multiple > 1 else 16)  # (the brute force grows combinatorially with distinct lengths)
    lengths = [rng.choice([rng.randint(3, 12), rng.randint(20, 90)]) for _ in range(rows)]
    groups = tokens.length_groups(lengths, max_groups, multiple)
    assert 1 <= len(groups) <= max_groups
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert _area(groups, lengths, multiple) == _brute_force(lengths, max_groups, multiple)


def test_grouped_padding_leaves_bi_encoder_and_colbert_scores_unchanged(tiny_bert):
    """Length groups only save padding: a bi-encoder's and a late-interaction model's scores match plain padding."""
    from transformers import AutoModel, AutoTokenizer

    from kdrun.models.encoders import BiEncoder, LateInteraction

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    enc = AutoModel.from_pretrained(tiny_bert).eval()
    queries = ["hi", "what is the capital of france and why is it paris"]
    passages = [["hello there", "the capital of france is paris, a city on the seine with a long history"],
                ["paris", "a very long passage " * 8]]
    torch.manual_seed(0)
    for model in (BiEncoder(enc, tok, "mean", "dot", 64), LateInteraction(enc, tok, 16, 64)):
        model.eval()
        plain = model(model.featurize(queries, passages))["scores"]
        model.token_table, _ = tokens.pretokenize(tok, [t for q, ps in zip(queries, passages) for t in (q, *ps)], 64,
                                                  None, "test")
        model.max_groups, model.pad_multiple = 4, 1
        feats = model.featurize(queries, passages)
        assert "groups" in feats["passage"] and len(feats["passage"]["groups"]) > 1
        grouped = model(feats)["scores"]
        assert f32_close(grouped, plain), (grouped, plain)  # other padding: equal to float32 rounding
        model.token_table = None


def test_pretokenize_matches_the_tokenizer_and_is_cached_through_datasets(tmp_path, minilm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    texts = ["the cat sat", "on the mat", "the cat sat", "a " * 300]
    table, hit = tokens.pretokenize(tok, texts, 32, tmp_path, "tok-a")
    assert not hit and len(table) == 3
    assert table(texts) == tok(texts, truncation=True, max_length=32)["input_ids"]
    assert len(table(["a " * 300])[0]) == 32  # truncated
    assert list(tmp_path.glob("tokens-*.arrow")), "the datasets map wrote its cache file"
    again, hit = tokens.pretokenize(tok, texts, 32, tmp_path, "tok-a")
    assert hit and again(texts) == table(texts)
    _, hit = tokens.pretokenize(tok, texts, 16, tmp_path, "tok-a")  # another length limit: another entry
    assert not hit
    assert table(["never seen before"]) == tok(["never seen before"], truncation=True, max_length=32)["input_ids"]


def test_pad_builds_masks_token_types_and_multiples(minilm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    ids = [[101, 7, 102], [101, 7, 8, 9, 10, 102]]
    f = tokens.pad(tok, ids, multiple=8, max_groups=1)
    assert f["input_ids"].shape == (2, 8) and f["attention_mask"].sum().item() == 9
    assert f["input_ids"][0, 3:].eq(tok.pad_token_id).all() and "token_type_ids" in f
    assert tokens.token_counts({"query": f, "passage": f}) == (18, 32)
    assert tokens.token_counts({"input_ids": torch.zeros(2, 5, dtype=torch.long)}) == (10, 10)  # packed LM blocks


def test_bucket_shards_are_whole_buckets_of_one_order():
    lengths = [random.Random(i).randint(1, 100) for i in range(203)]
    whole = list(BucketBatchSampler(lengths, 8, seed=3))
    shards = [list(BucketBatchSampler(lengths, 8, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == len(whole) // 2
    assert shards[0] == whole[0::2][:len(shards[0])] and shards[1] == whole[1::2][:len(shards[1])]
    assert not {i for b in shards[0] for i in b} & {i for b in shards[1] for i in b}
    assert len(BucketBatchSampler(lengths, 8, seed=3, rank=1, world_size=2)) == len(shards[1])


def test_adamw_is_fused_on_cpu():
    from kdrun.runtime import make_runtime
    from kdrun.train import make_optim

    optim = make_optim(torch.nn.Linear(4, 4), make_runtime("cpu", "fp32"), 10, lr=1e-3, weight_decay=0.01,
                       betas=[0.9, 0.999], eps=1e-8, schedule="linear", warmup_ratio=0.1, max_grad_norm=1.0)
    assert optim.optimizer.defaults["fused"] is True


@pytest.mark.parametrize("hardware,at_least", [([], 0.75), (["hardware.pad_to_multiple_of=1", "hardware.length_groups=8"], 0.9)])
def test_the_demo_data_is_mostly_real_tokens_and_the_student_uses_sdpa(tmp_path, monkeypatch, hardware, at_least):
    """The default job's batches: most of the student's tokens are real, not padding (bucketed and length-grouped
    vs 19% with shuffled batches padded to their longest text)."""
    from hydra import compose, initialize_config_dir

    from kdrun import pipeline
    from kdrun.config import register

    monkeypatch.setenv("KDRUN_CACHE", str(tmp_path))
    register()
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("config", overrides=hardware)
    rt = pipeline.runtime(cfg)
    family, data = pipeline.load_data(cfg)
    teacher, source = pipeline.build_teachers(cfg, data, rt)
    student = pipeline.build_student(cfg, teacher, source, rt)
    assert pipeline._hf_model(student).config._attn_implementation == "sdpa"
    task = family.task(data, teacher, student, rt, 128)
    metrics = task.prepare_student(student, pipeline._node(cfg.hardware))
    assert metrics["data/distinct_texts"] > 1000 and metrics["data/tokenize_cache_hit"] == 0.0
    collate, examples = task.collate(online=False), task.attach({"scores": torch.zeros(len(data.train), 2)})
    real = total = 0
    for batch in BucketBatchSampler(task.lengths(), cfg.train.batch_size, seed=0):
        r, t = tokens.token_counts(collate([examples[i] for i in batch])["student"])
        real, total = real + r, total + t
    assert real / total >= at_least
