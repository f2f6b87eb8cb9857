"""Loss terms as typed specs: each term's own settings, the task families it fits, what it reads of the models and
what it builds. No torch here, so a wrong setting is a config error before anything loads.

A loss (conf/loss/*.yaml) keys its terms by name, each with its own settings:

    terms:
      kd_kl: {weight: 0.5, temperature: 2.0}
      ce: {weight: 0.5}

so overrides read `loss.terms.kd_kl.weight=0.7`. A setting the term does not take is an error naming the term and
the settings it does take. A term of your own needs no change to kdrun: `loss.terms.mine._target_=pkg.module.fn`,
a callable `fn(student_out, teacher_out, batch, **settings) -> Tensor` or an nn.Module class taking the settings as
keyword arguments (the same call in forward); its other keys are its settings, checked against its signature.

Add a term to kdrun: one spec class here (`@term("name")`, its settings as dataclass fields, its paper in the
docstring) and its function in functional.py (or a module in terms.py), one yaml under conf/loss/, and tests.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar, Dict, FrozenSet, List, Optional, Tuple, Type

from kdrun.errors import ConfigError

RANKING = ("ranking",)
DISTRIBUTIONS = ("classification", "causal_lm")
ANY_TASK = ("ranking", "classification", "causal_lm")

TERMS: Dict[str, Type["TermSpec"]] = {}  # registered name -> spec class


def term(name: str):
    """Register a spec class under its config name."""
    def register(cls):
        cls.name = name
        TERMS[name] = cls
        return cls
    return register


@dataclass
class TermSpec:
    """Settings every term takes; a subclass adds its own as fields and says what it is as class attributes."""
    weight: float = 1.0  # its share of the total loss
    teacher: Optional[str] = None  # with several teachers: which one feeds this term ("teacher" or teachers.NAME)

    name: ClassVar[str] = ""
    tasks: ClassVar[Tuple[str, ...]] = ()  # the task families it fits
    # how the term reads the models' outputs: "scores" ([B, n] lists), "in_batch_scores" ([B, B*n]),
    # "distribution" (logits, or a top-k teacher's log-probs, masked), "labelled" (classification logits and the
    # labels: fn(s, t, labels, **settings)), "module" (a Term module of terms.py)
    reads: ClassVar[str] = "distribution"
    target: ClassVar[str] = ""  # what it builds: a function of functional.py or a module of terms.py
    needs: ClassVar[FrozenSet[str]] = frozenset()  # outputs both models must give beyond scores/logits
    student_needs: ClassVar[FrozenSet[str]] = frozenset()  # outputs only the student gives
    online_teacher: ClassVar[bool] = False  # reads more of the teacher than a cache keeps
    reads_teacher: ClassVar[bool] = True  # False: the labels (or the student itself) only

    def check(self, where: str) -> None:
        """Value checks beyond the types (the message names `where`, e.g. loss.terms.jsd)."""
        if self.weight < 0:
            raise ConfigError(f"{where}.weight={self.weight} must be >= 0")

    def check_task(self, where: str, task: str) -> None:
        """Checks of settings that only some task families take (the family is known here, not in `check`)."""

    def settings(self) -> Dict[str, Any]:
        """The term's own settings (what its function or module takes)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("weight", "teacher")}

    def as_config(self) -> Dict[str, Any]:
        """Every setting in effect, as the run logs it (the teacher only when one is named)."""
        return {"weight": self.weight, **({"teacher": self.teacher} if self.teacher else {}), **self.settings()}


def _positive(where: str, key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{where}.{key}={value} must be > 0")


@dataclass
class _Tempered(TermSpec):
    temperature: float = 1.0  # softmax temperature; the loss is scaled by T^2 (Hinton et al. 2015)

    def check(self, where: str) -> None:
        super().check(where)
        _positive(where, "temperature", self.temperature)


# ---- ranking: [B, n] scores, column 0 the positive ----

@dataclass
class _ScoreKL(_Tempered):
    """A KL between the teacher's and the student's softmax over a row of ranking scores (listwise, in-batch)."""
    standardize: bool = False  # z-score each row on both sides first (Sun et al. 2024): scale-free
    teacher_scale: float = 1.0  # the teacher's scores times this: a cosine teacher's logits (conf: its fine-tune's)

    def check(self, where: str) -> None:
        super().check(where)
        _positive(where, "teacher_scale", self.teacher_scale)


@term("margin_mse")
@dataclass
class MarginMSE(TermSpec):
    """Margin-MSE, Hofstaetter et al. 2020: mean ((s+ - s-) - (t+ - t-))^2 over every negative."""
    tasks, reads, target = RANKING, "scores", "kdrun.losses.functional.margin_mse"


@term("listwise_kl")
@dataclass
class ListwiseKL(_ScoreKL):
    """Listwise KD (RocketQAv2-style): T^2 KL(p_t || p_s) over each query's 1 positive + k negatives."""
    tasks, reads, target = RANKING, "scores", "kdrun.losses.functional.listwise_kl"


@term("pointwise_mse")
@dataclass
class PointwiseMSE(TermSpec):
    """Pointwise MSE on raw scores, the baseline in Hofstaetter et al. 2020."""
    tasks, reads, target = RANKING, "scores", "kdrun.losses.functional.pointwise_mse"


@term("in_batch_kl")
@dataclass
class InBatchKL(_ScoreKL):
    """TAS-Balanced's in-batch KD (Hofstaetter et al. 2021): T^2 KL over every passage of the batch, per query. Online,
    or precomputed from a bi-encoder teacher (its embeddings are cached; out-of-fold teachers included)."""
    tasks, reads, target = RANKING, "in_batch_scores", "kdrun.losses.functional.in_batch_kl"
    needs, online_teacher = frozenset({"in_batch_scores"}), True


# ---- distributions: classification logits [B, C], LM logits [B, L, V] ----

@term("kd_kl")
@dataclass
class KdKL(_Tempered):
    """Hinton et al. 2015: T^2 KL(p_t^T || p_s^T)."""
    tasks, target = DISTRIBUTIONS, "kdrun.losses.functional.forward_kl"


@term("forward_kl")
@dataclass
class ForwardKL(_Tempered):
    """Word-level KD (Kim & Rush 2016): KL(p_t || p_s) per token, masked."""
    tasks, target = DISTRIBUTIONS, "kdrun.losses.functional.forward_kl"


@term("reverse_kl")
@dataclass
class ReverseKL(_Tempered):
    """MiniLLM (Gu et al. 2024): KL(p_s || p_t)."""
    tasks, target = DISTRIBUTIONS, "kdrun.losses.functional.reverse_kl"


@term("jsd")
@dataclass
class JSD(TermSpec):
    """GKD's generalised JSD (Agarwal et al. 2024), m = beta p_t + (1 - beta) p_s."""
    beta: float = 0.5  # the teacher's share of the mixture, in (0, 1)
    tasks, target = DISTRIBUTIONS, "kdrun.losses.functional.jsd"

    def check(self, where: str) -> None:
        super().check(where)
        if not 0.0 < self.beta < 1.0:
            raise ConfigError(f"{where}.beta={self.beta} must be in (0, 1) for jsd")


@dataclass
class _Skew(TermSpec):
    alpha: float = 0.1  # the share of the other distribution mixed in, in [0, 1)

    def check(self, where: str) -> None:
        super().check(where)
        if not 0.0 <= self.alpha < 1.0:
            raise ConfigError(f"{where}.alpha={self.alpha} must be in [0, 1) for {self.name}")


@term("skew_kl")
@dataclass
class SkewKL(_Skew):
    """DistiLLM (Ko et al. 2024): KL(p_t || a p_t + (1-a) p_s). kdrun returns the KL; DistiLLM's code returns the
    cross-entropy form, larger by the teacher's entropy (the same gradients)."""
    tasks, target = DISTRIBUTIONS, "kdrun.losses.functional.skew_kl"


@term("skew_rkl")
@dataclass
class SkewRKL(_Skew):
    """DistiLLM (Ko et al. 2024): KL(p_s || a p_s + (1-a) p_t)."""
    tasks, target = DISTRIBUTIONS, "kdrun.losses.functional.skew_rkl"


@term("taid")
@dataclass
class TAID(TermSpec):
    """TAID (Shing et al. 2025): KL(q_t || p_s), q_t = softmax((1-t) sg(z_s) + t z_t), t from t_start towards
    t_end, faster while the loss falls. kdrun returns the KL; TAID's code returns the cross-entropy form, larger by
    the target's entropy (the same gradients)."""
    t_start: float = 0.4
    t_end: float = 1.0
    taid_alpha: float = 5e-4  # adaptive step size
    taid_beta: float = 0.99  # momentum of the loss's relative change
    tasks, reads, target = DISTRIBUTIONS, "module", "kdrun.losses.terms.Taid"

    def check(self, where: str) -> None:
        super().check(where)
        if not 0.0 <= self.t_start < self.t_end <= 1.0:
            raise ConfigError(f"{where}: taid needs 0 <= t_start < t_end <= 1 (got t_start={self.t_start}, "
                              f"t_end={self.t_end})")


@term("bd_kd")
@dataclass
class BDKD(_Tempered):
    """BD-KD (Amara et al. 2022): T^2 [(1-w) KL(p_t||p_s) + w KL(p_s||p_t)], per sample w = H_s / (H_s + H_t)."""
    tasks, target = DISTRIBUTIONS, "kdrun.losses.functional.bd_kd"


@term("ce")
@dataclass
class CE(TermSpec):
    """Hard labels, no teacher: the data's labels, the next tokens, or for ranking the positive against every
    passage of the batch (in-batch and sampled negatives; in_batch=false: its own list only, which a cross-encoder
    scores without the B x B*n pairs of in-batch scoring)."""
    in_batch: Optional[bool] = None  # ranking only: the other queries' passages as negatives too (None: true)
    scale: float = 1.0  # ranking only: scores times this before the softmax (a cosine scorer's 1/temperature)
    tasks, reads, target = ANY_TASK, "module", "kdrun.losses.terms.CrossEntropy"
    reads_teacher = False

    def check(self, where: str) -> None:
        if not self.scale > 0:
            raise ConfigError(f"{where}.scale={self.scale} must be > 0 (sentence-transformers' MNRL uses 20 for cosines)")

    def check_task(self, where: str, task: str) -> None:
        if self.in_batch is not None and task != "ranking":
            raise ConfigError(f"{where}.in_batch={self.in_batch}: in-batch negatives are a ranking setting; a {task} "
                              "loss has no passages to take them from (remove it)")
        if self.scale != 1.0 and task != "ranking":
            raise ConfigError(f"{where}.scale={self.scale}: a ranking setting (scores to logits); a {task} loss "
                              "reads the model's logits as they are (remove it)")


@term("dkd")
@dataclass
class DKD(_Tempered):
    """Decoupled KD (Zhao et al. 2022): T^2 (alpha TCKD + beta NCKD), KD split at the target class."""
    alpha: float = 1.0  # the target-class part (binary: the target vs the rest)
    beta: float = 8.0  # the non-target part (among the other classes)
    temperature: float = 4.0
    tasks, reads, target = ("classification",), "labelled", "kdrun.losses.functional.dkd"

    def check(self, where: str) -> None:
        super().check(where)
        if self.alpha < 0 or self.beta < 0:
            raise ConfigError(f"{where}: alpha={self.alpha} and beta={self.beta} must be >= 0")


@term("sinkd")
@dataclass
class SinKD(_Tempered):
    """SinKD (Cui et al. 2024): the entropic optimal-transport (Sinkhorn) cost between the batch's student and
    teacher distributions, batch-wise, in the log domain."""
    temperature: float = 2.0
    epsilon: float = 0.1  # the entropic regularisation (the paper's 0.1)
    iterations: int = 20  # Sinkhorn scalings
    tasks, target = DISTRIBUTIONS, "kdrun.losses.functional.sinkhorn_kd"

    def check(self, where: str) -> None:
        super().check(where)
        _positive(where, "epsilon", self.epsilon)
        if self.iterations < 1:
            raise ConfigError(f"{where}.iterations={self.iterations} must be >= 1")


@term("pld")
@dataclass
class PLD(_Tempered):
    """PLD (Bassam, Zhu and Bian 2025, "A Choice-Theoretic List-Wise Knowledge Distillation"): the label first, then the teacher's order of the other
    classes, each choice weighted by the teacher's probability; no separate CE/KD weights."""
    tasks, reads, target = ("classification",), "labelled", "kdrun.losses.functional.pld"


@term("embedding_align")
@dataclass
class EmbeddingAlignSpec(TermSpec):
    """Embedding alignment (LEAF / DSE-style): the student's embeddings regress onto the teacher's (MSE or cosine,
    a projection when widths differ); no labels or negatives. Bi-encoder student and teacher (online, or one
    precomputed bi-encoder teacher: its cached embeddings)."""
    form: str = "mse"  # mse | cosine
    tasks, reads, target = RANKING, "module", "kdrun.losses.terms.EmbeddingAlign"
    needs, online_teacher = frozenset({"embeddings"}), True

    def check(self, where: str) -> None:
        super().check(where)
        if self.form not in ("mse", "cosine"):
            raise ConfigError(f"{where}.form={self.form}: choose mse or cosine")


@term("dual_head")
@dataclass
class DualHeadSpec(_Tempered):
    """Dual-head KD (DHO, Kang et al. 2025): CE on the student's label head, KD on a second head it adds to the
    student; the student predicts with both (alpha: the label head's share)."""
    label_weight: float = 0.5  # w: the label head's share of the loss
    temperature: float = 2.0
    alpha: float = 0.5  # the label head's share of the student's predictions (inference)
    tasks, reads, target = ("classification",), "module", "kdrun.losses.terms.DualHead"
    student_needs = frozenset({"dual_head"})

    def check(self, where: str) -> None:
        super().check(where)
        for key in ("label_weight", "alpha"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"{where}.{key}={getattr(self, key)} must be in [0, 1]")


@term("pskd")
@dataclass
class PSKDSpec(TermSpec):
    """PS-KD (Kim et al. 2021): self-distillation, targets mixing the labels with the student's own previous-epoch
    predictions, alpha growing linearly to alpha_T over the run. Reads no teacher."""
    alpha_T: float = 0.8  # the final share of the student's own predictions (the paper's 0.8)
    tasks, reads, target = ("classification",), "module", "kdrun.losses.terms.PSKD"
    reads_teacher = False

    def check(self, where: str) -> None:
        super().check(where)
        if not 0.0 <= self.alpha_T <= 1.0:
            raise ConfigError(f"{where}.alpha_T={self.alpha_T} must be in [0, 1]")


# ---- representations (classification): hidden states, attentions, features ----

@dataclass
class _LayerMapped(TermSpec):
    layer_map: Optional[List[int]] = None  # teacher layer (1-based) per student layer; None: the student's origin
    tasks: ClassVar[Tuple[str, ...]] = ("classification",)
    reads: ClassVar[str] = "module"
    online_teacher: ClassVar[bool] = True


@term("hidden_mse")
@dataclass
class HiddenMSE(_LayerMapped):
    """TinyBERT (Jiao et al. 2020): MSE(h_s^i W, h_t^map(i)) per student layer."""
    target, needs = "kdrun.losses.terms.HiddenMSE", frozenset({"hidden_states"})


@term("embedding_mse")
@dataclass
class EmbeddingMSE(TermSpec):
    """TinyBERT's embedding-layer term: MSE(e_s W, e_t)."""
    tasks, reads, target = ("classification",), "module", "kdrun.losses.terms.EmbeddingMSE"
    needs, online_teacher = frozenset({"hidden_states"}), True


@term("attention_mse")
@dataclass
class AttentionMSE(_LayerMapped):
    """TinyBERT's attention transfer (Jiao et al. 2020). form=probs (kdrun's default): MSE between attention
    probabilities per head, padding masked, the mean over mapped layers. form=scores (the paper's and its code's):
    MSE between raw pre-softmax scores, masked entries zeroed, summed over mapped layers."""
    form: str = "probs"  # probs | scores
    target = "kdrun.losses.terms.AttentionMSE"

    @property
    def needs(self) -> FrozenSet[str]:  # what the models must return: probabilities or raw scores
        return frozenset({"attention_scores" if self.form == "scores" else "attentions"})

    def check(self, where: str) -> None:
        super().check(where)
        if self.form not in ("probs", "scores"):
            raise ConfigError(f"{where}.form={self.form}: expected probs (softmax probabilities, masked, mean over "
                              "layers) or scores (TinyBERT's paper: raw pre-softmax scores, summed over layers)")


@term("attention_kl")
@dataclass
class AttentionKL(_LayerMapped):
    """MiniLM (Wang et al. 2020): KL(A_t row || A_s row) per head and query position."""
    target, needs = "kdrun.losses.terms.AttentionKL", frozenset({"attentions"})


@term("feature_norm_direction")
@dataclass
class FeatureNormDirection(TermSpec):
    """ND (Wang et al. 2023): 1 - <f_s, c_y/|c_y|> / max(|f_s|, |f_t|), c_y the teacher classifier's row of the label."""
    tasks, reads, target = ("classification",), "module", "kdrun.losses.terms.FeatureNormDirection"
    needs, online_teacher = frozenset({"features"}), True


# ---- a user's own term, by _target_ ----

@dataclass
class CustomSpec(TermSpec):
    """`loss.terms.NAME._target_=pkg.module.fn`: fn(student_out, teacher_out, batch, **kwargs) -> Tensor, or an
    nn.Module class built with **kwargs whose forward takes (student_out, teacher_out, batch). The callable may say
    what it is with attributes of the same names as a spec's (`tasks`, `needs`, `student_needs`, `online_teacher`)."""
    tasks: ClassVar[Tuple[str, ...]] = ANY_TASK
    reads: ClassVar[str] = "custom"
    kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    _target_: str = ""

    def settings(self) -> Dict[str, Any]:
        return dict(self.kwargs)

    def as_config(self) -> Dict[str, Any]:
        return {"_target_": self._target_, **super().as_config()}


def _import(path: str, where: str):
    import importlib

    module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{where}._target_={path}: cannot import it ({e})") from None


def _custom(key: str, node: Dict[str, Any], where: str) -> CustomSpec:
    """A user's term: its target imported and its settings checked against the callable's signature."""
    node = dict(node)
    target = node.pop("_target_")
    weight, teacher = node.pop("weight", 1.0), node.pop("teacher", None)
    fn = _import(str(target), where)
    call = fn.__init__ if inspect.isclass(fn) else fn
    try:
        params = inspect.signature(call).parameters
    except (TypeError, ValueError):
        params = {}
    positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if inspect.isclass(fn):
        positional = positional[1:]  # self
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
    named = [p.name for p in params.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not inspect.isclass(fn):
        if len(positional) < 3 and not any(p.kind == p.VAR_POSITIONAL for p in params.values()):
            raise ConfigError(f"{where}._target_={target}: a loss term is called as fn(student_out, teacher_out, "
                              f"batch, **settings); {target} takes {[p.name for p in positional]}")
        named = named[3:]
    unknown = [k for k in node if k not in named and not takes_kwargs]
    if unknown:
        raise ConfigError(f"{where}: {target} takes no {', '.join(repr(k) for k in unknown)}; its settings: "
                          f"{['weight', 'teacher', *named]}")
    spec = CustomSpec(weight=float(weight), teacher=teacher, kwargs=node, _target_=str(target))
    for attr in ("tasks", "needs", "student_needs", "online_teacher"):  # what the callable says it is
        if hasattr(fn, attr):
            value = getattr(fn, attr)
            setattr(spec, attr, frozenset(value) if attr.endswith("needs") else
                    tuple(value) if attr == "tasks" else bool(value))
    spec.name = key
    return spec


def parse(terms: Any, task: str, teachers: List[str], online: bool, where: str = "loss.terms",
          cached: FrozenSet[str] = frozenset()) -> Dict[str, TermSpec]:
    """{name: spec} from the config's terms (a mapping of name -> settings), every setting checked: known to the term,
    of its type and range; the term fits the task, has the outputs it reads (`online`: the teacher runs on each
    batch; `cached`: what a precomputed teacher keeps beyond scores, e.g. a bi-encoder's embeddings give
    "in_batch_scores") and names a teacher that exists (`teachers`)."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import ConfigKeyError, ValidationError

    if isinstance(terms, (list, tuple)) or OmegaConf.is_list(terms):
        raise ConfigError(f"{where} is a list; terms are keyed by name now: {where}.NAME.SETTING (e.g. "
                          f"{where}.kd_kl.weight=0.5); see conf/loss/")
    if not terms:
        raise ConfigError(f"{where} is empty: give at least one term, e.g. loss=margin_mse")
    specs: Dict[str, TermSpec] = {}
    for key, node in (terms.items() if hasattr(terms, "items") else []):
        here = f"{where}.{key}"
        values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
        if "_target_" in values:
            spec = _custom(str(key), values, here)
        else:
            cls = TERMS.get(str(key))
            if cls is None:
                from kdrun.names import closest

                guess = closest(str(key), list(TERMS))
                raise ConfigError(f"{here}: no loss term '{key}'" + (f"; did you mean {guess}?" if guess else "")
                                  + f" Terms: {', '.join(sorted(TERMS))} (or {here}._target_=your.function)")
            try:
                spec = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), values))
            except ConfigKeyError as e:
                taken = [f.name for f in dataclasses.fields(cls)]
                raise ConfigError(f"{here}: {key} takes no '{e.key}' (it would be ignored); its settings: "
                                  f"{taken}") from None
            except ValidationError as e:
                raise ConfigError(f"{here}.{e.key}: {e.msg.splitlines()[0]}") from None
        spec.check(here)
        if task not in spec.tasks:
            fits = sorted(n for n, c in TERMS.items() if task in c.tasks)
            raise ConfigError(f"{here} is a {'/'.join(spec.tasks)} loss, but data.task={task}; losses for {task}: "
                              f"{fits}")
        spec.check_task(here, task)
        if spec.online_teacher and not online and not (spec.needs and spec.needs <= cached):
            hint = (" (or teacher.mode=precompute with one bi-encoder teacher, whose cached embeddings give the in-batch "
                    "scores and the embeddings)") if spec.needs in ({"in_batch_scores"}, {"embeddings"}) else ""
            raise ConfigError(f"{here} reads the teacher's internals, which a precomputed teacher does not keep; "
                              f"set teacher.mode=online{hint}")
        if spec.online_teacher and len(teachers) > 1:
            raise ConfigError(f"{here} reads one teacher's internals; it does not work with several teachers "
                              "(teachers.*)")
        if spec.teacher is not None and spec.teacher not in teachers:
            raise ConfigError(f"{here}.teacher={spec.teacher}: no such teacher; choose one of {teachers} (or null: "
                              "the weighted mean of all)")
        specs[str(key)] = spec
    return specs


def from_list(terms: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """A loss logged before terms were keyed by name ([{name, weight, temperature, alpha, ...}], every shared
    setting present) -> the keyed form, with only the settings each term takes (what its old run used)."""
    out = {}
    for t in terms:
        t = dict(t)
        name = t.pop("name")
        cls = TERMS.get(name)
        taken = {f.name for f in dataclasses.fields(cls)} if cls else set(t)
        out[name] = {k: v for k, v in t.items() if k in taken}
    return out
