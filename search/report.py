"""The parent run's summary of a search: a table with one row per trial, and two plots.

Every trial is in the table, and every trial with a result in the plots, censored ones
included and marked as such (a trial that errored has no compute_to_target to plot):
compute_to_target against each searched parameter, and the fraction of trials that reached
the target against training compute.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from iterhead.trainable import results as r


def _plt():
    """pyplot on the Agg backend, imported only when a figure is drawn (it is slow to import)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt

COLUMNS = ("trial_id", "status", r.REACHED, r.COMPUTE_TO_TARGET, r.TARGET_ACC, r.FLOPS, "run_id")


def write_table(path: Path, rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> Path:
    """CSV: trial, searched values, outcome; one row per trial."""
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*COLUMNS[:2], *keys, *COLUMNS[2:]], extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow(row)
    return path


def legend(ax: Any, **style: Any) -> None:
    """The axes' legend, where something drawn has a label: a search whose trials have not
    reported draws nothing, and matplotlib warns about an empty legend."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**style)


def plot_against_params(path: Path, rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> Path:
    """compute_to_target against each searched parameter; censored trials as crosses."""
    plt = _plt()
    keys = list(keys) or ["trial"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        where, ticks = axis([row.get(key, i) for i, row in enumerate(rows)])
        for reached, marker, label in ((1.0, "o", "reached"), (0.0, "x", "censored (penalty)")):
            sel = [i for i, row in enumerate(rows) if float(row.get(r.REACHED, 0)) == reached]
            ys = [float(rows[i][r.COMPUTE_TO_TARGET]) for i in sel]
            if sel:
                ax.scatter([where[i] for i in sel], ys, marker=marker, label=f"{label} ({len(sel)})")
        if ticks is not None:
            ax.set_xticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_xlabel(key, fontsize=8)
        ax.set_ylabel("compute_to_target (FLOPs)", fontsize=8)
        ax.set_yscale("log")
        legend(ax, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_fraction_reached(path: Path, rows: Sequence[dict[str, Any]], n: int | None = None) -> Path:
    """Fraction of all `n` trials (default: the rows) that had reached the target by each amount
    of compute: a trial that failed, or has not finished, counts in `n` and never reaches."""
    plt = _plt()
    n = len(rows) if n is None else n
    hits = np.sort([float(row[r.COMPUTE_TO_TARGET]) for row in rows if float(row.get(r.REACHED, 0)) == 1.0])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if len(hits):
        xs = np.concatenate([[hits[0]], hits])
        ys = np.concatenate([[0.0], np.arange(1, len(hits) + 1) / n])
        ax.step(xs, ys, where="post")
        ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel(f"fraction of the {n} trials at target")
    ax.set_title(f"{len(hits)} of {n} trials reached the target", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def short(value: Any) -> str:
    """A value for a table or a progress line: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _numeric(value: Any) -> Any:
    return value if isinstance(value, (int, float)) else str(value)


def axis(values: Sequence[Any]) -> tuple[list[float], list[str] | None]:
    """Where a parameter's values sit on a plot's x axis: the numbers themselves, or, where any
    value is no number (None, text, a list, a boolean), each at its place among the sorted texts
    of all, with those texts as the ticks (numbers and texts on one axis would collide or fail)."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], None
    ticks = sorted({str(v) for v in values})
    return [float(ticks.index(str(v))) for v in values], ticks


def is_replicate(rows: Sequence[dict[str, Any]]) -> bool:
    """Whether the rows are configurations of a search with ``seeds:`` (each scored over its seeds)."""
    return any(row.get("kind") == r.KIND_CONFIGURATION for row in rows)


def seed_medians(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per configuration: its seeds, how many reached the target, and the median and
    range of compute_to_target over them; censored medians last.

    One rule for both kinds of search, `trainable.results.over_seeds`: the lower median with
    censored seeds at their penalty (with an even count still one seed's value, never a mean
    of a compute and the penalty), censored exactly when fewer than half the seeds reached.
    A replicate search's configuration runs already hold that score, and their ``seed_outcomes``
    (``(reached, compute_to_target)`` of each seed run) give the range; without ``seeds:``
    the trials are grouped by every searched key but ``seed`` and scored here."""
    if is_replicate(rows):
        groups = [_configuration(row, keys) for row in rows]
    else:
        others = [k for k in keys if k != "seed"]
        by_config: dict[tuple, list[dict[str, Any]]] = {}
        for row in rows:
            by_config.setdefault(tuple(_numeric(row.get(k)) for k in others), []).append(row)
        groups = [_over_trials(dict(zip(others, config)), trials) for config, trials in by_config.items()]
    return sorted(groups, key=lambda g: (g["censored"], g["median"]))


def _configuration(row: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """A replicate configuration's row: its own score, the range over its seed runs."""
    outcomes = row.get("seed_outcomes", [])
    values = [c for _, c in outcomes if c == c] or [row[r.COMPUTE_TO_TARGET]]
    return {**{k: row.get(k) for k in keys}, "count": len(outcomes), "reached": int(row[r.SEEDS_REACHED]),
            "median": float(row[r.COMPUTE_TO_TARGET]), "min": min(values), "max": max(values),
            "censored": row.get(r.REACHED) != 1.0}


def _over_trials(config: dict[str, Any], trials: list[dict[str, Any]]) -> dict[str, Any]:
    """A configuration of a search without ``seeds:``, scored over its trials (one per seed)."""
    outcomes = [(t.get(r.REACHED) == 1.0, float(t[r.COMPUTE_TO_TARGET])) for t in trials]
    penalty = max((c for ok, c in outcomes if not ok), default=math.inf)  # one penalty per search
    score = r.over_seeds(outcomes, [float(t.get(r.TARGET_ACC, math.nan)) for t in trials], penalty)
    values = [c for _, c in outcomes]
    return {**config, "count": len(trials), "reached": score.seeds_reached, "median": score.compute_to_target,
            "min": min(values), "max": max(values), "censored": not score.reached}


def median_columns(keys: Sequence[str], replicates: bool) -> list[str]:
    """The median table's header: the configuration, then its counts and compute."""
    counts = ["seeds", "seeds reached"] if replicates else ["trials", "reached"]
    return [*(k for k in keys if k != "seed"), *counts, "median compute_to_target", "min", "max"]


def median_cells(group: dict[str, Any], keys: Sequence[str], number: str) -> list[str]:
    """One row of the median table, compute written with the format spec `number`."""
    median = format(group["median"], number) + (" (censored)" if group["censored"] else "")
    return [*(short(group[k]) for k in keys if k != "seed"), str(group["count"]), str(group["reached"]),
            median, format(group["min"], number), format(group["max"], number)]


def medians_text(groups: Sequence[dict[str, Any]], keys: Sequence[str], replicates: bool = False) -> str:
    """`seed_medians` as a Markdown table (the terminal shows it; the README quotes it)."""
    columns = median_columns(keys, replicates)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(median_cells(g, keys, ".3g")) + " |" for g in groups]
    return "\n".join(lines)


def median_band(values: Sequence[float]) -> tuple[float, float, float]:
    """The median a plot draws over seeds, the table's (`results.over_seeds`): the lower one,
    one seed's value, never a mean of a compute and the penalty; and the min and the max."""
    return float(statistics.median_low(values)), min(values), max(values)


def plot_medians(path: Path, rows: Sequence[dict[str, Any]], key: str) -> Path:
    """compute_to_target against one parameter: median and min-max over the other values
    (seeds, mostly) at each value; censored trials drawn as crosses at their penalty."""
    plt = _plt()
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_numeric(row.get(key)), []).append(row)
    if all(len(g) == 1 for g in groups.values()):  # no value repeats (sampled): a scatter says more
        return plot_against_params(path, rows, [key])
    xs = sorted(groups, key=lambda v: (isinstance(v, str), v))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    numbers = axis(xs)[1] is None
    positions = [float(x) if numbers else float(i) for i, x in enumerate(xs)]  # texts and numbers never mixed
    med, lo, hi = zip(*(median_band([float(row[r.COMPUTE_TO_TARGET]) for row in groups[x]]) for x in xs))
    ax.plot(positions, med, marker="o", label="median over seeds")
    ax.fill_between(positions, lo, hi, alpha=0.2, label="min to max")
    censored = [(pos, float(row[r.COMPUTE_TO_TARGET])) for pos, x in zip(positions, xs)
                for row in groups[x] if float(row.get(r.REACHED, 0)) != 1.0]
    if censored:
        ax.scatter(*zip(*censored), marker="x", color="red", s=50, zorder=3, label="censored (penalty)")
    if not numbers:
        ax.set_xticks(positions, [str(x) for x in xs], fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel(key, fontsize=8)
    ax.set_ylabel("compute_to_target (FLOPs)", fontsize=8)
    legend(ax, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_length_curves(path: Path, flops: Sequence[float], per_length: dict[int, Sequence[float]],
                       title: str) -> Path:
    """Accuracy at each length against training compute, for one trial."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    cmap = plt.get_cmap("viridis")
    lengths = sorted(per_length)
    for i, length in enumerate(lengths):
        ax.plot(flops[:len(per_length[length])], per_length[length], color=cmap(i / max(1, len(lengths) - 1)),
                lw=1, label=f"L={length}")
    ax.set_xlabel("training FLOPs (cumulative)")
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=9)
    legend(ax, fontsize=6, ncol=2, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
