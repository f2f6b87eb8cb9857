"""kdrun's tiny random models (kdrun/models/tiny.py): built locally from a fixed seed (the same bytes on every machine
and every build), loaded by transformers with every weight in place, with the real offline models' tokenizers and
depths at width 32; named like hub models (kdrun-tiny/...), never looked up on the hub."""
import hashlib
from pathlib import Path

import pytest
import torch

from kdrun.errors import ModelLoadError
from kdrun.models import tiny
from kdrun.models.hub import resolve_source


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_tiny_model_is_the_same_bytes_whoever_builds_it_and_leaves_the_random_state_alone(tmp_path, monkeypatch,
                                                                                          tiny_bert):
    monkeypatch.setenv("KDRUN_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    again = Path(tiny.ensure("kdrun-tiny/bert"))
    assert torch.equal(torch.get_rng_state(), state)  # a run's seed is not moved by building its teacher
    assert again != Path(tiny_bert) and again.parent == tmp_path / "cache" / "tiny"
    assert _sha(again / "model.safetensors") == _sha(Path(tiny_bert) / "model.safetensors")
    assert (again / "kdrun_complete").is_file() and tiny.ensure("kdrun-tiny/bert") == str(again)  # built once


def test_the_tiny_bert_is_minilms_tokenizer_and_depth_at_width_32(tiny_bert, minilm_dir):
    from transformers import AutoModel, AutoTokenizer

    model, info = AutoModel.from_pretrained(tiny_bert, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # every weight is in the file
    real = AutoModel.from_pretrained(minilm_dir).config
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (real.num_hidden_layers, 32)
    assert AutoTokenizer.from_pretrained(tiny_bert).get_vocab() == AutoTokenizer.from_pretrained(minilm_dir).get_vocab()
    assert model.config.vocab_size == real.vocab_size
    assert sum(p.numel() for p in model.parameters()) < 1.2e6  # the embeddings are most of it: a second to run


def test_the_tiny_llama_is_smollm2s_tokenizer_chat_template_and_depth(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(tiny_llama, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 32  # SmolLM2-135M's depth
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query attention, as SmolLM2
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert len(tok) == model.config.vocab_size == 49152 and tok.eos_token == "<|im_end|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in chat  # SmolLM2's chat template came along
    with torch.inference_mode():
        logits = model(**tok(["a tiny test"], return_tensors="pt")).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()


def test_tiny_names_are_built_here_never_asked_of_the_hub_and_a_path_wins(tmp_path, monkeypatch, tiny_bert):
    monkeypatch.setenv("KDRUN_CACHE", str(Path(tiny_bert).parents[1]))  # the session's cache: already built
    assert resolve_source("teacher", "kdrun-tiny/bert", None) == str(Path(tiny_bert))
    assert resolve_source("teacher", "kdrun-tiny/bert", tiny_bert) == tiny_bert  # teacher.path wins over the name
    with pytest.raises(ModelLoadError, match=r"kdrun-tiny/gpt: kdrun's tiny models are \['kdrun-tiny/bert', "
                                             r"'kdrun-tiny/llama'\]"):
        resolve_source("student", "kdrun-tiny/gpt", None)
    assert tiny.is_tiny("kdrun-tiny/bert") and not tiny.is_tiny("sentence-transformers/all-MiniLM-L6-v2")
    assert not tiny.is_tiny(None)


def test_under_torchrun_only_rank_0_builds_a_tiny_model_and_the_others_wait_for_it(tmp_path, monkeypatch):
    """Once DDP's process group is up, transformers' save_pretrained writes weights and config on rank 0 only: a tiny
    model built by rank 1 was a tokenizer with nothing else, published for every later run (found by two test
    processes, one of them torchrun's rank 1, building it at once). Rank 1 now waits for rank 0's entry."""
    import threading
    import time

    from kdrun import store

    monkeypatch.setenv("KDRUN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ModelLoadError, match="rank 1: waited 0 s for rank 0 to write"):
        store.built_by_rank_0(tmp_path / "cache" / "tiny" / "bert-v1", timeout=0.0)
    got = []
    waiting = threading.Thread(target=lambda: got.append(tiny.ensure("kdrun-tiny/bert")))
    waiting.start()
    time.sleep(0.5)
    assert waiting.is_alive() and not (tmp_path / "cache" / "tiny" / "bert-v1").exists()  # rank 1 builds nothing
    monkeypatch.setenv("RANK", "0")
    built = tiny.ensure("kdrun-tiny/bert")  # rank 0's
    waiting.join(timeout=60)
    assert got == [built] and (Path(built) / "config.json").is_file() and (Path(built) / "model.safetensors").is_file()
