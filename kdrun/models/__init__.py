"""Builders named by `_target_` in conf/teacher and conf/student: config values in, scoring modules out."""
from __future__ import annotations

from typing import List, Optional

from torch import nn

from kdrun.errors import ConfigError
from kdrun.models.encoders import BiEncoder, CrossEncoder
from kdrun.models.hub import load_pretrained, resolve_source


def build_teacher(*, name: Optional[str], path: Optional[str], kind: str, pooling: str, similarity: str,
                  label_index: int, max_length: int) -> nn.Module:
    """A frozen scorer in eval mode: requires_grad is off for every parameter."""
    source = resolve_source("teacher", name, path)
    if kind == "cross_encoder":
        model, tok = load_pretrained("teacher", source, "AutoModelForSequenceClassification")
        n_labels = model.config.num_labels
        if not -n_labels <= label_index < n_labels:
            raise ConfigError(f"teacher.label_index={label_index}: '{source}' has {n_labels} output logits")
        teacher: nn.Module = CrossEncoder(model, tok, label_index, max_length)
    else:
        model, tok = load_pretrained("teacher", source, "AutoModel")
        teacher = BiEncoder(model, tok, pooling, similarity, max_length)
    teacher.source = source
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def build_student(*, name: Optional[str], path: Optional[str], init: str, layers: Optional[List[int]], pooling: str,
                  similarity: str, max_length: int, teacher_source: Optional[str] = None) -> BiEncoder:
    """A trainable bi-encoder: a pretrained encoder, or the teacher's embeddings + a subset of its layers."""
    if init == "teacher_layers":
        if name or path:
            source = resolve_source("student", name, path)
        elif teacher_source:
            source = teacher_source
        else:
            raise ConfigError("student.init=teacher_layers needs the teacher's source (teacher.name or teacher.path)")
        model, tok = load_pretrained("student", source, "AutoModel")
        keep_layers(model, list(layers or []))
    else:
        model, tok = load_pretrained("student", resolve_source("student", name, path), "AutoModel")
    student = BiEncoder(model, tok, pooling, similarity, max_length)
    student.train()
    return student


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
