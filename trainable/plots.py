"""PNG figures for MLflow artifacts: attention maps, accuracy against compute, a PBT schedule."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def attention_maps(path: Path, maps: Sequence[tuple[str, list[str], np.ndarray]]) -> Path:
    """One row per sequence, one panel per (layer, head).

    `maps` holds (title, token labels, patterns [layer, head, query, key]) per sequence.
    """
    n_rows = len(maps)
    n_layers, n_heads = maps[0][2].shape[:2]
    n_cols = n_layers * n_heads
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.6 * n_cols, 3.4 * n_rows), squeeze=False)
    for r, (title, labels, pattern) in enumerate(maps):
        for layer in range(n_layers):
            for head in range(n_heads):
                ax = axes[r][layer * n_heads + head]
                ax.imshow(pattern[layer, head], cmap="viridis", vmin=0.0, vmax=1.0)
                ax.set_title(f"{title}: layer {layer} head {head}", fontsize=8)
                ticks = np.arange(len(labels))
                ax.set_xticks(ticks, labels, rotation=90, fontsize=5)
                ax.set_yticks(ticks, labels, fontsize=5)
                ax.set_xlabel("key", fontsize=7)
                ax.set_ylabel("query", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_vs_compute(path: Path, flops: Sequence[float], accuracy: dict[str, Sequence[float]],
                        judged: str, target: float, stage_starts: dict[str, float]) -> Path:
    """Accuracies (keyed by their label) against cumulative training FLOPs, stages and target
    marked; `judged` is the label of the curve the target is judged on, drawn thicker."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, values in accuracy.items():
        ax.plot(flops, values, marker=".", label=label, lw=2 if label == judged else 1)
    ax.axhline(target, color="grey", ls=":", lw=1, label=f"target ({judged})")
    for name, start in stage_starts.items():
        ax.axvline(start, color="black", ls="--", lw=0.7)
        ax.text(start, 1.02, name, fontsize=7, transform=ax.get_xaxis_transform())
    ax.set_xlabel("training FLOPs (cumulative, analytic)")
    ax.set_ylabel("exact-match test accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def schedule(path: Path, segments: Sequence[dict[str, Any]], end: float, title: str) -> Path:
    """Each setting of a PBT lineage against training FLOPs: one panel per setting, a step at
    every segment's start (`segments`: ``flops_at_start``, ``settings``, ``started_by``)."""
    keys = list(segments[0]["settings"])
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys) + 0.6), squeeze=False, sharex=True)
    starts = [float(s["flops_at_start"]) for s in segments]
    for ax, key in zip(axes[:, 0], keys):
        values = [s["settings"][key] for s in segments]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        labels = sorted({str(v) for v in values}) if not numeric else []
        ys = [float(v) for v in values] if numeric else [labels.index(str(v)) for v in values]
        ax.step(starts + [max(end, starts[-1])], ys + ys[-1:], where="post", lw=2)
        if not numeric:
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
        elif key == "lr":
            ax.set_yscale("log")
        ax.set_ylabel(key, fontsize=8)
        for start in starts[1:]:
            ax.axvline(start, color="grey", ls=":", lw=0.8)
    for start, seg in zip(starts[1:], segments[1:]):
        axes[0, 0].text(start, 1.02, seg["started_by"].replace("member ", "m"), fontsize=6,
                        transform=axes[0, 0].get_xaxis_transform())
    axes[-1, 0].set_xlabel("training FLOPs (cumulative, analytic; the lineage's own)")
    axes[0, 0].set_title(f"{title}: its lineage's settings", fontsize=9, pad=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
