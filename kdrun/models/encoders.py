"""Scoring models for ranking: a bi-encoder (pooled embeddings, dot or cosine), a late-interaction model
(ColBERT: per-token vectors, MaxSim) and a cross-encoder.

Both take raw text through `featurize` (their own tokenizer: teacher and student may differ) and
return {"scores": [B, n]} for B queries with n passages each (column 0 is the positive in training
batches), plus {"in_batch_scores": [B, B*n]} (every query against every passage of the batch) when
a loss term asks for it. `score_lists` scores arbitrary candidate lists for evaluation.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdrun import progress
from kdrun.data.batching import to_device

Features = Dict[str, torch.Tensor]


def tokenize(tokenizer, texts, max_length: int, pair_texts=None, pad_to_multiple_of: int = 8) -> Features:
    enc = tokenizer(
        list(texts),
        list(pair_texts) if pair_texts is not None else None,
        padding=True,
        truncation=True if pair_texts is None else "longest_first",
        max_length=max_length,
        pad_to_multiple_of=pad_to_multiple_of,
        return_tensors="pt",
    )
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def tokenize_groups(tokenizer, texts, max_length: int, pair_texts=None) -> Dict:
    """Texts (or pairs) grouped by their own length rounded up to a multiple of 8, each group padded to
    exactly that: {"groups": [{"index": rows, features...}], "count": N}. A text's tokens and mask then do not
    depend on which texts share its batch (batch-dependent padding changes results in the 7th digit), so a teacher
    scores a text the same online, in the cache and in a score file: bit for bit where the CPU's kernels do not
    depend on the batch's row count, to float32 rounding where they do (`run_groups` puts rows back)."""
    enc = tokenizer(list(texts), list(pair_texts) if pair_texts is not None else None,
                    truncation=True if pair_texts is None else "longest_first", max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    by_length: Dict[int, List[int]] = {}
    for i, ids in enumerate(enc["input_ids"]):
        by_length.setdefault(-(-len(ids) // 8) * 8, []).append(i)
    groups = []
    for _, rows in sorted(by_length.items()):
        padded = tokenizer.pad({k: [enc[k][i] for i in rows] for k in keys}, pad_to_multiple_of=8, return_tensors="pt")
        groups.append({"index": torch.tensor(rows), **{k: padded[k] for k in keys}})
    return {"groups": groups, "count": len(texts)}


def run_groups(fn, features: Dict):
    """fn(features) for ordinary features; for `tokenize_groups` output, fn per group with the rows put back in
    order (fn returns a tensor, or a dict of tensors with one row per text)."""
    if "groups" not in features:
        return fn(features)
    outs = [(g["index"], fn({k: v for k, v in g.items() if k != "index"})) for g in features["groups"]]
    as_dict = isinstance(outs[0][1], dict)
    result = {}
    for rows, o in outs:
        for key, value in (o.items() if as_dict else [("", o)]):
            if key not in result:
                result[key] = value.new_empty((features["count"], *value.shape[1:]))
            result[key][rows.to(value.device)] = value
    return result if as_dict else result[""]


def one_lookup(encoder: nn.Module, features: Dict) -> Dict:
    """Length-grouped features (`tokens.pad`) with every group's word embeddings looked up in one call, handed on as
    `inputs_embeds`: in training, one lookup's backward builds one dense [vocab, hidden] gradient instead of one per
    group (at 4 groups that was half the step's CPU time). The same numbers as a lookup per group; ungrouped features,
    and evaluation (no gradient), pass unchanged."""
    groups = features.get("groups") if isinstance(features, dict) else None
    if not groups or len(groups) < 2 or not torch.is_grad_enabled() or "input_ids" not in groups[0]:
        return features
    ids = [g["input_ids"] for g in groups]
    vectors = encoder.get_input_embeddings()(torch.cat([i.reshape(-1) for i in ids])).split([i.numel() for i in ids])
    out = [{**{k: v for k, v in g.items() if k != "input_ids"}, "inputs_embeds": vec.view(*i.shape, -1)}
           for g, i, vec in zip(groups, ids, vectors)]
    return {**features, "groups": out}


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Mean over real tokens, or the first ([CLS]) token."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def in_batch_from_embeddings(q: torch.Tensor, p: torch.Tensor, fold: torch.Tensor) -> torch.Tensor:
    """A bi-encoder teacher's [B, B*n] in-batch scores from its cached embeddings (no teacher forward per step): query
    b (q [B, H]) against every candidate of the batch (p [B, k, n, H], one row per fold teacher) as encoded by its own
    teacher `fold[b]`, in the order of the student's in-batch scores (query b's own list in columns b*n .. b*n+n-1)."""
    b, n = q.shape[0], p.shape[2]
    every = torch.einsum("bh,cknh->bkcn", q.float(), p.float())  # [B, k, B, n]: each fold teacher's scores
    return every[torch.arange(b), fold.long()].reshape(b, b * n)


def own_scores(in_batch: torch.Tensor, n: int) -> torch.Tensor:
    """[B, B*n] in-batch scores -> [B, n]: each query's own passages (columns b*n .. b*n+n-1)."""
    b = in_batch.shape[0]
    cols = torch.arange(b, device=in_batch.device)[:, None] * n + torch.arange(n, device=in_batch.device)
    return in_batch.gather(1, cols)


class Scorer(nn.Module):
    outputs: set = set()
    exact: bool = False  # teachers: batch-invariant padding (tokenize_groups): cached outputs match online ones
    # students (set by the pipeline from the hardware profile): texts tokenised once, batches padded in length groups
    token_table = None  # kdrun.data.tokens.TokenTable for single texts (queries, passages)
    pad_multiple: int = 8
    max_groups: int = 1

    def request(self, outputs: set) -> None:
        """Extra outputs for the loss terms: "in_batch_scores", "embeddings" (a bi-encoder's query_emb [B, H] and
        passage_emb [B, n, H])."""
        self.outputs = set(outputs) & {"in_batch_scores", "embeddings"}

    def featurize_ids(self, query_ids: List[List[int]], passage_ids: List[List[int]]) -> Dict:
        """Features from token ids tokenised once (kdrun.data.tokens), each column split into up to `max_groups`
        length groups padded apart."""
        from kdrun.data import tokens

        pad = lambda ids: tokens.pad(self.tokenizer, ids, self.pad_multiple, self.max_groups)
        return {"query": pad(query_ids), "passage": pad(passage_ids)}


class BiEncoder(Scorer):
    """Query and passage encoded separately by one transformer; score = dot or cosine of pooled vectors."""
    optional_outputs = frozenset({"in_batch_scores"})  # what its precomputed pass can keep beside the scores
    # (a precomputed pass that keeps them keeps the embeddings, which serve "embeddings" too: teacher_cache.describe)

    def __init__(self, encoder: nn.Module, tokenizer, pooling: str, similarity: str, max_length: int):
        super().__init__()
        self.encoder, self.tokenizer = encoder, tokenizer
        self.pooling, self.similarity, self.max_length = pooling, similarity, max_length

    def tokenize(self, texts: Sequence[str], pair_texts=None):
        if self.exact:
            return tokenize_groups(self.tokenizer, texts, self.max_length, pair_texts)
        if self.token_table is not None and pair_texts is None:
            from kdrun.data import tokens

            return tokens.pad(self.tokenizer, self.token_table(texts), self.pad_multiple, self.max_groups)
        return tokenize(self.tokenizer, texts, self.max_length, pair_texts, self.pad_multiple)

    def featurize(self, queries: Sequence[str], passages: Sequence[Sequence[str]]) -> Dict[str, Features]:
        flat = [p for ps in passages for p in ps]
        return {"query": self.tokenize(queries), "passage": self.tokenize(flat)}

    def _embed(self, features: Features) -> torch.Tensor:
        out = self.encoder(**features).last_hidden_state
        emb = pool(out, features["attention_mask"], self.pooling)
        return F.normalize(emb.float(), dim=-1) if self.similarity == "cos" else emb

    def embed(self, features: Features) -> torch.Tensor:
        return run_groups(self._embed, one_lookup(self.encoder, features))

    def forward(self, features: Dict[str, Features]) -> Dict[str, torch.Tensor]:
        q = self.embed(features["query"]).float()  # [B, H]
        p = self.embed(features["passage"]).float()  # [B*n, H]
        extra = {"query_emb": q, "passage_emb": p.view(q.shape[0], -1, p.shape[-1])} \
            if "embeddings" in self.outputs else {}
        if "in_batch_scores" in self.outputs:
            in_batch = q @ p.T  # [B, B*n]
            return {"scores": own_scores(in_batch, p.shape[0] // q.shape[0]), "in_batch_scores": in_batch, **extra}
        return {"scores": torch.einsum("bh,bnh->bn", q, p.view(q.shape[0], -1, p.shape[-1])), **extra}

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int, device, desc: str = "evaluate: encode"):
        """({text: row}, [D, H] fp32 embeddings on the CPU) of the distinct texts, each encoded once, in batches of
        similar length (little padding)."""
        distinct = sorted(set(texts), key=len)
        chunks = [self.embed(to_device(self.tokenize(distinct[i:i + batch_size]), device)).float().cpu()
                  for i in progress.bar(range(0, len(distinct), batch_size), desc=desc, unit="batch")]
        return {t: i for i, t in enumerate(distinct)}, torch.cat(chunks)

    @torch.inference_mode()
    def score_lists(self, queries: List[str], candidates: List[List[str]], batch_size: int, device) -> List[torch.Tensor]:
        index, emb = self.embed_texts([*queries, *(t for ts in candidates for t in ts)], batch_size, device)
        return [emb[[index[t] for t in ts]] @ emb[index[q]] for q, ts in zip(queries, candidates)]

    @torch.inference_mode()
    def embed_lists(self, queries: List[str], candidates: List[List[str]], batch_size: int, device):
        """A precomputed teacher's in-batch scores (teacher.mode=precompute with in_batch_kl): (queries [B, H],
        candidates [B, 1, n, H], fold [B] of zeros), for `in_batch_from_embeddings` (kdrun.models.ensemble.OutOfFold
        gives one candidate row per fold)."""
        index, emb = self.embed_texts([*queries, *(t for ts in candidates for t in ts)], batch_size, device,
                                      desc="teacher: encode")
        q = emb[[index[t] for t in queries]]
        p = emb[[index[t] for ts in candidates for t in ts]].view(len(queries), 1, -1, emb.shape[-1])
        return q, p, torch.zeros(len(queries), dtype=torch.int64)

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
        return {"pairs": self.tokenize(qs, ps), "n": len(passages[0])}

    tokenize = BiEncoder.tokenize

    def logits(self, pairs: Features) -> torch.Tensor:
        return run_groups(lambda f: self.model(**f).logits[:, self.label_index].float(), pairs)

    def forward(self, features: Dict[str, Features]) -> Dict[str, torch.Tensor]:
        logits = self.logits(features["pairs"])
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
        for i in progress.bar(range(0, len(pairs), batch_size), desc="evaluate: score pairs", unit="batch"):
            qs, ts = zip(*pairs[i:i + batch_size])
            scores.append(self.logits(to_device(self.tokenize(qs, ts), device)).cpu())
        flat, out, start = torch.cat(scores), [], 0
        for ts in candidates:
            out.append(flat[start:start + len(ts)])
            start += len(ts)
        return out

    def save(self, directory: str | Path) -> None:
        """Hugging Face format: AutoModelForSequenceClassification loads it (and sentence-transformers' CrossEncoder)."""
        d = Path(directory)
        self.model.save_pretrained(d)
        self.tokenizer.save_pretrained(d)
        (d / "kdrun_scorer.json").write_text(json.dumps(
            {"kind": "cross_encoder", "label_index": self.label_index, "max_length": self.max_length}, indent=2))


def maxsim(q: torch.Tensor, q_mask: torch.Tensor, p: torch.Tensor, p_mask: torch.Tensor) -> torch.Tensor:
    """ColBERT's late interaction: for each query token the best-matching passage token, summed over the
    query's real tokens. q [B, Lq, d], q_mask [B, Lq]; p [P, Lp, d], p_mask [P, Lp] -> [B, P] scores."""
    sim = torch.einsum("bid,ptd->bpit", q, p)  # [B, P, Lq, Lp]
    sim = sim.masked_fill(~p_mask.bool()[None, :, None, :], float("-inf"))
    best = sim.max(-1).values  # [B, P, Lq]
    return (best * q_mask[:, None, :].to(best.dtype)).sum(-1)


class LateInteraction(Scorer):
    """ColBERT-style (Khattab & Zaharia 2020): every token's last hidden state, projected to `dim` by a linear
    layer and L2-normalised; score = sum over query tokens of the max similarity to any passage token."""

    def __init__(self, encoder: nn.Module, tokenizer, dim: int, max_length: int, linear: nn.Linear = None,
                 projection_init: str = "random", query_length: int = 0):
        super().__init__()
        self.encoder, self.tokenizer, self.max_length = encoder, tokenizer, max_length
        self.query_length = query_length  # ColBERT's query augmentation: see expand_query
        self.linear = linear or nn.Linear(encoder.config.hidden_size, dim, bias=False)
        # "pca": init_projection sets it from training texts before training ("loaded": a trained one, kept)
        self.projection_init = "loaded" if linear is not None else projection_init

    @torch.no_grad()
    def init_projection(self, texts: Sequence[str], batch_size: int = 32) -> Dict[str, float]:
        """The projection's rows set to the principal directions of the encoder's token states over `texts`
        (centred, largest variance first): the `dim`-dimensional vectors keep as much of the encoder's token
        geometry as `dim` directions can, and the start depends on no seed (a random projection's draw moved a
        short run's MRR@10 by more than the loss did: README, Results). Rows beyond the states' rank (dim above
        the hidden size) start at zero. Returns the share of the centred states' variance the projection keeps."""
        device, was_training = self.linear.weight.device, self.encoder.training
        self.encoder.eval()
        states = []
        for i in range(0, len(texts), batch_size):
            feats = {k: v.to(device) for k, v in tokenize(self.tokenizer, texts[i:i + batch_size], self.max_length).items()}
            hidden = self.encoder(**feats).last_hidden_state
            states.append(hidden[feats["attention_mask"].bool()].double().cpu())
        self.encoder.train(was_training)
        x = torch.cat(states)
        _, sv, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
        k = min(self.linear.out_features, vh.shape[0])
        self.linear.weight.zero_()
        self.linear.weight[:k] = vh[:k].to(self.linear.weight)
        self.projection_init = "pca_done"
        return {"student/projection_variance_kept": float(sv[:k].pow(2).sum() / sv.pow(2).sum())}

    tokenize, featurize = BiEncoder.tokenize, BiEncoder.featurize

    def expand_query(self, features: Features) -> tuple:
        """ColBERT's query augmentation (Khattab & Zaharia 2020, section 3.2; sentence-transformers' query_expansion
        strategy "min", attend False): a query shorter than `query_length` tokens is padded to it with [MASK] tokens,
        which the encoder does not attend to but whose vectors count in MaxSim. The score then sums over
        `query_length` query vectors (a wider score scale, and soft matches beyond the query's words). Returns
        (features for the encoder, scoring mask [N, L]); query_length 0 leaves the query as it is."""
        ids, att = features["input_ids"], features["attention_mask"]
        if not self.query_length:
            return features, att
        out = dict(features)
        missing = self.query_length - ids.shape[1]
        if missing > 0:
            widen = lambda x: F.pad(x, (0, missing), value=0)
            ids, att = widen(ids), widen(att)
            out.update({"attention_mask": att, **({"token_type_ids": widen(features["token_type_ids"])}
                                                  if "token_type_ids" in features else {})})
        expansion = (att == 0) & (torch.arange(ids.shape[1], device=ids.device) < self.query_length)
        mask_id = self.tokenizer.mask_token_id
        mask_id = self.tokenizer.eos_token_id if mask_id is None else mask_id  # (a decoder's: sentence-transformers' too)
        out["input_ids"] = ids.masked_fill(expansion, mask_id)
        return out, att | expansion.to(att.dtype)

    def _vectors(self, features: Features) -> torch.Tensor:
        hidden = self.encoder(**features).last_hidden_state
        return F.normalize(self.linear(hidden).float(), dim=-1)

    def vectors(self, features: Dict, query: bool = False) -> tuple:
        """(token vectors [N, L, d], scoring mask [N, L]); queries are expanded (expand_query); length-grouped
        features run group by group and come back padded to the longest group (zero vectors, masked)."""
        expand = self.expand_query if query else lambda f: (f, f["attention_mask"])
        if "groups" not in features:
            feats, score_mask = expand(features)
            return self._vectors(feats), score_mask
        groups, masks = zip(*(expand(g) for g in features["groups"]))
        length = max(m.shape[1] for m in masks)
        vecs = mask = None
        for g, m in zip(one_lookup(self.encoder, {**features, "groups": list(groups)})["groups"], masks):
            v = self._vectors({k: x for k, x in g.items() if k != "index"})
            if vecs is None:
                vecs = v.new_zeros((features["count"], length, v.shape[-1]))
                mask = m.new_zeros((features["count"], length))
            rows = g["index"].to(v.device)
            vecs[rows, :v.shape[1]] = v
            mask[rows, :v.shape[1]] = m
        return vecs, mask

    def forward(self, features: Dict[str, Features]) -> Dict[str, torch.Tensor]:
        q, q_mask = self.vectors(features["query"], query=True)  # [B, Lq, d]
        p, p_mask = self.vectors(features["passage"])  # [B*n, Lp, d]
        b, n = q.shape[0], p.shape[0] // q.shape[0]
        if "in_batch_scores" in self.outputs:
            in_batch = maxsim(q, q_mask, p, p_mask)  # [B, B*n]
            return {"scores": own_scores(in_batch, n), "in_batch_scores": in_batch}
        p_own = p.view(b, n, *p.shape[1:])  # each query against its own n passages only
        pm = p_mask.view(b, n, -1)
        sim = torch.einsum("bid,bntd->bnit", q, p_own).masked_fill(~pm.bool()[:, :, None, :], float("-inf"))
        best = sim.max(-1).values  # [B, n, Lq]
        return {"scores": (best * q_mask[:, None, :].to(best.dtype)).sum(-1)}

    def _token_vectors(self, texts, batch_size: int, device, query: bool) -> Dict[str, torch.Tensor]:
        """{text: its scored token vectors [L, d], no padding}, encoded in length-sorted batches."""
        texts, vecs = sorted(texts, key=len), {}
        for i in progress.bar(range(0, len(texts), batch_size), desc="evaluate: encode", unit="batch"):
            chunk = texts[i:i + batch_size]
            feats = {k: v.to(device) for k, v in tokenize(self.tokenizer, chunk, self.max_length).items()}
            v, mask = self.vectors(feats, query=query)
            v, mask = v.cpu(), mask.bool().cpu()
            vecs.update((t, v[j][mask[j]]) for j, t in enumerate(chunk))
        return vecs

    @torch.inference_mode()
    def score_lists(self, queries: List[str], candidates: List[List[str]], batch_size: int, device) -> List[torch.Tensor]:
        """Each distinct passage and query is encoded once (length-sorted batches; queries expanded as in training);
        its scored token vectors are kept without padding."""
        passages = self._token_vectors({t for ts in candidates for t in ts}, batch_size, device, query=False)
        query_vecs = self._token_vectors(set(queries), batch_size, device, query=True)
        pad = torch.nn.utils.rnn.pad_sequence
        out = []
        for q, ts in zip(queries, candidates):
            p = pad([passages[t] for t in ts], batch_first=True)
            p_mask = pad([torch.ones(len(passages[t]), dtype=torch.long) for t in ts], batch_first=True)
            qv = query_vecs[q][None]
            out.append(maxsim(qv, torch.ones(qv.shape[:2], dtype=torch.long), p, p_mask)[0])
        return out

    def save(self, directory: str | Path) -> None:
        """The encoder in Hugging Face format (AutoModel loads it), the projection in colbert_linear.safetensors (kdrun's
        load_scorer), and the same as a sentence-transformers MultiVectorEncoder (modules.json: Transformer, Dense
        projection, MultiVectorMask without a skiplist, Normalize): MultiVectorEncoder(directory) scores as kdrun does
        (its query expansion, strategy "min", when query_length is set; no [Q]/[D] prefixes; every real token
        counted)."""
        from safetensors.torch import save_file
        from sentence_transformers import MultiVectorEncoder
        from sentence_transformers.base.modules import Normalize, Transformer
        from sentence_transformers.base.modules.dense import Dense
        from sentence_transformers.multi_vector_encoder.modules.multi_vector_mask import MultiVectorMask

        d = Path(directory)
        self.encoder.save_pretrained(d)
        self.tokenizer.save_pretrained(d)
        weight = self.linear.weight.detach().cpu().float().contiguous()
        save_file({"weight": weight}, str(d / "colbert_linear.safetensors"))
        dense = Dense(in_features=weight.shape[1], out_features=weight.shape[0], bias=False,
                      activation_function=nn.Identity(), module_input_name="token_embeddings")
        dense.linear.weight.data.copy_(weight)
        expansion = {"strategy": "min", "length": self.query_length, "attend": False} if self.query_length else None
        transformer = Transformer(str(d), max_seq_length=self.max_length, query_expansion=expansion)
        MultiVectorEncoder(modules=[transformer, dense, MultiVectorMask(skiplist_words=[]),
                                    Normalize(module_input_name="token_embeddings")],
                           device="cpu").save(str(d))
        (d / "kdrun_scorer.json").write_text(json.dumps(
            {"kind": "late_interaction", "dim": self.linear.out_features, "max_length": self.max_length,
             "query_length": self.query_length}, indent=2))


def load_projection(directory: str | Path) -> Optional[nn.Linear]:
    """The projection a saved kdrun ColBERT keeps in colbert_linear.safetensors, or None where there is none."""
    from safetensors.torch import load_file

    path = Path(directory) / "colbert_linear.safetensors"
    if not path.is_file():
        return None
    weight = load_file(str(path))["weight"]
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data.copy_(weight)
    return linear


def load_scorer(directory: str | Path) -> Scorer:
    """A ranking student saved by kdrun, back as the scorer it was trained as (reads kdrun_scorer.json)."""
    import transformers

    d = Path(directory)
    info = json.loads((d / "kdrun_scorer.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(d)
    if info["kind"] == "cross_encoder":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(d)
        return CrossEncoder(model, tok, info["label_index"], info["max_length"])
    encoder = transformers.AutoModel.from_pretrained(d)
    if info["kind"] == "late_interaction":
        return LateInteraction(encoder, tok, info["dim"], info["max_length"], load_projection(d),
                               query_length=info.get("query_length", 0))
    return BiEncoder(encoder, tok, info["pooling"], info["similarity"], info["max_length"])
