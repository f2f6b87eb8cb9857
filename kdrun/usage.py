"""The command line as a person meets it: `kdrun --help`, `kdrun --cfg job`, and one line with the closest valid
spelling for whatever was mistyped (a flag, a group option, a key, a value of the wrong type).

What Hydra would otherwise answer with many lines (or not at all: `+train.max_step=5` is accepted as a new key) is
checked here or translated from Hydra's own exception. Imports no torch: all of it answers in well under a second.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from kdrun import config
from kdrun.errors import ConfigError
from kdrun.names import closest

GROUPS = ("teacher", "student", "loss", "data", "hardware", "optimizer", "experiment")  # kdrun's own config groups
# Hydra's flags (hydra/_internal/utils.py get_args_parser): those that take a value, and those that do not
_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir",
                "-cd", "--experimental-rerun"}
_OPTIONAL_VALUE_FLAGS = {"--info", "-i"}
_PLAIN_FLAGS = {"--help", "-h", "--hydra-help", "--version", "--resolve", "--run", "-r", "--multirun", "-m",
                "--shell-completion", "-sc"}
_CFG_VALUES = ("job", "hydra", "all")
_INFO_VALUES = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def split_args(argv: Sequence[str]) -> Tuple[Dict[str, Optional[str]], List[str]]:
    """({flag: value or None}, overrides). Raises ConfigError for a flag Hydra does not have, e.g. `--max-steps 5`."""
    flags: Dict[str, Optional[str]] = {}
    overrides: List[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if arg.startswith("-") and not _is_number(arg):
            if name in _VALUE_FLAGS:
                if not eq:
                    if i + 1 >= len(args):
                        raise ConfigError(f"{name} needs a value (kdrun --help)")
                    value, i = args[i + 1], i + 1
                flags[name] = value
            elif name in _OPTIONAL_VALUE_FLAGS:
                if not eq and i + 1 < len(args) and args[i + 1] in _INFO_VALUES:
                    value, i = args[i + 1], i + 1
                flags[name] = value or None
            elif name in _PLAIN_FLAGS and not eq:
                flags[name] = None
            else:
                following = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("-") \
                    and "=" not in args[i + 1] else None
                raise ConfigError(_not_a_flag(name, value if eq else following))
        else:
            overrides.append(arg)
        i += 1
    for key in ("--cfg", "-c"):
        if key in flags and flags[key] not in _CFG_VALUES:
            raise ConfigError(f"{key} {flags[key]}: expected one of {list(_CFG_VALUES)} (e.g. kdrun --cfg job)")
    return flags, overrides


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _not_a_flag(flag: str, value: Optional[str]) -> str:
    """`--max-steps 5` -> points at train.max_steps=5: kdrun's settings are key=value overrides."""
    word = flag.lstrip("-").replace("-", "_")
    keys = config.schema_keys()
    exact = sorted((k for k in keys if k.split(".")[-1] == word or k == word), key=lambda k: (k.count("."), k))
    match = exact[0] if exact else closest(word, keys)  # --lr: optimizer.lr before teacher.finetune.lr
    example = f"{match}={value if value is not None else '...'}" if match else "train.max_steps=5"
    return (f"{flag} is not an option: kdrun's settings are key=value overrides, e.g. `kdrun {example}`"
            + ("" if match else "; `kdrun --help` lists the groups and keys"))


def group_options(conf_dir: str) -> Dict[str, List[str]]:
    """{group: its options}, from the yaml files under conf/ (Hydra's own groups left out)."""
    root = Path(conf_dir)
    return {g: sorted(p.stem for p in (root / g).glob("*.yaml")) for g in GROUPS if (root / g).is_dir()}


def check_group_options(overrides: Iterable[str], conf_dir: str) -> None:
    """Every option named for a kdrun group exists, sweep values included (`-m loss=margin_mse,nope` fails now, not
    after the first job has run). Overrides Hydra cannot parse are left for Hydra to report."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except Exception:  # noqa: BLE001 - a syntax error: Hydra's parser says where (see explain)
        return
    options = group_options(conf_dir)
    for o in parsed:
        if o.key_or_group not in options or o.is_delete():
            continue
        value = o.value()
        if isinstance(value, ChoiceSweep):
            names = [str(v) for v in value.list]
        elif o.is_sweep_override() or value is None:
            continue  # glob(...) and the like pick among existing options
        else:
            names = [o.get_value_element_as_str()]
        for name in names:
            if name not in options[o.key_or_group]:
                raise ConfigError(unknown_option(o.key_or_group, name, options[o.key_or_group]))


def unknown_option(group: str, name: str, options: Sequence[str]) -> str:
    guess = closest(name, options)
    return (f"{group}={name}: no such option;" + (f" did you mean {group}={guess}?" if guess else "")
            + f" {group} options: {', '.join(options)}")


def explain(exc: BaseException) -> Optional[str]:
    """One line for a config mistake that Hydra or OmegaConf raised while composing; None for anything else."""
    from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, \
        OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    cause = exc.__cause__
    if isinstance(exc, MissingConfigException):
        group, _, name = (exc.missing_cfg_file or "").rpartition("/")
        if group and exc.options is not None:
            return unknown_option(group, name, sorted(exc.options))
        return _first_line(exc)
    if isinstance(exc, OverrideParseException):
        return (f"cannot read the override '{exc.override}': {_first_line(exc)} (overrides are key=value; "
                "https://hydra.cc/docs/advanced/override_grammar/basic)")
    if isinstance(exc, ConfigCompositionException) and isinstance(cause, (ConfigKeyError, ConfigAttributeError)) \
            and getattr(cause, "full_key", None):
        return unknown_key(str(cause.full_key), getattr(cause, "object_type", None))
    if isinstance(exc, ConfigCompositionException) and isinstance(cause, ValidationError):
        override = re.search(r"override (\S+)", str(exc))
        where = override.group(1) if override else cause.full_key
        return f"{where}: {_first_line(cause)}"
    if isinstance(exc, ConfigCompositionException):
        text = str(exc)
        deleted = re.search(r"'([\w.]+)' does not exist", text)
        if "Could not delete" in text and deleted:
            return unknown_key(deleted.group(1))
        if "An item is already at" in text:
            key = re.search(r"already at '([^']+)'", text)
            return (f"{key.group(1) if key else 'that key'} is a kdrun setting already: set it without the '+' "
                    f"({key.group(1) if key else 'key'}=VALUE)")
        return " ".join(text.split()) + (f": {_first_line(cause)}" if cause is not None else "")
    if isinstance(exc, OmegaConfBaseException) and getattr(exc, "full_key", None):
        return f"{exc.full_key}: {_first_line(exc)}"
    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        return " ".join(str(exc).split())
    return None


def _first_line(exc: BaseException) -> str:
    return str(getattr(exc, "msg", None) or exc).strip().splitlines()[0]


def unknown_key(key: str, schema=None) -> str:
    """`train.max_step` -> its closest setting among the keys of the same section (`schema`: the section's dataclass,
    e.g. the chosen data option's), and for data.* the data options that do have it."""
    import dataclasses

    parent, _, leaf = key.rpartition(".")
    head = key.split(".")
    if head[:2] == ["loss", "terms"] and len(head) >= 3:
        return _unknown_term_key(head[2], head[3] if len(head) > 3 else None)
    if head[0] == "teachers" and len(head) >= 2:
        return f"{key}: there is no teacher '{head[1]}' yet; add one with +teacher@teachers.{head[1]}=OPTION"
    if parent == "tracking.tags":
        return f"{key}: a new tag is added with a '+': +{key}=VALUE"
    if dataclasses.is_dataclass(schema):
        siblings = [f"{parent}.{f.name}" if parent else f.name for f in dataclasses.fields(schema)]
    else:
        siblings = [k for k in config.schema_keys() if k.rpartition(".")[0] == parent]
    guess = closest(key, siblings)
    elsewhere = [name for name, s in config.DATA_SCHEMAS.items() if leaf in {f.name for f in dataclasses.fields(s)}] \
        if parent == "data" else []
    return (f"{key} is not a kdrun setting" + (f" of this data option; data={'/'.join(elsewhere)} has it" if elsewhere
                                              else "")
            + (f"; did you mean {guess}?" if guess and not elsewhere else "")
            + (f" ({parent or 'the config'} has: {', '.join(k.rpartition('.')[2] for k in siblings)})" if siblings
               else " (kdrun --help lists the keys)"))


def versions() -> str:
    """`kdrun --version`: kdrun's and its main dependencies' installed versions (no import of them)."""
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    deps = ", ".join(f"{name} {v(name)}" for name in ("torch", "transformers", "hydra-core", "mlflow",
                                                      "sentence-transformers"))
    return f"kdrun {v('kdrun')} ({deps}, {_cuda()})"


def _cuda() -> str:
    """The CUDA torch was built with, and the GPUs it sees (imports torch: a second or two)."""
    try:
        import torch
    except ImportError:
        return "CUDA: torch not installed"
    if torch.version.cuda is None:
        return "CUDA: none (a CPU build of torch)"
    n = torch.cuda.device_count()
    gpus = f"{n} GPU{'s' * (n != 1)}: {torch.cuda.get_device_name(0)}" if n else "no GPU visible"
    return f"CUDA {torch.version.cuda}, {gpus}"


def _unknown_term_key(name: str, setting: Optional[str]) -> str:
    """loss.terms.NAME[.SETTING] that the composed loss does not have: a foreign setting, or a term to add."""
    import dataclasses

    from kdrun.losses.specs import TERMS

    where = f"loss.terms.{name}"
    if setting is None or name not in TERMS:
        return (f"{where}: this loss has no term '{name}'; add a term with a '+': +{where}.weight=W (a kdrun term: "
                f"{', '.join(sorted(TERMS))}) or +{where}._target_=your.module.function")
    taken = [f.name for f in dataclasses.fields(TERMS[name])]
    if setting in taken:
        return f"{where}.{setting}: this loss's yaml does not list it; set it with a '+': +{where}.{setting}=VALUE"
    return f"{where}: {name} takes no '{setting}' (it would be ignored); its settings: {taken}"


# ---- --help and --cfg job, composed once (Hydra's own help recomposes the config store for every option) ----

def compose(conf_dir: str, overrides: Sequence[str], hydra: bool = False):
    """The config these overrides give (sweep values left out), as Hydra composes it for a run."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    single = [o.input_line for o in OverridesParser.create().parse_overrides(list(overrides))
              if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=conf_dir, version_base="1.3", job_name="kdrun"):
        return hydra_compose(config_name="config", overrides=single, return_hydra_config=hydra)


def help_text(conf_dir: str, overrides: Sequence[str], resolve: bool) -> str:
    """conf/hydra/help/kdrun.yaml's template, its groups listed from conf/ and its config composed once."""
    import string

    import yaml

    help_cfg = yaml.safe_load((Path(conf_dir) / "hydra" / "help" / "kdrun.yaml").read_text())
    groups = "\n".join(f"{g}: {', '.join(opts)}" for g, opts in sorted(group_options(conf_dir).items())) + "\n"
    template = help_cfg["template"].replace("${hydra.help.header}", help_cfg["header"]) \
        .replace("${hydra.help.footer}", help_cfg["footer"])
    return string.Template(template).safe_substitute(APP_CONFIG_GROUPS=groups,
                                                     CONFIG=job_config(conf_dir, overrides, resolve))


def job_config(conf_dir: str, overrides: Sequence[str], resolve: bool) -> str:
    """What `kdrun --cfg job [--resolve]` prints. Resolving, ${hydra:runtime.output_dir} is the run directory a run
    started now would get."""
    import os

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    cfg = compose(conf_dir, overrides, hydra=True)
    if resolve:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = os.path.abspath(cfg.hydra.run.dir)
        HydraConfig.instance().set_config(cfg)
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    config.check_known_keys(job)
    if resolve:
        OmegaConf.resolve(job)
    return OmegaConf.to_yaml(job)
