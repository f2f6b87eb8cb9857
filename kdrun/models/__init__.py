"""Loading models: teachers by kind (frozen), the students' model pieces (a checkpoint, a slice of the teacher's
layers, the teacher's architecture resized), with one clear error when a model cannot be loaded offline.

Every model returns a dict of outputs (ranking: "scores"; classification and causal LM: "logits", and what the loss
terms request). Which teacher and student a run needs is its task family's choice (kdrun/tasks/); this package only
loads. Teachers come back frozen: eval mode, requires_grad off everywhere.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import List, Optional

from torch import nn

from kdrun.errors import ConfigError
from kdrun.models.encoders import BiEncoder, CrossEncoder, LateInteraction, load_projection
from kdrun.models.hub import load_pretrained, resolve_source


def _freeze(teacher: nn.Module, source: str) -> nn.Module:
    teacher.source = source
    teacher.exact = True  # batch-invariant padding: online, cached and score-file outputs agree
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def load_teacher(*, name: Optional[str], path: Optional[str], gguf_file: Optional[str], kind: str, pooling: str,
                 similarity: str, label_index: int, max_length: int, top_k: int) -> nn.Module:
    """A frozen teacher of the given kind, from a local directory or a hub name."""
    source = resolve_source("teacher", name, path, gguf_file)
    if kind == "cross_encoder":
        model, tok = load_pretrained("teacher", source, "AutoModelForSequenceClassification")
        n_labels = model.config.num_labels
        if not -n_labels <= label_index < n_labels:
            raise ConfigError(f"teacher.label_index={label_index}: '{source}' has {n_labels} output logits")
        return _freeze(CrossEncoder(model, tok, label_index, max_length), source)
    if kind == "bi_encoder":
        model, tok = load_pretrained("teacher", source, "AutoModel")
        return _freeze(BiEncoder(model, tok, pooling, similarity, max_length), source)
    if kind == "classifier":
        from kdrun.models.classifier import SequenceClassifier

        model, tok = load_pretrained("teacher", source, "AutoModelForSequenceClassification")
        return _freeze(SequenceClassifier(model, tok, max_length), source)
    if kind == "causal_lm":
        from kdrun.models.causal_lm import CausalLM

        model, tok = load_pretrained("teacher", source, "AutoModelForCausalLM", gguf_file=gguf_file)
        return _freeze(CausalLM(model, tok, top_k), source)
    raise ConfigError(f"teacher.kind={kind}: unknown")


def has_trained_head(source: str, model: nn.Module) -> bool:
    """Whether the source's weights contain the classification head (not a freshly initialised one)."""
    return _head_in_checkpoint(source, model)


def _head_in_checkpoint(source: str, model: nn.Module) -> bool:
    """Whether the source's weights contain the classification head (not a freshly initialised one)."""
    from safetensors import safe_open

    from kdrun.models.classifier import classifier_head

    files = sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else []
    if not files:
        return True  # a hub name or .bin weights: trust the user's choice of teacher
    head = classifier_head(model)
    suffix = next(n for n, m in model.named_modules() if m is head) + ".weight"
    for f in files:
        with safe_open(str(f), "pt") as st:
            if any(k.endswith(suffix) for k in st.keys()):
                return True
    return False


def finish_student(student: nn.Module, dropout: Optional[float] = None) -> nn.Module:
    """Trainable and in training mode; `dropout` (student.dropout) sets every dropout probability (e.g. 0: steps
    without randomness; attention dropout reads the same modules' p)."""
    if dropout is not None:
        for module in student.modules():
            if isinstance(module, nn.Dropout):
                module.p = dropout
    student.requires_grad_(True)
    student.train()
    return student


def _load_tokenizer(spec: str, model):
    """student.tokenizer: a tokenizer other than the model's own; its ids must fit the model's embeddings."""
    import transformers

    local = Path(spec).expanduser()
    source = str(local) if local.is_dir() else resolve_source("student.tokenizer", spec, None)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ConfigError(f"student.tokenizer={spec}: cannot load a tokenizer there ({e})") from e
    if len(tok) > model.get_input_embeddings().num_embeddings:
        raise ConfigError(f"student.tokenizer={spec} has {len(tok)} tokens but the student's embeddings hold "
                          f"{model.get_input_embeddings().num_embeddings}; use a tokenizer of the student's family")
    return tok


_ARCH_CLASS = {"bi_encoder": "AutoModel", "late_interaction": "AutoModel",
               "cross_encoder": "AutoModelForSequenceClassification"}


def ranking_student(*, name, path, init, layers, scratch, tokenizer, arch, pooling, similarity, dim, max_length,
                    teacher_source, projection_init: str = "pca", query_length: int = 0):
    """A bi-encoder, late-interaction or cross-encoder student from any ranking teacher's source or its own."""
    import transformers

    own = resolve_source("student", name, path) if (name or path) else None
    source = own if (own or init == "pretrained") else teacher_source
    if source is None:
        raise ConfigError(f"student.init={init}: no model to start from; set student.path or student.name")
    model_class = _ARCH_CLASS[arch]
    kwargs = {"num_labels": 1, "ignore_mismatched_sizes": True} if arch == "cross_encoder" else {}
    if init == "scratch":
        config = resized_config(transformers.AutoConfig.from_pretrained(source, **({"num_labels": 1} if kwargs else {})),
                                **scratch)
        model = getattr(transformers, model_class).from_config(config)
        tok = transformers.AutoTokenizer.from_pretrained(source)
    else:
        model, tok = load_pretrained("student", source, model_class, **kwargs)
        if init == "teacher_layers":
            keep_layers(model, list(layers or []))
    if tokenizer:
        tok = _load_tokenizer(tokenizer, model)
    if arch == "cross_encoder":
        return CrossEncoder(model, tok, 0, max_length)
    if arch == "late_interaction":
        # a saved kdrun ColBERT (student.path) brings its trained projection; any other start gets a new one
        linear = load_projection(source) if init == "pretrained" and Path(source).is_dir() else None
        if linear is not None and linear.out_features != dim:
            raise ConfigError(f"student.dim={dim}: the ColBERT student in {source} projects to {linear.out_features} "
                              f"dimensions (colbert_linear.safetensors); set student.dim={linear.out_features}")
        return LateInteraction(model, tok, dim, max_length, linear, projection_init=projection_init,
                               query_length=query_length)
    return BiEncoder(model, tok, pooling, similarity, max_length)


def hf_student(*, name, path, init, layers, scratch, tokenizer, teacher, model_class: str, **kwargs):
    """(model, tokenizer) of a student that follows the teacher's transformers class (classifier, causal LM)."""
    import transformers

    teacher = getattr(teacher, "main", teacher)  # several teachers: the main one lends its model
    if init == "teacher_layers":  # an own copy of the teacher, then keep the listed layers
        model = copy.deepcopy(teacher.model)
        keep_layers(model, list(layers or []))
        tok = teacher.tokenizer
    elif init == "scratch":
        config = resized_config(teacher.model.config, **scratch)
        model, tok = getattr(transformers, model_class).from_config(config), teacher.tokenizer
    else:
        model, tok = load_pretrained("student", resolve_source("student", name, path), model_class, **kwargs)
    return model, (_load_tokenizer(tokenizer, model) if tokenizer else tok)


def resized_config(config, *, num_layers=None, hidden_size=None, num_heads=None, intermediate_size=None):
    """A copy of a transformers config with other sizes (the names BERT- and Llama-style configs share)."""
    config = copy.deepcopy(config)
    heads = num_heads or config.num_attention_heads
    hidden = hidden_size or config.hidden_size
    if hidden % heads:
        raise ConfigError(f"student.scratch: hidden_size={hidden} is not a multiple of num_heads={heads}")
    config.num_hidden_layers = num_layers or config.num_hidden_layers
    config.hidden_size, config.num_attention_heads = hidden, heads
    config.intermediate_size = intermediate_size or config.intermediate_size
    if getattr(config, "num_key_value_heads", None):  # grouped-query attention: kv heads must divide heads
        config.num_key_value_heads = max(k for k in range(1, heads + 1) if heads % k == 0
                                         and k <= config.num_key_value_heads)
    if getattr(config, "head_dim", None):
        config.head_dim = hidden // heads
    if hasattr(config, "layer_types") and config.layer_types:
        config.layer_types = config.layer_types[:config.num_hidden_layers]
    return config


def _layer_stack(model: nn.Module):
    """(parent module, attribute name, ModuleList) of the transformer's block stack."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layers", None)
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            parent_name, _, attr = mod_name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, attr, module
    raise ConfigError(f"student.init=teacher_layers: cannot find the layer stack of a {type(model).__name__}")


def keep_layers(model: nn.Module, layers: List[int]) -> None:
    """Keep embeddings and the listed blocks, in the given order (DistilBERT/TinyBERT-style init)."""
    parent, attr, stack = _layer_stack(model)
    if max(layers) >= len(stack):
        raise ConfigError(f"student.layers={layers}: the teacher has {len(stack)} layers (indices 0..{len(stack) - 1})")
    setattr(parent, attr, nn.ModuleList([stack[i] for i in layers]))
    for i, block in enumerate(getattr(parent, attr)):  # keep per-layer indices consistent where models use them
        for sub in block.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = i
    for key in ("num_hidden_layers", "n_layers"):
        if hasattr(model.config, key):
            setattr(model.config, key, len(layers))
    if getattr(model.config, "layer_types", None):  # per-layer attention types (transformers 5)
        model.config.layer_types = [model.config.layer_types[i] for i in layers]


__all__ = ["load_teacher", "has_trained_head", "ranking_student", "hf_student", "finish_student", "keep_layers",
           "resized_config"]
