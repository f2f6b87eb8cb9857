"""Loss term modules: each reads the student's and the teacher's output dicts (what the task's models return:
"scores", "logits", "hidden_states", "attentions", "features", or the teacher's "topk_logprobs"/"topk_ids") and the
batch ("labels", "loss_mask", "attention_mask"), and calls the math of functional.py. A term only picks its inputs,
and owns state where a method has some (learned projections, TAID's schedule). Which term a config name builds, with
which settings, is its spec's (specs.py).
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from kdrun.losses import functional as F
from kdrun.losses import specs as S


@dataclass
class Context:
    """What terms need to know about the models (widths, depths, the student's origin) and the run."""
    task: str
    student_hidden: int = 0
    teacher_hidden: int = 0
    student_layers: int = 0
    teacher_layers: int = 0
    default_layer_map: Optional[List[int]] = None  # student layer i -> teacher hidden_states index
    total_batches: int = 1  # training micro-batches in the run (optimizer steps x grad_accum)
    class_centres: Optional[torch.Tensor] = None  # teacher classifier weights [C, H_t]


def distributions(student: Dict, teacher: Dict):
    """(student, teacher) logits over the same support: full logits, or (k+1)-way log-probs when the
    teacher gives only its top-k (a precomputed or sparse teacher)."""
    if "topk_ids" in teacher:
        return F.topk_distributions(student["logits"], teacher["topk_logprobs"], teacher["topk_ids"])
    return student["logits"], teacher["logits"]


class Term(nn.Module):
    needs: frozenset = frozenset()  # model outputs beyond scores/logits: "hidden_states", "attentions", "features"
    student_needs: frozenset = frozenset()  # outputs only the student must give (e.g. its in-batch scores)

    def logs(self) -> Dict[str, float]:
        return {}


class ScoreTerm(Term):
    """Ranking: [B, n] scores of (query, positive, negatives) lists; `in_batch_scores`: the [B, B*n] matrix."""

    def __init__(self, fn: Callable, settings: dict, key: str = "scores"):
        super().__init__()
        self.fn, self.kw, self.key = fn, settings, key

    def forward(self, s: Dict, t: Dict, batch: Dict) -> torch.Tensor:
        return self.fn(s[self.key], t[self.key], **self.kw)


class DistributionTerm(Term):
    """Classification logits [B, C] or LM logits [B, L, V] (masked by batch["loss_mask"])."""

    def __init__(self, fn: Callable, settings: dict):
        super().__init__()
        self.fn, self.kw = fn, settings

    def forward(self, s: Dict, t: Dict, batch: Dict) -> torch.Tensor:
        student, teacher = distributions(s, t)
        return self.fn(student, teacher, mask=batch.get("loss_mask"), **self.kw)


class LabelledTerm(Term):
    """Classification logits [B, C] with the labels: fn(student_logits, teacher_logits, labels, **settings) (for
    methods that treat the target class apart, such as DKD)."""

    def __init__(self, fn: Callable, settings: dict):
        super().__init__()
        self.fn, self.kw = fn, settings

    def forward(self, s: Dict, t: Dict, batch: Dict) -> torch.Tensor:
        return self.fn(s["logits"], t["logits"], batch["labels"], **self.kw)


class CustomTerm(Term):
    """A user's term (`loss.terms.NAME._target_`): fn(student_out, teacher_out, batch, **settings), or an nn.Module
    built with the settings and called with the three."""

    def __init__(self, target, settings: dict):
        super().__init__()
        if isinstance(target, type):
            self.module, self.fn, self.kw = target(**settings), None, {}
        else:
            self.module, self.fn, self.kw = None, target, settings

    def forward(self, s: Dict, t: Dict, batch: Dict) -> torch.Tensor:
        return self.module(s, t, batch) if self.module is not None else self.fn(s, t, batch, **self.kw)


class CrossEntropy(Term):
    """Hard labels, not the teacher: classification labels, next tokens of a causal LM, or for ranking the positive
    among the batch's passages (in-batch and sampled negatives)."""

    def __init__(self, ranking: bool = False, in_batch: bool = True, scale: float = 1.0):
        super().__init__()
        self.ranking, self.in_batch, self.scale = ranking, in_batch, scale
        if ranking and in_batch:
            self.student_needs = frozenset({"in_batch_scores"})

    @classmethod
    def from_spec(cls, spec, ctx: "Context") -> "CrossEntropy":
        return cls(ranking=ctx.task == "ranking", in_batch=spec.in_batch is not False, scale=spec.scale)

    def forward(self, s: Dict, t: Dict, batch: Dict) -> torch.Tensor:
        if self.ranking:
            scores = s["in_batch_scores"] if self.in_batch else s["scores"]
            scores = scores * self.scale if self.scale != 1.0 else scores
            return F.in_batch_ce(scores) if self.in_batch else F.list_ce(scores)
        return F.cross_entropy(s["logits"], batch["labels"])


class Taid(Term):
    """TAID with its adaptive schedule (Shing et al. 2025, Algorithm 1): after each training call,
    t <- min(1, max(t_linear, t + taid_alpha * sigmoid(m) * (1 - t))), where m is a momentum
    (taid_beta) average of the loss's relative decrease and t_linear rises from t_start to t_end over
    the run. It updates once per training call (micro-batch), so the run's length is counted in those. A student that learns fast moves its target towards the teacher faster."""

    def __init__(self, t_start: float, t_end: float, taid_alpha: float, taid_beta: float, total_batches: int):
        super().__init__()
        self.t_start, self.t_end, self.alpha, self.beta = t_start, t_end, taid_alpha, taid_beta
        self.total, self.calls = max(1, total_batches), 0
        self.t, self.prev, self.momentum = t_start, None, 0.0

    @classmethod
    def from_spec(cls, spec, ctx: "Context") -> "Taid":
        return cls(**spec.settings(), total_batches=ctx.total_batches)

    def forward(self, s: Dict, t: Dict, batch: Dict) -> torch.Tensor:
        student, teacher = distributions(s, t)
        loss = F.taid(student, teacher, self.t, mask=batch.get("loss_mask"))
        if self.training:
            self._update(float(loss.detach()))
        return loss

    def _update(self, loss: float) -> None:
        self.calls += 1
        if self.prev is not None:
            self.momentum = self.beta * self.momentum + (1 - self.beta) * (self.prev - loss) / (self.prev + 1e-15)
            linear = self.t_start + (self.t_end - self.t_start) * min(1.0, self.calls / self.total)
            step = self.alpha * torch.sigmoid(torch.tensor(self.momentum)).item() * (1 - self.t)
            self.t = min(self.t_end, max(linear, self.t + step))
        self.prev = loss

    def logs(self) -> Dict[str, float]:
        return {"taid_t": self.t}

    def get_extra_state(self) -> Dict:  # the adaptive schedule, in checkpoints (state_dict's _extra_state)
        return {"calls": self.calls, "t": self.t, "prev": self.prev, "momentum": self.momentum}

    def set_extra_state(self, state: Dict) -> None:
        self.calls, self.t, self.prev, self.momentum = state["calls"], state["t"], state["prev"], state["momentum"]


class EmbeddingAlign(Term):
    """Embedding alignment (LEAF, Vujanic & Rueckstiess 2025; DSE-style distillation of an embedding space), ranking:
    the student's query and passage embeddings regress onto the teacher's, through a learned linear projection when
    the widths differ; no relevance labels or negatives are read (every passage of the example is aligned alike):

        form=mse:     mean ||W e_s - e_t||^2 / H_t          form=cosine:  mean (1 - cos(W e_s, e_t))

    After it the student's queries can be scored against passages the teacher encoded (kdrun evaluates that too:
    eval/asymmetric/*), with `query_projection`."""
    needs = frozenset({"embeddings"})

    def __init__(self, ctx: Context, form: str):
        super().__init__()
        self.form = form
        self.proj = _projection(ctx.student_hidden, ctx.teacher_hidden)

    @classmethod
    def from_spec(cls, spec, ctx: "Context") -> "EmbeddingAlign":
        return cls(ctx, spec.form)

    def query_projection(self, emb: torch.Tensor) -> torch.Tensor:
        return self.proj(emb.float())

    def forward(self, s: Dict, t: Dict, batch: Dict) -> torch.Tensor:
        hs = torch.cat([s["query_emb"].unsqueeze(1), s["passage_emb"]], dim=1).float()  # [B, 1 + n, H_s]
        ht = torch.cat([t["query_emb"].unsqueeze(1), t["passage_emb"]], dim=1).float()  # [B, 1 + n, H_t]
        hs = self.proj(hs)
        if self.form == "cosine":
            return (1 - torch.nn.functional.cosine_similarity(hs, ht, dim=-1)).mean()
        return (hs - ht).pow(2).mean()


class DualHead(Term):
    """Dual-head KD (DHO, Kang et al. 2025), classification with a dual-head student (student.dual_head): its label
    head learns from the labels, its second head from the teacher, so the two signals do not pull one head apart:

        L = w CE(z_label, y) + (1 - w) T^2 KL(p_t^T || p_kd^T)

    The student gets its second head from this term (a copy of its head) and predicts with both: alpha p_label +
    (1 - alpha) p_kd."""

    student_needs = frozenset({"dual_head"})

    def __init__(self, label_weight: float, temperature: float, alpha: float):
        super().__init__()
        self.w, self.t, self.alpha = label_weight, temperature, alpha

    @classmethod
    def from_spec(cls, spec, ctx: "Context") -> "DualHead":
        return cls(spec.label_weight, spec.temperature, spec.alpha)

    def configure_student(self, student) -> None:
        """The label head's share of the student's predictions."""
        student.dual_head = self.alpha

    def forward(self, s: Dict, t: Dict, batch: Dict) -> torch.Tensor:
        ce = F.cross_entropy(s["logits_label"], batch["labels"])
        return self.w * ce + (1 - self.w) * F.forward_kl(s["logits_kd"], t["logits"], temperature=self.t)


class PSKD(Term):
    """PS-KD (Kim et al. 2021, "Self-Knowledge Distillation with Progressive Refinement of Targets"), classification:
    the student is its own teacher. Each example's target mixes its label with the student's own prediction the
    last time it saw that example (the previous epoch's), the mixture growing over training:

        target = (1 - alpha_t) y + alpha_t p_prev(x),   alpha_t = alpha_T * progress (0 -> 1 over the run)
        L = - mean_b sum_c target_c log softmax(z)_c

    An example seen for the first time gets its label alone. Predictions are kept per example (keyed by its token
    ids), in fp16 on the CPU, and travel in checkpoints (extra state), so a resumed run goes on with them."""

    def __init__(self, alpha_T: float, total_batches: int):
        super().__init__()
        self.alpha_T, self.total, self.calls = alpha_T, max(1, total_batches), 0
        self.memory: Dict[bytes, torch.Tensor] = {}

    @classmethod
    def from_spec(cls, spec, ctx: "Context") -> "PSKD":
        return cls(spec.alpha_T, ctx.total_batches)

    @staticmethod
    def keys(features: Dict) -> List[bytes]:
        ids, mask = features["input_ids"].cpu(), features.get("attention_mask")
        mask = mask.cpu().bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        return [row[m].numpy().tobytes() for row, m in zip(ids, mask)]

    def alpha(self) -> float:
        return self.alpha_T * min(1.0, self.calls / self.total)

    def forward(self, s: Dict, t: Dict, batch: Dict) -> torch.Tensor:
        log_p = torch.log_softmax(s["logits"].float(), dim=-1)
        labels = torch.nn.functional.one_hot(batch["labels"].long(), log_p.shape[-1]).float()
        keys = self.keys(batch["student"])
        prev = torch.stack([self.memory[k].float().to(log_p.device) if k in self.memory else labels[i]
                            for i, k in enumerate(keys)])
        alpha = self.alpha()
        loss = -(((1 - alpha) * labels + alpha * prev) * log_p).sum(-1).mean()
        if self.training:
            for k, p in zip(keys, log_p.detach().exp().half().cpu()):
                self.memory[k] = p
            self.calls += 1
        return loss

    def logs(self) -> Dict[str, float]:
        return {"pskd_alpha": self.alpha()}

    def get_extra_state(self) -> Dict:
        return {"calls": self.calls, "memory": self.memory}

    def set_extra_state(self, state: Dict) -> None:
        self.calls, self.memory = state["calls"], dict(state["memory"])


def _projection(d_in: int, d_out: int) -> nn.Module:
    return nn.Identity() if d_in == d_out else nn.Linear(d_in, d_out)


class HiddenMSE(Term):
    """TinyBERT hidden-state transfer: student layer i -> teacher layer layer_map[i] (hidden_states
    indices, 0 = embeddings), through a learned linear projection when widths differ. `embedding=True`
    is TinyBERT's embedding-layer term (hidden_states[0] on both sides)."""
    needs = frozenset({"hidden_states"})

    def __init__(self, ctx: Context, layer_map: Optional[List[int]], embedding: bool = False):
        super().__init__()
        self.pairs = [(0, 0)] if embedding else _layer_pairs(ctx, layer_map, offset=1)
        self.proj = _projection(ctx.student_hidden, ctx.teacher_hidden)

    @classmethod
    def from_spec(cls, spec, ctx: Context) -> "HiddenMSE":
        return cls(ctx, spec.layer_map)

    def forward(self, s: Dict, t: Dict, batch: Dict) -> torch.Tensor:
        mask = batch.get("attention_mask")
        losses = [F.hidden_mse(self.proj(s["hidden_states"][i]), t["hidden_states"][j], mask) for i, j in self.pairs]
        return torch.stack(losses).mean()


class EmbeddingMSE(HiddenMSE):
    """TinyBERT's embedding-layer term: hidden_states[0] on both sides, through a projection when widths differ."""

    @classmethod
    def from_spec(cls, spec, ctx: Context) -> "EmbeddingMSE":
        return cls(ctx, None, embedding=True)


class AttentionTerm(Term):
    """TinyBERT attention transfer (mse) or MiniLM attention distributions (kl), per head, layer-mapped."""
    needs = frozenset({"attentions"})

    def __init__(self, fn: Callable, ctx: Context, layer_map: Optional[List[int]]):
        super().__init__()
        self.fn, self.pairs = fn, _layer_pairs(ctx, layer_map, offset=0)

    def forward(self, s: Dict, t: Dict, batch: Dict) -> torch.Tensor:
        mask = batch.get("attention_mask")
        return torch.stack([self.fn(s["attentions"][i], t["attentions"][j], mask) for i, j in self.pairs]).mean()


class AttentionMSE(AttentionTerm):
    """form=probs: attention probabilities, padding masked, the mean over layers; form=scores (TinyBERT's paper):
    raw pre-softmax scores ("attention_scores"), masked entries zeroed, summed over layers."""

    def __init__(self, ctx: Context, layer_map: Optional[List[int]], form: str = "probs"):
        super().__init__(F.attention_mse, ctx, layer_map)
        self.form = form
        if form == "scores":
            self.needs = frozenset({"attention_scores"})

    def forward(self, s: Dict, t: Dict, batch: Dict) -> torch.Tensor:
        if self.form == "probs":
            return super().forward(s, t, batch)
        return torch.stack([F.attention_score_mse(s["attentions"][i], t["attentions"][j]) for i, j in self.pairs]).sum()

    @classmethod
    def from_spec(cls, spec, ctx: Context) -> "AttentionMSE":
        return cls(ctx, spec.layer_map, spec.form)


class AttentionKL(AttentionTerm):
    @classmethod
    def from_spec(cls, spec, ctx: Context) -> "AttentionKL":
        return cls(F.attention_kl, ctx, spec.layer_map)


class FeatureNormDirection(Term):
    """ND loss on the classifier's input features, towards the teacher classifier's class directions."""
    needs = frozenset({"features"})

    def __init__(self, ctx: Context):
        super().__init__()
        if ctx.class_centres is None:
            raise ValueError("feature_norm_direction needs the teacher's classifier weights")
        self.register_buffer("centres", ctx.class_centres.detach().float().clone())
        self.proj = _projection(ctx.student_hidden, ctx.teacher_hidden)

    def forward(self, s: Dict, t: Dict, batch: Dict) -> torch.Tensor:
        return F.feature_norm_direction(self.proj(s["features"]), t["features"], self.centres, batch["labels"])

    @classmethod
    def from_spec(cls, spec, ctx: Context) -> "FeatureNormDirection":
        return cls(ctx)


def _layer_pairs(ctx: Context, layer_map: Optional[List[int]], offset: int) -> List[tuple]:
    """[(student index, teacher index)] into hidden_states (offset=1: index 0 is the embeddings) or
    attentions (offset=0). The map gives, per student layer, the teacher layer in hidden_states numbering
    (1..N); the default is the student's own origin (a slice of the teacher) or TinyBERT's uniform map
    i -> i * N / M."""
    m, n = ctx.student_layers, ctx.teacher_layers
    mapping = layer_map or ctx.default_layer_map or [(i + 1) * n // m for i in range(m)]
    if len(mapping) != m or not all(1 <= j <= n for j in mapping):
        raise ValueError(f"layer_map={list(mapping)}: needs {m} entries (one per student layer), each in 1..{n} "
                         "(teacher layers, 1-based as in hidden_states)")
    return [(i + offset, j - 1 + offset) for i, j in enumerate(mapping)]


def _target(path: str):
    module, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def build_term(spec: S.TermSpec, ctx: Context) -> Term:
    """The module a term's spec builds: its function wrapped to read scores or distributions, its own module, or a
    user's callable."""
    if spec.reads == "custom":
        term = CustomTerm(_target(spec._target_), spec.settings())
    elif spec.reads == "module":
        term = _target(spec.target).from_spec(spec, ctx)
    elif spec.reads in ("scores", "in_batch_scores"):
        term = ScoreTerm(_target(spec.target), spec.settings(), key=spec.reads)
    elif spec.reads == "labelled":
        term = LabelledTerm(_target(spec.target), spec.settings())
    else:
        term = DistributionTerm(_target(spec.target), spec.settings())
    if spec.reads != "module":  # a module knows what it reads (attention_mse: probabilities or raw scores)
        term.needs = frozenset(term.needs | spec.needs)
        term.student_needs = frozenset(term.student_needs | spec.student_needs)
    return term


def pick(teacher_out: Dict[str, torch.Tensor], name) -> Dict[str, torch.Tensor]:
    """The teacher outputs a loss term sees: all of them (name None: several teachers' weighted mean), or with
    one teacher's own "<key>@<name>" outputs in place of the mean (kdrun.models.ensemble.combine)."""
    if name is None:
        return teacher_out
    own = {k.rsplit("@", 1)[0]: v for k, v in teacher_out.items() if k.endswith(f"@{name}")}
    return {**teacher_out, **own}


def _spec(name: str, weight: float, settings: dict) -> S.TermSpec:
    """A registered term's spec from code; a setting it does not take is an error, never dropped."""
    cls = S.TERMS[name]
    taken = [f.name for f in dataclasses.fields(cls)]
    foreign = [k for k in settings if k not in taken]
    if foreign:
        raise ValueError(f"loss term {name} takes no {foreign}; its settings: {taken}")
    return cls(weight=weight, **settings)


class WeightedLoss(nn.Module):
    """loss(student_out, teacher_out, batch) -> {"loss": sum_i w_i * term_i, "<term_i>": term_i, ...}.

    terms: {name: spec} (specs.parse of the config), or for code [(name, weight[, settings])] of registered terms.
    A module: terms with parameters (projections) train with the student.
    """

    def __init__(self, terms: Union[Mapping[str, S.TermSpec], Sequence[tuple]], ctx: Context):
        super().__init__()
        if not isinstance(terms, Mapping):
            names = [t[0] for t in terms]
            if len(set(names)) != len(names):
                raise ValueError(f"loss terms {names}: each term may appear once")
            unknown = [n for n in names if n not in S.TERMS]
            if unknown:
                raise KeyError(f"unknown loss term {unknown[0]!r}; known: {sorted(S.TERMS)}")
            terms = {t[0]: _spec(t[0], float(t[1]), dict(t[2]) if len(t) > 2 else {}) for t in terms}
        self.names = list(terms)
        self.weights = [float(spec.weight) for spec in terms.values()]
        self.sources = [spec.teacher for spec in terms.values()]  # which teacher feeds the term (None: the mean)
        self.reads_teacher = any(getattr(spec, "reads_teacher", True) for spec in terms.values())
        self.terms = nn.ModuleList([build_term(spec, ctx) for spec in terms.values()])

    @property
    def needs(self) -> set:
        """What the terms read of both models beyond scores/logits."""
        return set().union(*(t.needs for t in self.terms))

    @property
    def student_needs(self) -> set:
        return self.needs | set().union(*(t.student_needs for t in self.terms))

    def forward(self, student_out: Dict, teacher_out: Dict, batch: Dict) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        total = None
        for name, weight, term, source in zip(self.names, self.weights, self.terms, self.sources):
            value = term(student_out, pick(teacher_out, source), batch)
            out[name] = value.detach()
            total = weight * value if total is None else total + weight * value
        out["loss"] = total
        return out

    def logs(self) -> Dict[str, float]:
        return {k: v for t in self.terms for k, v in t.logs().items()}
