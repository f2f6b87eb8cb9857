"""Causal LM: packed token blocks or conversations (loss on the completions) -> next-token logits; held-out
perplexity (lower is better), the student's top-1 agreement with the teacher and KL(teacher || student) per token, on
the held-out data and on the student's own samples. Teacher and student share a tokenizer; a precomputed teacher keeps
its top-k log-probs per token; train.on_policy trains on the student's own continuations (on_policy.py). The torch
side is task.py."""
from __future__ import annotations

import importlib
from typing import Any, Optional

from kdrun.names import enum_value
from kdrun.errors import ConfigError
from kdrun.tasks.base import Family


class CausalLMFamily(Family):
    name = "causal_lm"
    metrics = ("perplexity", "nll", "top1_agreement", "kl_to_teacher", "kl_to_teacher_on_samples")
    primary, direction = "perplexity", "min"
    teacher_kinds = ("causal_lm",)
    several_teachers = False
    sparse_teacher = True
    task_class = "kdrun.tasks.causal_lm.task.CausalLMTask"

    def _check_blocks(self, cfg: Any) -> None:
        if cfg.data.block_size < 2:
            raise ConfigError(f"data.block_size={cfg.data.block_size} must be >= 2")
        if enum_value(cfg.teacher.mode) == "precompute" and not cfg.teacher.top_k:
            raise ConfigError("teacher.mode=precompute for a causal LM stores the teacher's top-k log-probs per "
                              "token; set teacher.top_k (e.g. 64), or use teacher.mode=online")

    def step_hook(self, task, train: Any, runtime):
        """train.on_policy: the evaluation's KL on the student's own samples (eval_samples), and with fraction > 0
        the training step's on-policy generation (on_policy.py)."""
        from types import SimpleNamespace

        settings = SimpleNamespace(**{k: train.on_policy[k] for k in ("fraction", "temperature", "top_p",
                                                                        "max_new_tokens", "eval_samples")},
                                   seed=int(train.seed))
        task.sampling = settings
        if not settings.fraction:
            return None
        from kdrun.tasks.causal_lm.on_policy import OnPolicy

        return OnPolicy(fraction=settings.fraction, temperature=settings.temperature, top_p=settings.top_p,
                        max_new_tokens=settings.max_new_tokens, seed=settings.seed,
                        eos_id=task.teacher.tokenizer.eos_token_id, pad_id=task.pad_id, runtime=runtime)

    def check(self, cfg: Any) -> None:
        p = cfg.train.on_policy
        if not 0.0 <= p.fraction <= 1.0:
            raise ConfigError(f"train.on_policy.fraction={p.fraction} must be in [0, 1] (the share of each batch's "
                              "prompts the student continues)")
        if p.fraction and enum_value(cfg.teacher.mode) != "online":
            raise ConfigError(f"train.on_policy.fraction={p.fraction}: the teacher scores the student's own samples, "
                              f"so it must run online; set teacher.mode=online (it is {enum_value(cfg.teacher.mode)})")
        if not 0.0 < p.top_p <= 1.0 or p.temperature < 0 or p.max_new_tokens < 1 or p.eval_samples < 0:
            raise ConfigError(f"train.on_policy: top_p={p.top_p} must be in (0, 1], temperature={p.temperature} "
                              f">= 0 (0: greedy), max_new_tokens={p.max_new_tokens} >= 1, eval_samples="
                              f"{p.eval_samples} >= 0")
        self._check_blocks(cfg)

    def build_student(self, *, teacher, teacher_source: Optional[str] = None, dropout: Optional[float] = None, arch=None,
                      pooling=None, similarity=None, dim=None, projection_init=None, query_length=None, max_length=None,
                      **node):
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
