"""The mixture sampler: the only place that decides which rows train, and in what order.

An epoch is as many examples as one task's training set holds, whatever the mix, so an
epoch of any mix costs the same. The mix is stratified by length: at each length the
``per_len`` slots are shared among the tasks in proportion to their weights (largest
remainder), and each task fills its share with distinct rows of that length drawn at
random. Rows are then sorted by length and cut into batches, so a batch holds neighbouring
lengths only (one length, or two at a boundary, whenever a length has at least a batch of
rows) and padding stays small; the batch order is shuffled. Tasks are taken in name order,
so the order a mix lists them in changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    """Where each task's training rows sit in the trainer's single row table."""

    offsets: dict[str, int]  # task -> first row id
    min_len: int
    max_len: int
    per_len: int

    def rows_of(self, task: str, length: int) -> np.ndarray:
        start = self.offsets[task] + (length - self.min_len) * self.per_len
        return np.arange(start, start + self.per_len)


@dataclass(frozen=True)
class EpochPlan:
    """Row ids in training order and the batch boundaries into them."""

    rows: np.ndarray  # int64 [n_examples]
    lengths: np.ndarray  # int64 [n_examples], the input length of each row
    bounds: np.ndarray  # int64 [n_batches + 1], batch b is rows[bounds[b]:bounds[b+1]]

    def batches(self) -> list[tuple[int, int, int, int]]:
        """(start, stop, min length, max length) of each batch."""
        out = []
        for b in range(len(self.bounds) - 1):
            lo, hi = int(self.bounds[b]), int(self.bounds[b + 1])
            out.append((lo, hi, int(self.lengths[lo:hi].min()), int(self.lengths[lo:hi].max())))
        return out


def shares(weights: dict[str, float], total: int) -> dict[str, int]:
    """Split `total` slots by normalised weights, largest remainder, ties by task name."""
    ordered = sorted(weights.items())  # name order: the float sum too must not depend on the mapping's
    norm = sum(w for _, w in ordered)
    exact = {k: total * w / norm for k, w in ordered}
    out = {k: int(np.floor(v)) for k, v in exact.items()}
    left = total - sum(out.values())
    order = sorted(exact, key=lambda k: (-(exact[k] - out[k]), k))
    for k in order[:left]:
        out[k] += 1
    return out


def plan_epoch(layout: Layout, mix: dict[str, float], batch_size: int,
               rng: np.random.Generator, order_rng: np.random.Generator | None = None) -> EpochPlan:
    """One epoch of the mix: which rows, batched by length, in a random batch order.

    The batch order comes from `order_rng` when given, else from `rng` after the rows: two
    seeds with one `order_rng` get batches of the same sizes and lengths at every step."""
    mix = {k: w for k, w in sorted(mix.items()) if w > 0}
    split = shares(mix, layout.per_len)
    rows, lengths = [], []
    for length in range(layout.min_len, layout.max_len + 1):
        picked = [layout.rows_of(task, length)[rng.permutation(layout.per_len)[:n]]
                  for task, n in split.items() if n]
        at_len = np.concatenate(picked)
        rows.append(at_len[rng.permutation(len(at_len))])
        lengths.append(np.full(len(at_len), length))
    all_rows, all_lengths = np.concatenate(rows), np.concatenate(lengths)
    n = len(all_rows)
    starts = np.arange(0, n, batch_size)
    order = (rng if order_rng is None else order_rng).permutation(len(starts))
    index = np.concatenate([np.arange(starts[b], min(starts[b] + batch_size, n)) for b in order])
    sizes = np.array([min(batch_size, n - starts[b]) for b in order])
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return EpochPlan(all_rows[index], all_lengths[index], bounds)
