"""A sequence classifier (any transformers AutoModelForSequenceClassification) that returns a dict of
outputs: logits always; hidden states, attentions and the classifier's input features when the loss
terms ask for them (`outputs`)."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from kdrun import progress
from kdrun.errors import ModelLoadError
from kdrun.data.batching import to_device
from kdrun.models.encoders import run_groups, tokenize, tokenize_groups

Features = Dict[str, torch.Tensor]


def classifier_head(model: nn.Module) -> nn.Linear:
    """The final linear layer (BERT-like: `classifier`, decoder-style: `score`)."""
    for name in ("classifier", "score"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return head
        if isinstance(head, nn.Module) and isinstance(getattr(head, "out_proj", None), nn.Linear):
            return head.out_proj  # RoBERTa-style head: dense -> out_proj
    raise ModelLoadError(f"cannot find the classification head (`classifier` or `score`) of a {type(model).__name__}")


SCORES_ATTENTION = "kdrun_scores"  # an attention implementation that returns raw scores as its "attentions"


def scores_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention (transformers' own math) that returns the raw pre-softmax scores, q k^T * scaling plus the
    additive mask, in place of the probabilities: what TinyBERT's paper distils (attention_mse form=scores)."""
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.size(-1) ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = nn.functional.dropout(torch.softmax(scores, dim=-1), p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), scores


def _register_scores_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, eager_mask

    if SCORES_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(SCORES_ATTENTION, scores_attention)
        AttentionMaskInterface.register(SCORES_ATTENTION, eager_mask)  # the additive float mask eager attention gets


def no_attention_dropout(model: nn.Module) -> int:
    """Set the dropout on attention probabilities to 0 in every attention module (BERT's `*SelfAttention.dropout`,
    DistilBERT's `MultiHeadSelfAttention.dropout`, decoders' float `attention_dropout`); returns how many."""
    changed = 0
    for module in model.modules():
        if not type(module).__name__.endswith("Attention"):
            continue
        if isinstance(getattr(module, "dropout", None), nn.Dropout):
            module.dropout.p = 0.0
            changed += 1
        elif isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
            changed += 1
    return changed


def mix_heads(label_logits: torch.Tensor, kd_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """A dual-head student's prediction, as logits (log-probabilities): log(alpha p_label + (1 - alpha) p_kd)."""
    parts = [torch.log_softmax(label_logits.float(), -1) + math.log(alpha) if alpha > 0 else None,
             torch.log_softmax(kd_logits.float(), -1) + math.log(1 - alpha) if alpha < 1 else None]
    return torch.logsumexp(torch.stack([p for p in parts if p is not None]), dim=0)


class SequenceClassifier(nn.Module):
    """`dual_head` (DHO, Kang et al. 2025, "Simple Semi-supervised Knowledge Distillation from Vision-Language
    Models via Dual-Head Optimization"): a second linear head on the same features (made when a loss term asks for
    "dual_head": loss=dual_head, which sets the share) learns from the teacher while the model's own head learns
    from the labels; the prediction mixes the two heads' probabilities with the label head's share `dual_head`
    (outputs "logits" = that mixture as log-probabilities, "logits_label", "logits_kd")."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int, dual_head: Optional[float] = None):
        super().__init__()
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.outputs: set = set()  # extra outputs: "hidden_states", "attentions", "features"
        self._features = None
        head = classifier_head(model)
        head.register_forward_pre_hook(self._keep_features)
        self.dual_head = dual_head
        self.kd_head = copy.deepcopy(head) if dual_head is not None else None  # starts as the label head

    def _keep_features(self, module, args):
        if "features" in self.outputs or self.kd_head is not None:
            self._features = args[0]

    def _logits(self, features: Features) -> torch.Tensor:
        logits = self.model(**features).logits.float()
        if self.kd_head is None:
            return logits
        return mix_heads(logits, self.kd_head(self._features).float(), self.dual_head)

    def request(self, outputs: set) -> None:
        """Ask for extra outputs. Attention maps need eager attention (SDPA does not return them), and no attention
        dropout: transformers returns the probabilities after it, so a training student's rows would be noise that
        no longer sums to 1, compared against the teacher's clean rows. Hidden-state dropout stays."""
        self.outputs = set(outputs) & {"hidden_states", "attentions", "attention_scores", "features"}
        if "dual_head" in outputs and self.kd_head is None:  # loss=dual_head: a second head, a copy of the first
            self.kd_head = copy.deepcopy(classifier_head(self.model))
            self.dual_head = 0.5 if self.dual_head is None else self.dual_head
        if {"attentions", "attention_scores"} <= self.outputs:
            raise ValueError("attention probabilities and raw attention scores cannot both be distilled in one run")
        if "attention_scores" in self.outputs:  # returned as "attentions", raw
            _register_scores_attention()
            self.model.set_attn_implementation(SCORES_ATTENTION)
            no_attention_dropout(self.model)
        elif "attentions" in self.outputs:
            self.model.set_attn_implementation("eager")
            no_attention_dropout(self.model)

    @property
    def num_labels(self) -> int:
        return self.model.config.num_labels

    exact = False  # teachers: batch-invariant padding (see encoders.tokenize_groups)
    token_table = None  # students: texts tokenised once (kdrun.data.tokens), set by the pipeline
    pad_multiple = 8

    def featurize(self, texts: Sequence[str]) -> Features:
        if self.exact:
            return tokenize_groups(self.tokenizer, texts, self.max_length)
        if self.token_table is not None:  # one padded tensor: token-level terms line positions up across models
            from kdrun.data import tokens

            return tokens.pad(self.tokenizer, self.token_table(texts), self.pad_multiple, max_groups=1)
        return tokenize(self.tokenizer, texts, self.max_length, pad_to_multiple_of=self.pad_multiple)

    def forward(self, features: Features) -> Dict[str, torch.Tensor]:
        if "groups" in features:  # a teacher's own tokenisation (token-level terms share the student's instead)
            return run_groups(self._forward, features)
        return self._forward(features)

    def _forward(self, features: Features) -> Dict[str, torch.Tensor]:
        maps = bool({"attentions", "attention_scores"} & self.outputs)
        out = self.model(**features, output_hidden_states="hidden_states" in self.outputs, output_attentions=maps)
        result = {"logits": out.logits.float()}
        if self.kd_head is not None:
            kd = self.kd_head(self._features).float()
            result.update(logits_label=result["logits"], logits_kd=kd,
                          logits=mix_heads(result["logits"], kd, self.dual_head))
        if "hidden_states" in self.outputs:
            result["hidden_states"] = out.hidden_states
        if maps:
            result["attentions"] = out.attentions  # probabilities, or raw scores (attention_scores)
        if "features" in self.outputs:
            result["features"] = self._features
        return result

    @torch.inference_mode()
    def predict_logits(self, texts: List[str], batch_size: int, device) -> torch.Tensor:
        """[N, C] fp32 logits, in the order of `texts` (batched by length: little padding)."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.num_labels)
        for i in progress.bar(range(0, len(order), batch_size), desc="evaluate", unit="batch"):
            idx = order[i:i + batch_size]
            feats = to_device(self.featurize([texts[j] for j in idx]), device)
            out[idx] = run_groups(self._logits, feats).cpu()
        return out

    def save(self, directory: str | Path) -> None:
        """Hugging Face format: AutoModelForSequenceClassification and AutoTokenizer load it back (with the
        class names its config carries)."""
        d = Path(directory)
        self.model.save_pretrained(d)
        self.tokenizer.save_pretrained(d)
        info = {"kind": "classifier", "max_length": self.max_length}
        if self.kd_head is not None:  # the Hugging Face model holds the label head; the teacher's head goes beside it
            torch.save(self.kd_head.state_dict(), d / "kdrun_kd_head.pt")
            info["dual_head"] = self.dual_head
        (d / "kdrun_scorer.json").write_text(json.dumps(info))
