"""Prefix sharing from the driver's side: where trials start from each other, and what it saved.

`plan` lists, for a search whose trials are known up front (every domain a grid), the
prefix points where some trial can start from another's state: for each pair of trials the
deepest evaluation point their curricula share (`trainable.prefix.points`). Trials store
their states at exactly those points. A search whose trials are proposed as it goes
(Optuna, random domains) has no plan; each trial then stores at its own stage ends and at
doubling intervals into each stage (`trainable.prefix.worth_storing`), and later trials use
the store as it fills.

`accounting` sums what the trials report: ``search/flops_curricula``, the FLOPs of every
trial's curriculum as far as it went (as if nothing were shared), and
``search/flops_trained``, those less the prefixes each trial started from.
"""

from __future__ import annotations

import itertools
from typing import Any

from iterhead.curricula.trial import SMOKE_GRID, trial_curriculum
from iterhead.search.spec import LoadedSearch
from iterhead.trainable import results
from iterhead.trainable.prefix import points

PREFIXES = "prefixes"  # the store's folder inside the search's folder


def grid_configs(loaded: LoadedSearch, smoke: bool) -> list[dict[str, Any]] | None:
    """Every trial's sampled values when all domains are grids (one per grid point), else None."""
    space = loaded.spec.space
    if not space or any(d.kind != "grid" for d in space.values()):
        return None
    values = [list(d.args)[:SMOKE_GRID] if smoke else list(d.args) for d in space.values()]
    return [dict(zip(space, combo)) for combo in itertools.product(*values)]


def plan(loaded: LoadedSearch, base: dict[str, Any], smoke: bool) -> list[str] | None:
    """The point keys where a trial of this search can start from another's state (module docstring)."""
    configs = grid_configs(loaded, smoke)
    if configs is None:
        return None
    keyed = [[p.key for p in points(trial_curriculum(base, c, smoke))] for c in configs]
    repeats = loaded.spec.search.num_samples > 1  # a grid sampled twice trains each curriculum twice
    wanted: set[str] = set()
    for i, a in enumerate(keyed):
        if repeats and a:
            wanted.add(a[-1])
        for b in keyed[i + 1:]:
            common = set(b)
            shared = [k for k in a if k in common]
            if shared:
                wanted.add(shared[-1])
    return sorted(wanted)


def accounting(rows: list[dict[str, Any]]) -> dict[str, float]:
    """``search/flops_curricula`` and ``search/flops_trained`` from the trials' last reports."""
    curricula = sum(float(row.get(results.FLOPS_SEEDS) or 0.0) for row in rows)
    forked = sum(float(row.get(results.FLOPS_FORKED) or 0.0) for row in rows)
    return {results.FLOPS_CURRICULA: curricula, results.FLOPS_TRAINED: curricula - forked}


def summary_line(flops: dict[str, float], forked: int) -> str:
    """The terminal's account of what sharing saved."""
    trained, curricula = flops[results.FLOPS_TRAINED], flops[results.FLOPS_CURRICULA]
    saved = 1.0 - trained / curricula if curricula else 0.0
    return (f"trained {trained:.3e} FLOPs for curricula worth {curricula:.3e} ({saved:.0%} saved by "
            f"{forked} trial(s) starting from a shared prefix)")
