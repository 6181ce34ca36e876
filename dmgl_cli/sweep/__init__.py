"""``dmgl sweep``: compare integration strategies, and tune hyperparameters within each, with Optuna.

* **A study is a plan.** Creating a study records its settings (resolved base config, strategies, tuned ranges,
  seeds, trials per strategy; :mod:`~dmgl_cli.sweep.space`) as a study user attribute and enqueues one WAITING
  trial per (strategy, repeat) with the strategy fixed. Workers (:mod:`~dmgl_cli.sweep.worker`) only claim those
  trials, so a study completes exactly the requested trials. Without ``--tune`` this queue is the grid of
  strategies; with ``--tune`` TPE samples each trial's remaining parameters within its strategy.
* **Resuming.** Ctrl-C or a dead worker leaves the study resumable: ``dmgl sweep --study NAME`` joins it, and
  re-enqueues what the plan lacks (a trial that failed with an error is not retried automatically). Optuna storages
  and the heartbeat that detects dead workers are :mod:`~dmgl_cli.sweep.storage`'s.
* **Several devices.** ``dmgl sweep --devices`` (:mod:`~dmgl_cli.sweep.launcher`) creates the study, then runs one
  worker process per device on it, each training with ``train.device`` set to its device.
* **MLflow.** One sweep run (``dmgl.role=sweep``) holds the study name, storage, search space and, once the study
  is complete, the best result; each trial's runs are nested under it. All of it goes through the one tracker the
  caller passes to :func:`~dmgl_cli.sweep.study.run_sweep`.
* **The summary** (:func:`~dmgl_cli.sweep.summary.summary_table`): per strategy its best trial, mean ± std over
  seeds with the 95% t-interval; its note says which strategies the best one significantly beats on the
  objective, paired over seeds (paired t-test, Holm-corrected across the other strategies; :mod:`dmgl_cli.stats`).

Modules: this one holds the request (:class:`SweepRequest`) and its checks, light enough to run before Optuna,
MLflow or torch load; :mod:`~dmgl_cli.sweep.study` creates or joins the study and runs it (:func:`run_sweep
<dmgl_cli.sweep.study.run_sweep>`); :mod:`~dmgl_cli.sweep.summary` the summary table; :mod:`~dmgl_cli.sweep.worker`
the trials; :mod:`~dmgl_cli.sweep.launcher` ``--devices``. Optuna is imported only in this package, and not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dmgl_cli.config import Config

DEFAULT_RECIPE = "synthetic"  # of a new study that names none


@dataclass
class SweepRequest:
    """What the command line asked for; None means "not given" (a joining worker takes the study's)."""

    study: str | None = None
    storage: str | None = None
    recipe: str | None = None
    overrides: list[str] = field(default_factory=list)
    strategies: str | None = None
    tune: str | None = None
    n_trials: int | None = None
    seeds: str | None = None
    experiment: str | None = None
    prune: bool | None = None
    heartbeat: int | None = None
    create_only: bool = False
    device: str | None = None  # train.device of the trials this worker runs (set by `dmgl sweep --devices`)
    # The base config of a new study, resolved once (check_request) from recipe, overrides and experiment
    config: Config | None = None

    def config_overrides(self) -> list[str]:
        """The ``--set`` overrides of the base config, ``--experiment`` last."""
        return [*self.overrides, *([f"experiment={self.experiment}"] if self.experiment else [])]


def check_request(request: SweepRequest) -> SweepRequest:
    """Refuse a malformed --strategies, --tune or --seeds, or an unknown --set key, before Optuna, MLflow or torch
    load; returns the request with its base config resolved when it names one (recipe, --set, --experiment or
    --seeds given). That is the one resolution: a new study is created from it, a joining worker compares its
    options with the study's own settings."""
    from dmgl_cli.config import parse_seeds
    from dmgl_cli.strategies import parse_strategies
    from dmgl_cli.tunables import parse_tune

    if request.strategies is not None:
        parse_strategies(request.strategies)
    parse_tune(request.tune)
    if request.seeds is not None:
        parse_seeds(request.seeds, 0)  # its form; the count starts at the recipe's train.seed
    if request.recipe is None and not request.overrides and request.experiment is None and request.seeds is None:
        return request
    config = base_config(request)
    if request.seeds is not None:
        parse_seeds(request.seeds, config.train.seed)
    return replace(request, config=config)


def base_config(request: SweepRequest) -> Config:
    """The base config of a study the request creates: as :func:`check_request` resolved it, else resolved here
    (a request that names no setting: the default recipe)."""
    if request.config is not None:
        return request.config
    from dmgl_cli.config import resolve

    return resolve(request.recipe or DEFAULT_RECIPE, request.config_overrides())
