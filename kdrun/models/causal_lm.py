"""A causal LM (any transformers AutoModelForCausalLM) that returns next-token logits for packed blocks,
or, for a teacher with `top_k`, only its top-k log-probabilities per position."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch
from torch import nn

Features = Dict[str, torch.Tensor]


class CausalLM(nn.Module):
    def __init__(self, model: nn.Module, tokenizer, top_k: int = 0):
        super().__init__()
        self.model, self.tokenizer, self.top_k = model, tokenizer, top_k

    def request(self, outputs: set) -> None:
        """Loss terms read logits (or the teacher's top-k) only: nothing extra to produce."""

    def logits(self, features: Features) -> torch.Tensor:
        """[B, L-1, V]: position i predicts token i+1 of each block (right-padded rows carry an attention mask)."""
        return self.model(input_ids=features["input_ids"], attention_mask=features.get("attention_mask")).logits[:, :-1]

    def forward(self, features: Features) -> Dict[str, torch.Tensor]:
        logits = self.logits(features)
        if not self.top_k:
            return {"logits": logits}
        return topk_logprobs(logits, self.top_k)

    def save(self, directory: str | Path) -> None:
        """Hugging Face format: AutoModelForCausalLM and AutoTokenizer load it back."""
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        (Path(directory) / "kdrun_scorer.json").write_text(json.dumps({"kind": "causal_lm"}))


def topk_logprobs(logits: torch.Tensor, k: int) -> Dict[str, torch.Tensor]:
    """The k most likely tokens per position as log-probabilities over the full vocabulary (so the
    log-normaliser is folded in): {"topk_logprobs": [..., k] fp32, "topk_ids": [..., k] int64}."""
    logits = logits.float()
    values, ids = logits.topk(k, dim=-1)  # the same arithmetic as the cache (CausalLMTask.teacher_outputs)
    return {"topk_logprobs": values - torch.logsumexp(logits, dim=-1, keepdim=True), "topk_ids": ids}
