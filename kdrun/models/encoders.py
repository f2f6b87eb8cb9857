"""Scoring models for ranking: a bi-encoder (pooled embeddings, dot or cosine) and a cross-encoder.

Both take raw text through `featurize` (their own tokenizer: teacher and student may differ) and
return {"scores": [B, n]} for B queries with n passages each (column 0 is the positive in training
batches), plus {"in_batch_scores": [B, B*n]} (every query against every passage of the batch) when
a loss term asks for it. `score_lists` scores arbitrary candidate lists for evaluation.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Features = Dict[str, torch.Tensor]


def tokenize(tokenizer, texts, max_length: int, pair_texts=None) -> Features:
    enc = tokenizer(
        list(texts),
        list(pair_texts) if pair_texts is not None else None,
        padding=True,
        truncation=True if pair_texts is None else "longest_first",
        max_length=max_length,
        pad_to_multiple_of=8,
        return_tensors="pt",
    )
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Mean over real tokens, or the first ([CLS]) token."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def own_scores(in_batch: torch.Tensor, n: int) -> torch.Tensor:
    """[B, B*n] in-batch scores -> [B, n]: each query's own passages (columns b*n .. b*n+n-1)."""
    b = in_batch.shape[0]
    cols = torch.arange(b, device=in_batch.device)[:, None] * n + torch.arange(n, device=in_batch.device)
    return in_batch.gather(1, cols)


class Scorer(nn.Module):
    outputs: set = set()

    def request(self, outputs: set) -> None:
        """Extra outputs for the loss terms: "in_batch_scores"."""
        self.outputs = set(outputs) & {"in_batch_scores"}


class BiEncoder(Scorer):
    """Query and passage encoded separately by one transformer; score = dot or cosine of pooled vectors."""

    def __init__(self, encoder: nn.Module, tokenizer, pooling: str, similarity: str, max_length: int):
        super().__init__()
        self.encoder, self.tokenizer = encoder, tokenizer
        self.pooling, self.similarity, self.max_length = pooling, similarity, max_length

    def featurize(self, queries: Sequence[str], passages: Sequence[Sequence[str]]) -> Dict[str, Features]:
        flat = [p for ps in passages for p in ps]
        return {"query": tokenize(self.tokenizer, queries, self.max_length),
                "passage": tokenize(self.tokenizer, flat, self.max_length)}

    def embed(self, features: Features) -> torch.Tensor:
        out = self.encoder(**features).last_hidden_state
        emb = pool(out, features["attention_mask"], self.pooling)
        return F.normalize(emb.float(), dim=-1) if self.similarity == "cos" else emb

    def forward(self, features: Dict[str, Features]) -> Dict[str, torch.Tensor]:
        q = self.embed(features["query"]).float()  # [B, H]
        p = self.embed(features["passage"]).float()  # [B*n, H]
        if "in_batch_scores" in self.outputs:
            in_batch = q @ p.T  # [B, B*n]
            return {"scores": own_scores(in_batch, p.shape[0] // q.shape[0]), "in_batch_scores": in_batch}
        return {"scores": torch.einsum("bh,bnh->bn", q, p.view(q.shape[0], -1, p.shape[-1]))}

    @torch.inference_mode()
    def score_lists(self, queries: List[str], candidates: List[List[str]], batch_size: int, device) -> List[torch.Tensor]:
        texts = sorted({t for ts in candidates for t in ts} | set(queries), key=len)  # length-sorted: little padding
        index = {t: i for i, t in enumerate(texts)}
        chunks = []
        for i in range(0, len(texts), batch_size):
            feats = tokenize(self.tokenizer, texts[i:i + batch_size], self.max_length)
            chunks.append(self.embed({k: v.to(device) for k, v in feats.items()}).float().cpu())
        emb = torch.cat(chunks)
        return [emb[[index[t] for t in ts]] @ emb[index[q]] for q, ts in zip(queries, candidates)]

    def save(self, directory: str | Path) -> None:
        """Hugging Face format (AutoModel/AutoTokenizer load it) plus a sentence-transformers pooling config."""
        d = Path(directory)
        self.encoder.save_pretrained(d)
        self.tokenizer.save_pretrained(d)
        (d / "kdrun_scorer.json").write_text(json.dumps(
            {"kind": "bi_encoder", "pooling": self.pooling, "similarity": self.similarity, "max_length": self.max_length}, indent=2))
        (d / "1_Pooling").mkdir(exist_ok=True)
        (d / "1_Pooling" / "config.json").write_text(json.dumps({
            "word_embedding_dimension": self.encoder.config.hidden_size,
            "pooling_mode_cls_token": self.pooling == "cls",
            "pooling_mode_mean_tokens": self.pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        }, indent=2))
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if self.similarity == "cos":
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (d / "modules.json").write_text(json.dumps(modules, indent=2))
        (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": self.max_length, "do_lower_case": False}))
        (d / "config_sentence_transformers.json").write_text(json.dumps(
            {"similarity_fn_name": "cosine" if self.similarity == "cos" else "dot"}))


class CrossEncoder(Scorer):
    """(query, passage) encoded together; score = one logit of a sequence-classification head."""

    def __init__(self, model: nn.Module, tokenizer, label_index: int, max_length: int):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.label_index, self.max_length = label_index, max_length

    def featurize(self, queries: Sequence[str], passages: Sequence[Sequence[str]]) -> Dict[str, Features]:
        flat = [p for ps in passages for p in ps]
        if "in_batch_scores" in self.outputs:  # every query with every passage of the batch: B * B*n pairs
            qs, ps = [q for q in queries for _ in flat], flat * len(queries)
        else:
            qs, ps = [q for q, group in zip(queries, passages) for _ in group], flat
        return {"pairs": tokenize(self.tokenizer, qs, self.max_length, pair_texts=ps), "n": len(passages[0])}

    def forward(self, features: Dict[str, Features]) -> Dict[str, torch.Tensor]:
        logits = self.model(**features["pairs"]).logits[:, self.label_index].float()
        n = int(features["n"])
        if "in_batch_scores" in self.outputs:
            b = int(round((logits.numel() / n) ** 0.5))
            in_batch = logits.view(b, b * n)
            return {"scores": own_scores(in_batch, n), "in_batch_scores": in_batch}
        return {"scores": logits.view(-1, n)}

    @torch.inference_mode()
    def score_lists(self, queries: List[str], candidates: List[List[str]], batch_size: int, device) -> List[torch.Tensor]:
        pairs = [(q, t) for q, ts in zip(queries, candidates) for t in ts]
        scores = []
        for i in range(0, len(pairs), batch_size):
            qs, ts = zip(*pairs[i:i + batch_size])
            feats = tokenize(self.tokenizer, qs, self.max_length, pair_texts=ts)
            scores.append(self.model(**{k: v.to(device) for k, v in feats.items()}).logits[:, self.label_index].float().cpu())
        flat, out, start = torch.cat(scores), [], 0
        for ts in candidates:
            out.append(flat[start:start + len(ts)])
            start += len(ts)
        return out
