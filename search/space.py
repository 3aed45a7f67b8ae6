"""From a search spec to Ray Tune: the param space, the searcher and the scheduler.

What each trial is scored on:

- the searcher minimises ``compute_to_target`` (training FLOPs to reach the target,
  pretraining included; censored trials report the finite penalty of `trainable.summary`);
- ASHA maximises ``target_acc`` (the accuracy the target is judged on) at rungs of cumulative training
  FLOPs (``compute/flops``), so a long pretraining stage counts against a trial exactly as
  its compute does. Its horizon is `horizon()`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Searcher

from iterhead.curricula.errors import ConfigError
from iterhead.curricula.trial import SMOKE_GRID, trial_curriculum
from iterhead.search.spec import Domain, LoadedSearch, SearchSettings
from iterhead.trainable import results as r
from iterhead.trainable.summary import planned_flops

SEARCH_METRIC, SEARCH_MODE = r.COMPUTE_TO_TARGET, "min"
SCHEDULER_METRIC, SCHEDULER_MODE, TIME_ATTR = r.TARGET_ACC, "max", r.FLOPS


def tune_domain(domain: Domain, smoke: bool = False) -> Any:
    kind, args = domain.kind, domain.args
    if kind == "uniform":
        return tune.uniform(*args)
    if kind == "loguniform":
        return tune.loguniform(*args)
    if kind == "randint":
        return tune.randint(args[0], args[1] + 1)  # the spec's randint includes both ends
    if kind == "choice":
        return tune.choice(list(args))
    return tune.grid_search(list(args)[:SMOKE_GRID] if smoke else list(args))


def param_space(loaded: LoadedSearch, smoke: bool = False) -> dict[str, Any]:
    """Dotted curriculum key -> Tune domain (grids cut to their first values when smoke)."""
    return {key: tune_domain(d, smoke) for key, d in loaded.spec.space.items()}


def searcher(settings: SearchSettings, has_space: bool) -> Searcher | BasicVariantGenerator:
    if settings.algorithm == "optuna" and has_space:
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created in memory" line
        algo = OptunaSearch(metric=SEARCH_METRIC, mode=SEARCH_MODE,
                            sampler=optuna.samplers.TPESampler(seed=settings.seed))
        return ConcurrencyLimiter(algo, max_concurrent=settings.max_concurrent)
    return BasicVariantGenerator(max_concurrent=settings.max_concurrent, random_state=settings.seed)


def horizon(loaded: LoadedSearch, smoke: bool = False) -> float:
    """The most training compute a trial can spend: ASHA's max_t, and half the censoring penalty.

    The budget when there is one. Without one, the larger of the base's planned compute and
    that of the curriculum with each searched key at the probe value (ends, choices) that
    plans the most compute: the penalty then sits above what a reached trial can report
    for the usual keys (epochs, lengths, sizes), which grow compute monotonically. A smoke
    search plans at smoke size, as its trials train.
    """
    if loaded.spec.budget.flops:
        return loaded.spec.budget.flops
    base = loaded.base.model_dump(mode="json")

    def planned(overrides: dict[str, Any]) -> float:
        return planned_flops(trial_curriculum(base, overrides, smoke))

    worst = {key: max(d.probes(), key=lambda v, key=key: planned({key: v})) for key, d in loaded.spec.space.items()}
    try:
        combined = planned(worst)
    except ConfigError:  # the per-key maxima do not fit together; take the largest alone
        combined = max((planned({k: v}) for k, v in worst.items()), default=0.0)
    return max(planned({}), combined)


def scheduler(loaded: LoadedSearch, settings: SearchSettings, smoke: bool = False):
    if settings.scheduler == "none":
        return FIFOScheduler()
    max_t = horizon(loaded, smoke)
    return AsyncHyperBandScheduler(time_attr=TIME_ATTR, metric=SCHEDULER_METRIC, mode=SCHEDULER_MODE,
                                   max_t=max_t, grace_period=max_t * settings.grace_fraction,
                                   reduction_factor=settings.reduction_factor)


def rungs(loaded: LoadedSearch, settings: SearchSettings, smoke: bool = False) -> list[float]:
    """The FLOPs (`TIME_ATTR`) at which ASHA compares trials, placed as Ray's one bracket places
    them (``grace_period x reduction_factor^k`` for k while that stays within ``max_t``); none
    without ASHA. A trial checkpoints at the first report at or past each (`trainable.tune`),
    so one that ASHA stops there keeps its state, curriculum and figures."""
    if settings.scheduler != "asha":
        return []
    max_t = horizon(loaded, smoke)
    grace, factor = max_t * settings.grace_fraction, settings.reduction_factor
    count = int(np.log(max_t / grace) / np.log(factor) + 1)  # Ray's own expression: the same count at a tie
    return [grace * factor ** k for k in range(count)]
