"""A sequence classifier (any transformers AutoModelForSequenceClassification) that returns a dict of
outputs: logits always; hidden states, attentions and the classifier's input features when the loss
terms ask for them (`outputs`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from torch import nn

from kdrun import progress
from kdrun.errors import ModelLoadError
from kdrun.runtime import to_device
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


class SequenceClassifier(nn.Module):
    def __init__(self, model: nn.Module, tokenizer, max_length: int):
        super().__init__()
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.outputs: set = set()  # extra outputs: "hidden_states", "attentions", "features"
        self._features = None
        classifier_head(model).register_forward_pre_hook(self._keep_features)

    def _keep_features(self, module, args):
        if "features" in self.outputs:
            self._features = args[0]

    def request(self, outputs: set) -> None:
        """Ask for extra outputs. Attention maps need eager attention (SDPA does not return them), and no attention
        dropout: transformers returns the probabilities after it, so a training student's rows would be noise that
        no longer sums to 1, compared against the teacher's clean rows. Hidden-state dropout stays."""
        self.outputs = set(outputs) & {"hidden_states", "attentions", "attention_scores", "features"}
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
            out[idx] = run_groups(lambda f: self.model(**f).logits.float(), feats).cpu()
        return out

    def save(self, directory: str | Path) -> None:
        """Hugging Face format: AutoModelForSequenceClassification and AutoTokenizer load it back (with the
        class names its config carries)."""
        d = Path(directory)
        self.model.save_pretrained(d)
        self.tokenizer.save_pretrained(d)
        (d / "kdrun_scorer.json").write_text(json.dumps({"kind": "classifier", "max_length": self.max_length}))
