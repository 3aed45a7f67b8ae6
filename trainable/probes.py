"""Iteration-head probes: where each layer's heads attend, on chain-of-thought sequences.

For a sequence ``[task, x_1 .. x_L, EoI, s_1 .. s_L]`` (EoI at position L+1), per layer l
and head h, averaged over probe sequences and then over lengths (from `target.min_len` up
where the curriculum sets it: the lengths the target is judged on; short sequences have
few positions to spread attention over and would otherwise carry the mean):

- ``probe/<task>/cot_to_eoi/l{l}h{h}``: mean attention from the chain-of-thought positions
  (those holding s_1 .. s_{L-1}) to EoI. The paper's first-layer iteration head puts its
  weight there, which tells each CoT position how far it is from the end of the input.
- ``probe/<task>/iteration/l{l}h{h}``: mean attention from the position predicting s_t
  (position L+t) to x_t (position t), t = 1 .. L: the second-layer iteration head's
  "peakiness" on the input it must read next.

Probes are only defined with chain of thought; without it none are reported.
"""

from __future__ import annotations

import numpy as np
import torch

from iterhead.curricula.data import TaskSplit, seq_len
from iterhead.trainable.model import Transformer, pattern_hooks


def probe_rows(split: TaskSplit, per_len: int) -> list[tuple[int, np.ndarray]]:
    """The first `per_len` test rows of each length, as (length, tokens)."""
    out = []
    for length in np.unique(split.lengths):
        rows = split.tokens[split.lengths == length][:per_len]
        out.append((int(length), rows[:, :seq_len(int(length), True) - 1]))
    return out


@torch.no_grad()
def patterns(model: Transformer, tokens: torch.Tensor) -> np.ndarray:
    """Attention patterns [layer, batch, head, query, key] for one batch of equal length."""
    was_training = model.training
    model.eval()
    _, cache = model.run_with_cache(tokens, pattern_hooks(len(model.blocks)))
    model.train(was_training)
    return torch.stack([cache[n] for n in pattern_hooks(len(model.blocks))]).float().cpu().numpy()


def probe_metrics(model: Transformer, splits: dict[str, TaskSplit], per_len: int, cot: bool,
                  device: torch.device, min_len: int | None = None) -> dict[str, float]:
    """The two probe scores per task, layer and head, over the lengths from `min_len` up
    (every length by default; module docstring)."""
    if not cot or per_len == 0:
        return {}
    out: dict[str, float] = {}
    for name, split in splits.items():
        eoi_scores, iter_scores = [], []
        for length, rows in probe_rows(split, per_len):
            if min_len is not None and length < min_len:
                continue
            p = patterns(model, torch.from_numpy(rows).to(device))  # [l, b, h, q, k]
            eoi = length + 1
            t = np.arange(1, length + 1)
            iter_scores.append(p[:, :, :, eoi - 1 + t, t].mean(axis=(1, 3)))  # [l, h]
            if length >= 2:
                eoi_scores.append(p[:, :, :, eoi + 1:2 * length + 1, eoi].mean(axis=(1, 3)))
        for key, scores in (("cot_to_eoi", eoi_scores), ("iteration", iter_scores)):
            if not scores:
                continue
            mean = np.mean(scores, axis=0)
            for layer in range(mean.shape[0]):
                for head in range(mean.shape[1]):
                    out[f"probe/{name}/{key}/l{layer}h{head}"] = float(mean[layer, head])
    return out


def example_maps(model: Transformer, splits: dict[str, TaskSplit], vocab, device: torch.device,
                 cot: bool) -> list[tuple[str, list[str], np.ndarray]]:
    """Attention of the model on the first test sequence of each task at its longest length.

    Returns (title, token labels, patterns [layer, head, query, key]) per task, for plots.
    """
    out = []
    for name, split in splits.items():
        length = int(split.lengths.max())
        row = split.tokens[split.lengths == length][:1, :seq_len(length, cot) - 1]
        p = patterns(model, torch.from_numpy(row).to(device))[:, 0]
        out.append((f"{name} (L={length})", [vocab.name_of(int(t)) for t in row[0]], p))
    return out
