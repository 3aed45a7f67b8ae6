"""How a PBT member's settings are drawn and how they move when it copies a better member.

`draw` samples a domain (the initial population). `perturb` is the explore step of
Population Based Training (Jaderberg et al. 2017), one value at a time:

- a float domain (``uniform``, ``loguniform``): with probability `resample` a fresh draw from
  the domain, else the value times 0.8 or 1.2 (equally likely), clipped into the domain;
- ``choice``: with probability `resample` a fresh choice, else a neighbouring choice (one up
  or one down; at an end, the end).

Mix shares (the keys ``mix.<task>``) are shares of the stage's mix, as in a search space
(`curricula.overrides.blend`): after each is drawn or perturbed and clipped into its domain, the set
shares must leave room for each other, so where they sum above 1 they are moved to the
nearest point (Euclidean) that lies in their domains and sums to 1 (`project_shares`); the
stage's other tasks then share what is left, in their original proportions.

Every draw comes from the generator passed in, so one seed decides the whole population.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from iterhead.search.spec import Domain

FACTORS = (0.8, 1.2)


def draw(domain: Domain, rng: np.random.Generator) -> Any:
    """One value from the domain (uniform, loguniform or choice)."""
    kind, args = domain.kind, domain.args
    if kind == "uniform":
        return float(rng.uniform(args[0], args[1]))
    if kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))
    if kind == "choice":
        return args[int(rng.integers(len(args)))]
    raise ValueError(f"PBT draws from uniform, loguniform or choice domains, not {kind}")


def perturb(value: Any, domain: Domain, rng: np.random.Generator, resample: float) -> Any:
    """The explore step for one value (module docstring)."""
    if rng.random() < resample:
        return draw(domain, rng)
    kind, args = domain.kind, domain.args
    if kind == "choice":
        index = index_of(value, args)
        step = -1 if rng.random() < 0.5 else 1
        return args[min(max(index + step, 0), len(args) - 1)]
    factor = FACTORS[int(rng.integers(len(FACTORS)))]
    return float(min(max(float(value) * factor, args[0]), args[1]))


def index_of(value: Any, choices: list[Any]) -> int:
    """Where `value` sits among `choices` (numbers compared by value, so 1 finds 1.0)."""
    for i, choice in enumerate(choices):
        if choice == value:
            return i
    raise ValueError(f"{value!r} is not one of the choices {choices!r}")


def project_shares(shares: dict[str, float], bounds: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Shares clipped into their bounds and, where they sum above 1, moved to the nearest point
    inside the bounds that sums to 1 (needs the lower bounds to sum to at most 1).

    The nearest point is ``clip(s - t, low, high)`` for the one shift ``t`` that makes the sum
    1 (the sum falls steadily as ``t`` grows); bisection finds it to float precision.
    """
    clipped = {k: min(max(v, bounds[k][0]), bounds[k][1]) for k, v in shares.items()}
    if sum(clipped.values()) <= 1.0:
        return clipped
    if sum(low for low, _ in bounds.values()) > 1.0:
        raise ValueError("the lower bounds of the shares sum above 1")

    def at(t: float) -> dict[str, float]:
        return {k: min(max(v - t, bounds[k][0]), bounds[k][1]) for k, v in shares.items()}

    lo, hi = 0.0, max(shares.values())  # at hi every share is at its lower bound: a sum of at most 1
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if sum(at(mid).values()) > 1.0 else (lo, mid)
    return at(hi)
