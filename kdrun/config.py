"""Config schemas (Hydra structured configs) and the checks that need no model.

Everything here is importable without torch, so `kdrun --help`, `kdrun --cfg job` and every
config error answer fast. The dataclasses are registered in Hydra's ConfigStore as the base of
conf/config.yaml: an unknown key, a wrong type or a value outside an enum fails at composition.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, ListConfig, OmegaConf

from kdrun.errors import ConfigError
from kdrun.names import closest, enum_value, package_dir


class TeacherMode(Enum):
    online = "online"  # the teacher runs on each training batch as it comes
    precompute = "precompute"  # the teacher's outputs over the training data, computed once and cached on disk
    scores_file = "scores_file"  # ranking: precomputed scores read from a file (score_pos score_neg qid pos_id neg_id)


class TrackingFallback(Enum):
    none = "none"  # an unreachable tracking store fails the run before training
    local = "local"  # ... or the run logs to the local store in the working directory (and says so)


class RunMode(Enum):
    train = "train"  # distil a student
    score = "score"  # ranking: write the teacher's scores of the training triples to a file (scores_out)


class StudentArch(Enum):
    bi_encoder = "bi_encoder"  # query and passage encoded apart; dot or cosine of pooled vectors
    late_interaction = "late_interaction"  # ColBERT: per-token vectors projected to student.dim, MaxSim
    cross_encoder = "cross_encoder"  # (query, passage) encoded together; one relevance logit


class Pooling(Enum):
    mean = "mean"
    cls = "cls"


class Similarity(Enum):
    dot = "dot"
    cos = "cos"


class ProjectionInit(Enum):
    pca = "pca"  # the principal directions of the student's token states on training texts (deterministic)
    random = "random"  # torch's default init of a linear layer, drawn from train.seed (ColBERT's)


class StudentInit(Enum):
    pretrained = "pretrained"  # load name/path as it is
    teacher_layers = "teacher_layers"  # embeddings + the listed layers of the teacher (DistilBERT/TinyBERT style)
    scratch = "scratch"  # the teacher's architecture, resized by student.scratch, randomly initialised


class Precision(Enum):
    fp32 = "fp32"
    bf16 = "bf16"  # autocast bf16, no loss scaling
    fp16 = "fp16"  # autocast fp16 + GradScaler


class Device(Enum):
    auto = "auto"  # cuda when available, else cpu
    cpu = "cpu"
    cuda = "cuda"


class Schedule(Enum):
    linear = "linear"  # linear warmup, then linear decay to 0
    constant = "constant"  # linear warmup, then constant


@dataclass
class FinetuneConfig:
    """Fine-tune the teacher first, on the training split (no fine-tuned classifier or ranker for the offline data
    ships). The result is cached by content (base weights, tokenizer, training data, these settings), so a sweep
    fine-tunes once."""
    steps: int = 0  # 0: use the teacher as it is (an already fine-tuned classifier or ranker)
    lr: float = 5e-5
    batch_size: int = 32
    warmup_ratio: float = 0.1
    seed: int = 0
    cache_dir: Optional[str] = None  # None: $KDRUN_CACHE/teachers (KDRUN_CACHE defaults to ~/.cache/kdrun)
    in_batch: Optional[bool] = None  # ranking: other queries' passages as negatives too (None: bi-encoder yes, cross-encoder no)
    folds: int = 1  # ranking: > 1 fine-tunes one teacher per fold of the training queries, each scoring its held-out fold
    negatives: Optional[int] = None  # ranking: the first N of each example's mined negatives (None: all of them)
    scale: float = 1.0  # ranking: scores times this in the fine-tune's cross-entropy (a cosine teacher's 1/temperature)


@dataclass
class TeacherConfig:
    _target_: str = "kdrun.tasks.build_teacher"  # the task family builds it (loaded by kind; fine-tuned first if asked)
    name: Optional[str] = None  # Hugging Face hub name
    path: Optional[str] = None  # local directory; wins over name
    gguf_file: Optional[str] = None  # a GGUF file inside path/name (transformers' gguf_file=)
    kind: str = "bi_encoder"  # bi_encoder, cross_encoder (ranking), classifier, causal_lm: what the task family takes
    mode: TeacherMode = TeacherMode.online
    pooling: Pooling = Pooling.mean  # bi_encoder only
    similarity: Similarity = Similarity.cos  # bi_encoder only
    label_index: int = -1  # cross_encoder: which logit is the relevance score
    max_length: int = 128
    top_k: int = 0  # causal_lm: keep the teacher's top-k log-probs per token (0: full logits)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    cache: bool = True  # mode=precompute: reuse the teacher's outputs across runs (content-addressed, on disk)
    cache_dir: Optional[str] = None  # None: $KDRUN_CACHE/teacher_outputs (KDRUN_CACHE defaults to ~/.cache/kdrun)
    shard_size: int = 50_000  # mode=precompute, ranking: examples per shard of the teacher pass (resume, DDP split)
    scores_file: Optional[str] = None  # mode=scores_file: tab-separated score_pos score_neg query_id pos_id neg_id
    max_missing_fraction: float = 0.0  # mode=scores_file: training examples without scores above this share fail
    weight: float = 1.0  # with several teachers (teachers.<name>): this teacher's share of the averaged outputs


@dataclass
class ScratchConfig:
    """student.init=scratch: the teacher's architecture with these sizes (null: the teacher's)."""
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    intermediate_size: Optional[int] = None


@dataclass
class StudentConfig:
    _target_: str = "kdrun.tasks.build_student"  # the task family builds it
    name: Optional[str] = None
    path: Optional[str] = None
    init: StudentInit = StudentInit.pretrained
    layers: Optional[List[int]] = None  # init=teacher_layers: which teacher layers to keep
    scratch: ScratchConfig = field(default_factory=ScratchConfig)
    tokenizer: Optional[str] = None  # hub name or local dir; None: the student's own, or the teacher's (teacher_layers, scratch)
    arch: StudentArch = StudentArch.bi_encoder  # ranking students
    pooling: Pooling = Pooling.mean  # ranking bi-encoder
    similarity: Similarity = Similarity.dot  # ranking bi-encoder
    dim: int = 128  # ranking late_interaction: per-token vector size
    projection_init: ProjectionInit = ProjectionInit.pca  # ranking late_interaction: how the projection to dim starts
    query_length: int = 0  # ranking late_interaction: queries padded with scored [MASK] tokens to this length (0: off)
    max_length: int = 128
    dropout: Optional[float] = None  # every dropout probability in the student; None: the model's own


@dataclass
class LossConfig:
    """Terms keyed by name, each with its own settings (kdrun/losses/specs.py checks them against the term's spec):
    loss.terms.kd_kl.weight=0.5; a term of your own: loss.terms.NAME._target_=pkg.module.fn."""
    terms: Dict[str, Any] = field(default_factory=dict)  # (the loss yaml fills it: a default here would merge in)


@dataclass
class DataConfig:
    """Base of every data option; `task` picks the task family (kdrun/tasks/: which teachers and losses fit)."""
    _target_: str = MISSING
    task: str = MISSING  # the data option says which family it feeds
    eval_fraction: float = 0.2  # share held out for evaluation
    split_salt: str = "kdrun-v1"  # the held-out split is a hash of (salt, item): stable across seeds
    seed: int = 13


@dataclass
class ChatterbotData(DataConfig):
    _target_: str = "kdrun.data.chatterbot.load"
    task: str = "ranking"
    language: str = "english"
    negatives_per_query: int = 1  # negatives in each training example (margin_mse: 1)
    examples_per_pair: int = 3  # training examples drawn per (query, positive) pair per epoch
    mine_depth: int = 30  # negatives are sampled from the BM25 top-k that are not positives
    eval_candidates: int = 50  # candidates re-ranked per held-out query (positives + BM25 top)
    max_train_queries: Optional[int] = None  # caps for quick smoke runs; None: all
    max_eval_queries: Optional[int] = None


@dataclass
class CodeSearchData(DataConfig):
    """Docstring summary -> function, from installed Python sources (see kdrun/data/code_search.py)."""
    _target_: str = "kdrun.data.code_search.load"
    task: str = "ranking"
    packages: List[str] = field(default_factory=lambda: ["stdlib", "sympy", "numpy", "networkx", "pandas"])
    max_code_chars: int = 2000  # each function's source is cut here (models truncate to max_length tokens anyway)
    negatives_per_query: int = 1
    examples_per_pair: int = 1
    mine_depth: int = 30
    eval_candidates: int = 50  # per held-out query: its function + BM25's top other functions
    max_train_queries: Optional[int] = None
    max_eval_queries: Optional[int] = None


@dataclass
class TriplesData(DataConfig):
    """Ranking data in MS MARCO's layout (see kdrun/data/triples.py): tab-separated files joined by ids."""
    _target_: str = "kdrun.data.triples.load"
    task: str = "ranking"
    collection: str = MISSING  # pid <TAB> passage
    queries: str = MISSING  # qid <TAB> query
    triples: str = MISSING  # qid <TAB> pos_pid <TAB> neg_pid (or a Margin-MSE score file)
    qrels: str = MISSING  # held-out relevance: TREC qrels or qid <TAB> pid
    eval_queries: Optional[str] = None  # None: the held-out queries are in `queries` too
    eval_candidates_file: Optional[str] = None  # a TREC run (or qid <TAB> pid) to re-rank; None: BM25 over the collection
    negatives_per_query: int = 1
    eval_depth: int = 1000  # candidates re-ranked per held-out query, from the run's top (the standard protocol)
    max_train_examples: Optional[int] = None
    max_eval_queries: Optional[int] = None


@dataclass
class FortunesData(DataConfig):
    _target_: str = "kdrun.data.fortunes.load_classification"
    task: str = "classification"
    path: Optional[str] = None  # the fortunes folder; None: the standard places (see kdrun.data.fortunes)
    categories: List[str] = field(default_factory=lambda: ["computers", "politics", "science", "songs-poems"])
    max_words: int = 200  # longer fortunes are skipped (poems, ASCII art)
    max_train: Optional[int] = None
    max_eval: Optional[int] = None


@dataclass
class TextClassificationData(DataConfig):
    """Any labelled text set through Hugging Face `datasets`: a hub name, or local csv/json/parquet files."""
    _target_: str = "kdrun.data.text_classification.load"
    task: str = "classification"
    name: Optional[str] = None  # hub dataset name, e.g. ag_news
    path: Optional[str] = None  # local file(s): csv, json/jsonl or parquet; wins over name
    text_field: str = "text"
    label_field: str = "label"
    train_split: str = "train"
    eval_split: Optional[str] = None  # None: hold out eval_fraction of train by hash
    max_train: Optional[int] = None
    max_eval: Optional[int] = None


@dataclass
class FortunesLMData(DataConfig):
    _target_: str = "kdrun.data.fortunes.load_corpus"
    task: str = "causal_lm"
    path: Optional[str] = None
    categories: Optional[List[str]] = None  # None: every category
    block_size: int = 128  # tokens per packed training/eval block
    max_train_blocks: Optional[int] = None
    max_eval_blocks: Optional[int] = None


@dataclass
class LMData(DataConfig):
    """Causal-LM data from a user's file, a save_to_disk folder or a hub dataset (kdrun/data/lm.py): plain text
    (packed into blocks), prompt/completion pairs or chat `messages` (the student's chat template; loss on the
    completion or the assistant's turns only)."""
    _target_: str = "kdrun.data.lm.load"
    task: str = "causal_lm"
    name: Optional[str] = None  # hub dataset name
    path: Optional[str] = None  # a file (csv, tsv, json, jsonl, parquet) or a save_to_disk folder; wins over name
    format: str = "auto"  # auto | text | prompt_completion | messages (auto: from the columns)
    text_field: str = "text"  # format=text: the documents' column
    train_split: str = "train"
    eval_split: Optional[str] = None  # None: hold out eval_fraction of train by a hash of each row
    block_size: int = 128  # format=text: tokens per packed block
    max_length: int = 256  # prompt/completion and messages: tokens per example (longer ones are cut at the end)
    max_train: Optional[int] = None  # rows (documents or conversations) kept for training; None: all
    max_eval: Optional[int] = None
    max_train_blocks: Optional[int] = None  # format=text
    max_eval_blocks: Optional[int] = None


@dataclass
class ChatterbotChatData(LMData):
    """chatterbot-corpus conversations as chat data (kdrun/data/chatterbot.py: load_chat), through data=lm's loader."""
    _target_: str = "kdrun.data.chatterbot.load_chat"
    language: str = "english"
    format: str = "messages"


@dataclass
class RankingColumnsData(DataConfig):
    """Ranking data in sentence-transformers' column layout (kdrun/data/ranking_columns.py): (anchor | query,
    positive[, negative | negative_1..k][, score | scores | margin | label]) rows from a file, a folder or the hub."""
    _target_: str = "kdrun.data.ranking_columns.load"
    task: str = "ranking"
    name: Optional[str] = None
    path: Optional[str] = None
    train_split: str = "train"
    eval_split: Optional[str] = None  # None: hold out eval_fraction of the queries by hash
    negatives_per_query: int = 1  # per training example: the row's negatives first, then BM25's from the positives
    mine_depth: int = 30
    eval_candidates: int = 50  # per held-out query: its positives and BM25's top from every positive of the data
    max_train_queries: Optional[int] = None
    max_eval_queries: Optional[int] = None


@dataclass
class HardwareConfig:
    """A machine profile (conf/hardware/). Several processes (torchrun: WORLD_SIZE > 1) train with DDP, whatever
    the profile; `multi_gpu` is the profile meant for that."""
    device: Device = Device.cpu
    precision: Precision = Precision.fp32
    batch_size: int = 32  # per process; train.batch_size follows it unless set
    grad_accum: int = 1  # train.grad_accum follows it unless set
    num_workers: int = 0  # DataLoader worker processes (collation, padding)
    compile: bool = False  # torch.compile the student's encoder (opt-in: compiling takes a while)
    pad_to_multiple_of: int = 8  # sequence lengths padded up to a multiple of this (8/16 suit tensor cores)
    length_groups: int = 4  # a ranking student's texts in a batch, split into up to N length groups, each padded apart
    distributed: bool = False  # true (multi_gpu): refuse to run unless launched by torchrun
    threads: int = 0  # CPU threads of torch's operators (0: torch's default, one per core); 1 for parallel sweep jobs


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
class OnPolicyConfig:
    """Causal LM, GKD-style (Agarwal et al. 2024): the student writes the continuations it trains on."""
    fraction: float = 0.0  # lambda: the share of each batch's prompts the student continues (0: off-policy, the data's)
    temperature: float = 1.0  # sampling temperature of the student's continuations
    top_p: float = 1.0
    max_new_tokens: int = 32
    eval_samples: int = 8  # held-out prompts the student continues at each evaluation, for the KL on its own samples (0: none)


@dataclass
class TrainConfig:
    max_steps: int = -1  # > 0 wins over epochs
    epochs: float = 1.0
    batch_size: int = II("hardware.batch_size")  # per process (DDP: the global batch is this x processes x grad_accum)
    grad_accum: int = II("hardware.grad_accum")
    eval_every: int = 0  # 0: evaluate before training and at the end only
    eval_batch_size: int = 128
    eval_cache: bool = True  # reuse evaluations before training of unchanged models (the teacher across a sweep)
    log_every: Optional[int] = None  # None: every max_steps // 25 steps, between 1 and 10 (a curve even for short runs)
    seed: int = 42
    max_nonfinite_skips: int = 0  # > 0: skip up to N steps with a non-finite loss or gradient (else: stop the run)
    checkpoint_every: int = 500  # steps between checkpoints in <output_dir>/checkpoints (0: only on SIGTERM/SIGINT)
    keep_checkpoints: int = 2  # the newest N are kept
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)  # causal LM: the student's own samples


@dataclass
class TrackingConfig:
    uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else MLflow's default local store
    experiment: str = "kdrun"
    run_name: Optional[str] = None
    log_student: bool = True  # the student: output_dir/student/ and artifacts student/ (Hugging Face format, a model
    # card), and the run's MLflow logged model "student" in the flavor that fits (kdrun.logged_model)
    register_as: Optional[str] = None  # NAME: each run's logged student becomes a new version of NAME in the registry
    system_metrics: bool = True  # MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py)
    tags: Dict[str, str] = field(default_factory=dict)  # extra MLflow tags: +tracking.tags.team=search
    fallback: TrackingFallback = TrackingFallback.none  # local: log to ./mlflow.db when the store cannot be reached


class Direction(Enum):
    maximize = "maximize"
    minimize = "minimize"


@dataclass
class SweepConfig:
    """What kdrun returns to Hydra's sweepers (the optuna sweeper optimises it)."""
    objective: Optional[str] = None  # e.g. eval/student/ndcg_at_10; None: the task's primary held-out metric
    direction: Optional[Direction] = None  # None: from the metric (perplexity, losses, latency: minimize)


@dataclass
class OptunaSweeperConfig:
    """hydra/sweeper=optuna: kdrun's sweeper over optuna's ask/tell (hydra_plugins/kdrun_optuna_sweeper/)."""
    _target_: str = "hydra_plugins.kdrun_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    n_trials: int = 8
    n_jobs: int = 1  # trials launched together (through the launcher: hydra/launcher=joblib runs them in parallel)
    sampler: str = "tpe"  # tpe | random
    seed: int = 0
    params: Dict[str, str] = field(default_factory=dict)  # search space, Hydra sweep syntax per key
    study_name: Optional[str] = None
    storage: Optional[str] = None  # an optuna storage URL to keep and resume the study


@dataclass
class StageConfig:
    """One stage of a staged run (kdrun/stages.py): a name and the overrides it adds to the command's config."""
    name: str = MISSING
    overrides: List[str] = field(default_factory=list)


@dataclass
class KdrunConfig:
    teacher: TeacherConfig = MISSING
    teachers: Dict[str, TeacherConfig] = field(default_factory=dict)  # more teachers: +teacher@teachers.NAME=OPTION
    student: StudentConfig = MISSING
    loss: LossConfig = MISSING
    data: DataConfig = MISSING
    hardware: HardwareConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    output_dir: str = "${hydra:runtime.output_dir}"
    mode: RunMode = RunMode.train
    scores_out: str = "${output_dir}/teacher_scores.tsv"  # mode=score: where the scores go
    resume: Optional[str] = None  # auto: the newest checkpoint in output_dir, if any; PATH: a checkpoint or output dir
    stages: List[StageConfig] = field(default_factory=list)  # a chain of runs, each from the last one's student


DATA_SCHEMAS = {"chatterbot": ChatterbotData, "code_search": CodeSearchData, "triples": TriplesData, "fortunes": FortunesData,
                "text_classification": TextClassificationData, "fortunes_lm": FortunesLMData, "lm": LMData,
                "chatterbot_chat": ChatterbotChatData, "ranking_columns": RankingColumnsData}


def run_stamp() -> str:
    """A run (or sweep) directory's name under outputs/ or multirun/: `YYYY-MM-DD/HH-MM-SS-ID`, unique per process
    (ID: the process id), where Hydra's `${now:...}` alone gave two runs started in the same second one directory.
    Under torchrun every rank of one job gets the same name: the time and id of the torchrun agent (the ranks' parent
    process), read from /proc where there is one (elsewhere the rank's own clock, to the second)."""
    import datetime

    pid, started = os.getpid(), time.time()
    if os.environ.get("LOCAL_RANK") is not None and os.environ.get("TORCHELASTIC_RUN_ID") is not None:
        pid = os.getppid()
        try:  # the agent's start: boot time + its start in clock ticks (field 22 of /proc/PID/stat)
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                        if line.startswith("btime"))
            started = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, StopIteration):
            pass
    return datetime.datetime.fromtimestamp(started).strftime("%Y-%m-%d/%H-%M-%S") + f"-{pid}"


def register() -> None:
    """Put the schemas in Hydra's ConfigStore and the resolvers in OmegaConf (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="kdrun_schema", node=KdrunConfig)
    cs.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConfig, provider="kdrun")
    for name, node in DATA_SCHEMAS.items():  # each data option extends one (`- /schema/data/<name>@_here_`)
        cs.store(group="schema/data", name=name, node=node)
    if not OmegaConf.has_resolver("pkg_dir"):
        OmegaConf.register_new_resolver("pkg_dir", package_dir)
    if not OmegaConf.has_resolver("kdrun_stamp"):  # cached: a sweep's jobs get their parent's (Hydra copies the cache)
        OmegaConf.register_new_resolver("kdrun_stamp", run_stamp, use_cache=True)


_OPEN = object()  # a Dict[str, ...] field: its keys are the user's (tracking.tags.NAME, teachers.NAME)


def _fields(schema) -> Dict[str, Any]:
    """A dataclass's fields and what each holds: another dataclass, _OPEN (a dict of user keys) or None (a value);
    a list of dataclasses is described by its element."""
    import typing

    out = {}
    for f in dataclasses.fields(schema):
        hint = typing.get_type_hints(schema)[f.name]
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (dict, Dict):
            out[f.name] = (_OPEN, args[1] if dataclasses.is_dataclass(args[1]) else None)
        elif origin in (list, List) and args and dataclasses.is_dataclass(args[0]):
            out[f.name] = args[0]
        elif dataclasses.is_dataclass(hint):
            out[f.name] = hint
        else:
            out[f.name] = None
    return out


def schema_keys() -> List[str]:
    """Every setting's dotted key (data.* from every data option's schema), for did-you-mean suggestions."""
    def walk(schema, prefix: str) -> List[str]:
        keys = []
        for name, kind in _fields(schema).items():
            if schema is KdrunConfig and name == "data":
                keys += sorted({k for s in DATA_SCHEMAS.values() for k in walk(s, "data.")})
            elif isinstance(kind, tuple):  # tracking.tags.NAME, teachers.NAME.*, loss.terms.NAME
                keys += walk(kind[1], f"{prefix}{name}.NAME.") if kind[1] else [f"{prefix}{name}.NAME"]
            elif kind is not None:
                keys += walk(kind, f"{prefix}{name}.")
            else:
                keys.append(prefix + name)
        return keys

    return walk(KdrunConfig, "")


def check_known_keys(cfg: Any) -> None:
    """Hydra lets `+train.max_step=5` add a key that no kdrun code reads (its own hint after a typo says to): every key
    must be a field of its section's schema, but under the extension points (tracking.tags.NAME, teachers.NAME)."""
    def children(node: Any):  # (key, child container), interpolations left unresolved
        keys = range(len(node)) if isinstance(node, ListConfig) else list(node)
        for key in keys:
            if OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
                continue
            if isinstance(node[key], (DictConfig, ListConfig)):
                yield key, node[key]

    def walk(node: Any, path: str) -> None:
        schema = OmegaConf.get_type(node)
        if isinstance(node, DictConfig) and dataclasses.is_dataclass(schema):
            fields = _fields(schema)
            for key in node:
                if key not in fields:
                    where = f"{path}.{key}" if path else str(key)
                    guess = closest(where, [f"{path}.{k}" if path else k for k in fields])
                    raise ConfigError(f"{where} is not a kdrun setting (added with '+'?)"
                                      + (f"; did you mean {guess}?" if guess else "")
                                      + f" {path or 'the config'} has: {', '.join(fields)}")
        for key, child in children(node):  # lists and open dicts (teachers.NAME) hold schemas too
            walk(child, f"{path}.{key}" if path else str(key))

    walk(cfg, "")


# Ranges of numeric settings the schema types alone let through (every float must also be finite; a list of
# numbers holds numbers). Keys are dotted paths; "*" matches one level (teachers.NAME, data options). A bound in
# parentheses is open. Cross-field checks stay in validate().
RANGES = {
    "optimizer.weight_decay": "[0, inf)", "optimizer.eps": "(0, inf)", "optimizer.betas.*": "[0, 1)",
    "train.epochs": "[0, inf)", "train.max_steps": "[-1, inf)",
    "*.finetune.lr": "(0, inf)", "*.finetune.batch_size": "[1, inf)", "*.finetune.warmup_ratio": "[0, 1)",
    "*.finetune.folds": "[1, inf)", "teachers.*.finetune.folds": "[1, inf)",
    "*.finetune.scale": "(0, inf)", "teachers.*.finetune.scale": "(0, inf)",
    "*.max_length": "[1, inf)", "teachers.*.max_length": "[1, inf)", "student.layers.*": "[0, inf)",
    "student.query_length": "[0, inf)",
    "data.mine_depth": "[1, inf)", "data.max_*": "[1, inf)", "data.block_size": "[2, inf)",
    "sweep.n_trials": "[1, inf)",
}  # (more ranges are checked in validate() and the families' check(), with hints: lr, dropout, eval_fraction, ...)
_MLFLOW_TAG_KEY, _MLFLOW_TAG_VALUE = 250, 5000  # MLflow's limits (a longer tag fails the run when it is logged)


def _bounds(spec: str):
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    return lo, spec[0] == "[", hi, spec[-1] == "]"


def check_numbers(cfg: Any) -> None:
    """Every number finite and within RANGES, every list of numbers flat, every tag within MLflow's limits. (The
    schema checks types only: train.epochs=inf, optimizer.betas=[2,3] or student.layers=[0,[5]] passed it and failed
    later with a traceback.)"""
    import fnmatch
    import math

    def walk(node, where):
        if OmegaConf.is_dict(node):
            for k in node:
                try:
                    child = node[k]
                except Exception:  # a missing value or an interpolation only Hydra's run resolves: not a number
                    continue
                walk(child, f"{where}.{k}")
            return
        if OmegaConf.is_list(node):
            for i, item in enumerate(node):
                if OmegaConf.is_config(item) and any(fnmatch.fnmatch(f"{where}.{i}", pat) for pat in RANGES):
                    raise ConfigError(f"{where}={OmegaConf.to_container(node)}: each item must be a number, not a list "
                                      f"(item {i}: {OmegaConf.to_container(item)})")
                walk(item, f"{where}.{i}")
            return
        value = node
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}={value} must be a finite number")
        for pattern, spec in RANGES.items():
            if fnmatch.fnmatchcase(where, pattern) and pattern.count(".") == where.count("."):
                lo, lo_in, hi, hi_in = _bounds(spec)
                if value < lo or (value == lo and not lo_in) or value > hi or (value == hi and not hi_in):
                    raise ConfigError(f"{where}={value} must be in {spec}")

    for section in [k for k in cfg if k != "hydra"]:
        try:
            walk(cfg[section], section)
        except ConfigError:
            raise
        except Exception:  # (unresolvable at validation time: checked where it is used)
            continue
    if len(cfg.optimizer.betas) != 2:
        raise ConfigError(f"optimizer.betas={list(cfg.optimizer.betas)} must be two numbers in [0, 1), e.g. [0.9,0.999]")
    for k, v in cfg.tracking.tags.items():
        if len(str(k)) > _MLFLOW_TAG_KEY or len(str(v)) > _MLFLOW_TAG_VALUE:
            raise ConfigError(f"tracking.tags.{str(k)[:40]}...: MLflow takes tag names up to {_MLFLOW_TAG_KEY} and "
                              f"values up to {_MLFLOW_TAG_VALUE} characters (this one: {len(str(k))} and {len(str(v))})")


def teacher_keeps(cfg: Any) -> frozenset:
    """What a precomputed teacher's cache entry keeps beyond its scores: one bi-encoder ranking teacher keeps its
    embeddings, which give the in-batch scores (in_batch_kl) of any batch and the embeddings (embedding_align)."""
    t = cfg.teacher
    one_bi_encoder = str(cfg.data.task) == "ranking" and not cfg.teachers and enum_value(t.kind) == "bi_encoder"
    kept = frozenset({"in_batch_scores", "embeddings"})
    return kept if enum_value(t.mode) == "precompute" and one_bi_encoder else frozenset()


def validate(cfg: Any) -> None:
    """Cross-field checks the schema cannot express; the task family's own checks; every loss term against its spec.
    Raises ConfigError naming the key and the fix."""
    from kdrun import tasks
    from kdrun.losses import specs

    check_known_keys(cfg)
    check_numbers(cfg)
    try:
        out = str(cfg.output_dir)
    except Exception:  # noqa: BLE001 - outside a Hydra run (a test's composed config): Hydra's default applies
        out = None
    if out is not None and not out.strip():
        raise ConfigError("output_dir='' would write checkpoints and the student into the working directory; give a "
                          "directory (or leave output_dir out: Hydra's run directory)")
    if cfg.tracking.register_as is not None and (not str(cfg.tracking.register_as).strip()
                                                  or not cfg.tracking.log_student):
        raise ConfigError(f"tracking.register_as={cfg.tracking.register_as!r} registers the run's logged student: give "
                          "a model name, and keep tracking.log_student=true (the student is what gets registered)")
    t, s, tr, d = cfg.teacher, cfg.student, cfg.train, cfg.data
    for key in d:
        if OmegaConf.is_missing(d, key):
            raise ConfigError(f"data.{key} has no value; set it, e.g. data.{key}=/path/to/file (see conf/data/)")
    task, mode = str(d.task), enum_value(t.mode)
    fam = tasks.family(task)
    _validate_teacher(t, "teacher", fam, str(d.get("_target_", "")))
    _validate_teachers(cfg, fam, mode)
    if enum_value(cfg.mode) == "score" and (not fam.scores_file or mode == "scores_file"):
        raise ConfigError("mode=score writes a teacher's scores of the training triples to a file: it needs data of "
                          f"a family with score files (data.task={task}) and a teacher model (teacher.mode={mode})")
    init = enum_value(s.init)
    if enum_value(s.arch) not in fam.student_archs:
        raise ConfigError(f"student.arch={enum_value(s.arch)}: a {task} student is one of {list(fam.student_archs)}")
    if s.query_length > s.max_length:
        raise ConfigError(f"student.query_length={s.query_length} pads queries beyond student.max_length="
                          f"{s.max_length}: set it at most {s.max_length} (ColBERT uses 32), or 0 for no expansion")
    if s.dropout is not None and not 0.0 <= s.dropout < 1.0:
        raise ConfigError(f"student.dropout={s.dropout} must be in [0, 1) (or null: the model's own)")
    if mode == "scores_file" and init in ("teacher_layers", "scratch") and not (t.name or t.path or s.name or s.path):
        raise ConfigError(f"student.init={init} copies or resizes a model, and a scores_file teacher has none: set "
                          "teacher.path (the model the scores came from) or student.path/student.name")
    if init == "teacher_layers":
        if not s.layers:
            raise ConfigError("student.layers must list teacher layers to keep when student.init=teacher_layers, "
                              "e.g. student.layers=[0,5]")
        if len(set(s.layers)) != len(s.layers):  # (>= 0: RANGES)
            raise ConfigError(f"student.layers={list(s.layers)}: layer indices must be distinct and >= 0")
    elif init == "pretrained" and not s.name and not s.path:
        raise ConfigError("student: set student.name (a hub name) or student.path=/local/dir, or "
                          "student.init=teacher_layers")
    if init == "scratch":
        for key, value in s.scratch.items():
            if value is not None and value < 1:
                raise ConfigError(f"student.scratch.{key}={value} must be >= 1 (or null: the teacher's)")
    for key in ("batch_size", "grad_accum", "log_every", "eval_batch_size"):
        if tr[key] is not None and tr[key] < 1:
            raise ConfigError(f"train.{key}={tr[key]} must be >= 1")
    hw = cfg.hardware
    if hw.distributed and "WORLD_SIZE" not in os.environ:
        raise ConfigError("hardware=multi_gpu trains with one process per GPU: launch it with torchrun, e.g. "
                          "`torchrun --nproc_per_node=NUM_GPUS -m kdrun hardware=multi_gpu ...` (one GPU: hardware=gpu)")
    for key in ("pad_to_multiple_of", "length_groups"):
        if hw[key] < 1:
            raise ConfigError(f"hardware.{key}={hw[key]} must be >= 1")
    if hw.threads < 0:
        raise ConfigError(f"hardware.threads={hw.threads} must be >= 0 (0: torch's default, one per core)")
    if hw.num_workers < 0:
        raise ConfigError(f"hardware.num_workers={hw.num_workers} must be >= 0")
    if tr.checkpoint_every < 0 or tr.keep_checkpoints < 1:
        raise ConfigError(f"train.checkpoint_every={tr.checkpoint_every} must be >= 0 (0: only on SIGTERM/SIGINT) and "
                          f"train.keep_checkpoints={tr.keep_checkpoints} >= 1")
    if tr.max_nonfinite_skips < 0:
        raise ConfigError(f"train.max_nonfinite_skips={tr.max_nonfinite_skips} must be >= 0 (0: stop at the first)")
    if tr.max_steps <= 0 and tr.epochs <= 0:
        raise ConfigError("set train.max_steps > 0 or train.epochs > 0")
    if tr.eval_every < 0:
        raise ConfigError(f"train.eval_every={tr.eval_every} must be >= 0 (0: only before and after training)")
    specs.parse(cfg.loss.terms, task, ["teacher", *cfg.teachers], online=mode == "online", cached=teacher_keeps(cfg))
    objective = cfg.sweep.objective
    if objective:
        known = [f"eval/{who}/{m}" for who in ("student", "teacher") for m in (*fam.run_metrics(cfg.data), "ms_per_example")]
        if objective not in known:
            raise ConfigError(f"sweep.objective={objective} is not a held-out metric of a {task} run; choose one of "
                              f"{known}")
    if t.shard_size < 1:
        raise ConfigError(f"teacher.shard_size={t.shard_size} must be >= 1 (training examples per shard of a teacher pass)")
    if t.top_k < 0:
        raise ConfigError(f"teacher.top_k={t.top_k} must be >= 0 (0: full logits)")
    if t.top_k and not fam.sparse_teacher:
        raise ConfigError(f"teacher.top_k={t.top_k}: a {task} teacher gives its full outputs (top-k log-probs are "
                          "for language-model teachers)")
    if t.finetune.steps < 0:
        raise ConfigError(f"teacher.finetune.steps={t.finetune.steps} must be >= 0")
    if t.finetune.steps and not fam.finetunes_teacher:
        raise ConfigError(f"teacher.finetune.steps={t.finetune.steps}: kdrun fine-tunes classifier and ranking "
                          f"teachers, not {task} teachers (teacher.kind={t.kind})")
    for name, tc in [("teacher", t), *((f"teachers.{n}", c) for n, c in cfg.teachers.items())]:
        if tc.finetune.folds > 1 and (task != "ranking" or not tc.finetune.steps or mode not in ("precompute",)):
            raise ConfigError(f"{name}.finetune.folds={tc.finetune.folds}: out-of-fold teachers are fine-tuned ranking "
                              "teachers whose scores are precomputed: set teacher.finetune.steps > 0 and "
                              "teacher.mode=precompute, with ranking data (or folds=1)")
        if tc.finetune.negatives is not None and (task != "ranking" or tc.finetune.negatives < 0):
            raise ConfigError(f"{name}.finetune.negatives={tc.finetune.negatives}: how many of each example's mined "
                              "negatives a ranking teacher fine-tunes on; give a number >= 0 with ranking data (or "
                              "remove it: all of them)")
        if (tc.finetune.negatives == 0 and tc.finetune.in_batch is False) or (
                tc.finetune.negatives == 0 and tc.finetune.in_batch is None and enum_value(tc.kind) == "cross_encoder"):
            raise ConfigError(f"{name}.finetune.negatives=0 without in-batch negatives leaves each positive nothing to "
                              f"rank against; set {name}.finetune.in_batch=true or negatives >= 1")
        if tc.finetune.scale != 1.0 and task != "ranking":
            raise ConfigError(f"{name}.finetune.scale={tc.finetune.scale}: a ranking teacher's score scale in its "
                              f"fine-tune; a {task} teacher fine-tunes on its labels' logits (remove it)")
        if tc.finetune.in_batch is not None and task != "ranking":
            raise ConfigError(f"{name}.finetune.in_batch={tc.finetune.in_batch}: in-batch negatives are a ranking "
                              f"setting; a {task} teacher fine-tunes on its labels (remove it)")
    if not 0.0 < d.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={d.eval_fraction} must be between 0 and 1")
    if cfg.train.on_policy.fraction and task != "causal_lm":
        raise ConfigError(f"train.on_policy.fraction={cfg.train.on_policy.fraction}: on-policy distillation trains a "
                          f"causal LM on its own samples; a {task} run has none (remove it)")
    fam.check(cfg)
    if not 0.0 <= cfg.optimizer.warmup_ratio < 1.0:
        raise ConfigError(f"optimizer.warmup_ratio={cfg.optimizer.warmup_ratio} must be in [0, 1)")
    if cfg.optimizer.lr <= 0:
        raise ConfigError(f"optimizer.lr={cfg.optimizer.lr} must be > 0")


SCORED_DATA = ("kdrun.data.ranking_columns.load",)  # data options whose rows may carry the teacher's scores


def _validate_teacher(t: Any, where: str, fam: Any, data_target: str = "") -> None:
    from kdrun import tasks

    mode = enum_value(t.mode)
    if mode == "scores_file":
        if not fam.scores_file:
            raise ConfigError(f"{where}.mode=scores_file reads ranking scores (score_pos score_neg query_id pos_id "
                              f"neg_id); data.task={fam.name} needs a teacher model (mode=online or precompute)")
        if not t.scores_file and data_target not in SCORED_DATA:
            raise ConfigError(f"{where}.mode=scores_file: set {where}.scores_file=FILE (tab-separated score_pos "
                              "score_neg query_id pos_id neg_id, as written by `kdrun mode=score`), or use "
                              "data=ranking_columns with a score column")
    elif not t.name and not t.path:
        raise ConfigError(f"{where}: set {where}.name (a hub name) or {where}.path=/local/dir")
    if not 0.0 <= t.max_missing_fraction < 1.0:
        raise ConfigError(f"{where}.max_missing_fraction={t.max_missing_fraction} must be in [0, 1)")
    if t.weight <= 0:
        raise ConfigError(f"{where}.weight={t.weight} must be > 0")
    if t.kind not in fam.teacher_kinds:
        other = tasks.family_of_kind(t.kind)
        what = f"a {'/'.join(other)} teacher" if other else "no kind of teacher kdrun knows"
        raise ConfigError(f"{where}.kind={t.kind} is {what} but data.task={fam.name} (set by data=); for "
                          f"{fam.name} use {where}.kind in {sorted(fam.teacher_kinds)}, or pick a matching "
                          "teacher=/data= pair (see `kdrun --help`, or an experiment= preset)")


def _validate_teachers(cfg: Any, fam: Any, mode: str) -> None:
    """Several teachers: cfg.teachers holds the ones beyond cfg.teacher; all run in cfg.teacher.mode."""
    if not cfg.teachers:
        return
    if not fam.several_teachers:
        raise ConfigError(f"several teachers (teachers.*): a {fam.name} run takes one")
    if mode == "scores_file":
        raise ConfigError("several teachers need teacher models: teacher.mode=scores_file takes one scores file")
    for name, t in cfg.teachers.items():
        if name == "teacher":
            raise ConfigError("teachers.teacher: the name 'teacher' means the main teacher; pick another name")
        _validate_teacher(t, f"teachers.{name}", fam)
        if enum_value(t.mode) == "scores_file":
            raise ConfigError(f"teachers.{name}.mode=scores_file: extra teachers must be models")
