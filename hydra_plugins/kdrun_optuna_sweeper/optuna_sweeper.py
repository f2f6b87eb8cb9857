"""A Hydra Sweeper over current Optuna's ask/tell interface: `kdrun -m hydra/sweeper=optuna ...`.

Why our own: the released hydra-optuna-sweeper (1.3.0) pins optuna<3.0, which current environments do not
install next to other packages; this one needs only optuna's stable ask/tell API (3.x to 5.x).

The search space is Hydra's own sweep syntax, on the command line or in `hydra.sweeper.params`:

    kdrun -m hydra/sweeper=optuna hydra.sweeper.n_trials=12 \\
      'optimizer.lr=tag(log,interval(1e-5,1e-3))' 'loss=choice(margin_mse,listwise_kl)' 'train.batch_size=range(16,65,16)'

interval(a,b) is a float (an int when both ends are ints), tag(log, ...) samples it on a log scale, choice(...)
and range(...) are categorical. Each trial is an ordinary kdrun job (through the configured launcher, so
hydra/launcher=joblib runs `n_jobs` trials at once); its return value, the metric named by `sweep.objective`
(default: the task's primary held-out metric), is told to the study; `sweep.direction` (default: from the
metric) says whether to maximise or minimise. A failed trial is told as failed and the search goes on. The best
trial goes to `optimization_results.yaml` in the sweep directory (and the sweep's MLflow parent run).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf

from kdrun.errors import ConfigError

log = logging.getLogger(__name__)


def distribution(override: Override):
    """Hydra sweep syntax -> an optuna distribution."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    if isinstance(value, (ChoiceSweep, RangeSweep)):
        return CategoricalDistribution(list(override.sweep_string_iterator()))
    raise ConfigError(f"{override.input_line}: the optuna sweeper takes interval(...), tag(log, interval(...)), "
                      "choice(...) or range(...)")


def direction_of(config: DictConfig) -> str:
    """sweep.direction, else the objective's natural direction (losses, perplexity, NLL, KL, latency: minimise)."""
    from kdrun.names import enum_value
    from kdrun.tasks import family

    sweep = config.sweep
    if sweep.direction:
        return enum_value(sweep.direction)
    if not sweep.objective:  # the task family's primary metric, whose direction is "max" or "min"
        return {"max": "maximize", "min": "minimize"}[family(str(config.data.task)).direction]
    name = sweep.objective.rsplit("/", 1)[-1]
    return "minimize" if any(w in name for w in ("loss", "perplexity", "nll", "kl", "ms_per", "mse")) else "maximize"


class OptunaSweeper(Sweeper):
    def __init__(self, n_trials: int = 8, n_jobs: int = 1, sampler: str = "tpe", seed: int = 0,
                 params: Optional[Dict[str, str]] = None, study_name: Optional[str] = None,
                 storage: Optional[str] = None) -> None:
        self.n_trials, self.n_jobs, self.sampler, self.seed = n_trials, max(1, n_jobs), sampler, seed
        self.params = dict(params or {})
        self.study_name, self.storage = study_name, storage
        self.config: Optional[DictConfig] = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)

    def _space(self, arguments: List[str]):
        parser = OverridesParser.create()
        overrides = parser.parse_overrides(arguments)
        overrides += parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()])
        fixed = [o.input_line for o in overrides if not o.is_sweep_override()]
        space = {o.get_key_element(): distribution(o) for o in overrides if o.is_sweep_override()}
        if not space:
            raise ConfigError("hydra/sweeper=optuna needs a search space: e.g. 'optimizer.lr=tag(log,interval(1e-5,1e-3))' "
                              "or hydra.sweeper.params")
        return fixed, space

    def sweep(self, arguments: List[str]) -> Any:
        import optuna
        from optuna.trial import TrialState

        fixed, space = self._space(arguments)
        direction = direction_of(self.config)
        sampler = (optuna.samplers.RandomSampler(seed=self.seed) if self.sampler == "random"
                   else optuna.samplers.TPESampler(seed=self.seed))
        study = optuna.create_study(direction=direction, sampler=sampler, study_name=self.study_name,
                                    storage=self.storage, load_if_exists=bool(self.storage))
        objective = self.config.sweep.objective or "the task's primary metric"
        log.info("optuna: %d trials, %s %s over %s", self.n_trials, direction, objective, sorted(space))
        returns, done = [], 0
        while done < self.n_trials:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - done))]
            batch = [fixed + [f"{k}={v}" for k, v in t.params.items()] for t in trials]
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=done)
            for trial, result in zip(trials, results):
                try:
                    value = float(result.return_value)  # raises the job's own error when it failed
                except Exception as e:  # noqa: BLE001 - a failed trial must not end the search
                    log.warning("optuna: trial %d failed (%s); telling the study", trial.number, e)
                    study.tell(trial, state=TrialState.FAIL)
                else:
                    study.tell(trial, value)
            returns.append(results)
            done += len(trials)
        completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
        out = Path(self.config.hydra.sweep.dir) / "optimization_results.yaml"
        out.parent.mkdir(parents=True, exist_ok=True)
        best = {"direction": direction, "objective": objective, "n_trials": len(study.trials),
                "completed": len(completed)}
        if completed:
            best.update(best_value=study.best_value, best_params=study.best_params)
            log.info("optuna: best %s = %.6g with %s", objective, study.best_value, study.best_params)
        OmegaConf.save(OmegaConf.create(best), out)
        return returns
