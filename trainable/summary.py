"""A trial's summary metrics, and the value a censored trial reports.

A trial that never reaches its target is censored, not dropped: ``reached = 0`` and its
``compute_to_target`` is the finite penalty ``results.CENSOR_FACTOR x budget``, where the budget is
the search's FLOP budget or, without one, the compute the whole curriculum would spend if
every stage ran to its end. The penalty is above anything a trial that reached the target
can report, so a searcher minimising compute_to_target ranks censored trials last, and it
is finite, so Ray Tune's best-result filters (which drop NaN and inf) still count them.
The search budget caps each trial's compute, so nothing reached reports more than it.
"""

from __future__ import annotations

import numpy as np

from iterhead.curricula.data import vocab_for
from iterhead.curricula.schema import Curriculum
from iterhead.trainable import results as r
from iterhead.trainable.compute import count_params, flops
from iterhead.trainable.loop import Outcome


def epoch_flops(cur: Curriculum) -> float:
    """Training FLOPs of one epoch: `train_per_len` sequences of every length, whatever the mix,
    so every epoch of every stage costs the same."""
    d, m = cur.data, cur.model
    n = count_params(m.d_model, m.n_layers, m.mlp_ratio, vocab_for(cur).size)
    return flops(np.arange(d.min_len, d.max_len + 1), d.cot, n, m.n_layers, m.d_model, copies=d.train_per_len)


def planned_flops(cur: Curriculum) -> float:
    """Training FLOPs of the whole curriculum, every stage to its last epoch."""
    return epoch_flops(cur) * sum(s.epochs for s in cur.stages)


def censored_value(cur: Curriculum, budget_flops: float | None = None) -> float:
    """What an unreached trial reports as compute_to_target (module docstring). A curriculum
    that trains no epoch is charged one: its planned 0 would rank it with a model that met the
    target before any training (compute_to_target 0), and ahead of every trial that trained."""
    return r.CENSOR_FACTOR * (budget_flops if budget_flops else max(planned_flops(cur), epoch_flops(cur)))


def summary_metrics(cur: Curriculum, outcome: Outcome, budget_flops: float | None = None) -> dict[str, float]:
    """``reached`` and ``compute_to_target``; examples and seconds to target when reached.

    With a budget, a target reached past it counts as censored, as in a search (the budget is
    checked at evaluations). A censored trial has no examples or seconds to target: they are left out rather than
    invented, and ``reached = 0`` says why. A trial that diverged (`loop.Evaluation.diverged`) is
censored the same way and also carries ``diverged = 1``.
    """
    if not (outcome.reached and (budget_flops is None or outcome.compute_to_target <= budget_flops)):
        return {r.REACHED: 0.0, r.COMPUTE_TO_TARGET: censored_value(cur, budget_flops),
                r.DIVERGED: float(outcome.diverged)}
    return {r.REACHED: 1.0, r.DIVERGED: 0.0, r.COMPUTE_TO_TARGET: float(outcome.compute_to_target),
            r.EXAMPLES_TO_TARGET: float(outcome.examples_to_target),
            r.SECONDS_TO_TARGET: float(outcome.seconds_to_target)}

