"""Causal LM: packed token blocks -> next-token logits; held-out perplexity (lower is better), the student's top-1
agreement with the teacher and KL(teacher || student) per token. Teacher and student share a tokenizer; a precomputed
teacher keeps its top-k log-probs per token. The torch side is task.py."""
from __future__ import annotations

import importlib
from typing import Any, Optional

from kdrun.config import enum_value
from kdrun.errors import ConfigError
from kdrun.tasks.base import Family


class CausalLMFamily(Family):
    name = "causal_lm"
    metrics = ("perplexity", "nll", "top1_agreement", "kl_to_teacher")
    primary, direction = "perplexity", "min"
    teacher_kinds = ("causal_lm",)
    several_teachers = False
    sparse_teacher = True
    task_class = "kdrun.tasks.causal_lm.task.CausalLMTask"

    def check(self, cfg: Any) -> None:
        if cfg.data.block_size < 2:
            raise ConfigError(f"data.block_size={cfg.data.block_size} must be >= 2")
        if enum_value(cfg.teacher.mode) == "precompute" and not cfg.teacher.top_k:
            raise ConfigError("teacher.mode=precompute for a causal LM stores the teacher's top-k log-probs per "
                              "token; set teacher.top_k (e.g. 64), or use teacher.mode=online")

    def build_student(self, *, teacher, teacher_source: Optional[str] = None, dropout: Optional[float] = None, arch=None,
                      pooling=None, similarity=None, dim=None, max_length=None, **node):
        """A smaller LM of the teacher's vocabulary: a slice of its layers, resized, or a checkpoint of the same
        tokenizer (checked: token distributions are compared position by position)."""
        from kdrun.models import finish_student, hf_student
        from kdrun.models.causal_lm import CausalLM

        model, tok = hf_student(**node, teacher=teacher, model_class="AutoModelForCausalLM")
        if tok.get_vocab() != teacher.tokenizer.get_vocab():
            raise ConfigError(f"student '{node.get('name') or node.get('path')}' and teacher '{teacher.source}' use "
                              "different tokenizers; causal-LM distillation compares token distributions, so they "
                              "must share one (use student.init=teacher_layers or scratch, or a student of the same "
                              "family)")
        return finish_student(CausalLM(model, tok), dropout)


FAMILY = CausalLMFamily()


def __getattr__(name: str):  # the torch side, on first use
    if name.startswith("__") or name == "task":
        raise AttributeError(name)
    return getattr(importlib.import_module("kdrun.tasks.causal_lm.task"), name)
