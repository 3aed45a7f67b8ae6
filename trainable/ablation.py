"""Iteration-head evidence beyond attention maps: intervene on attention, measure accuracy.

Through the hook points, each intervention rewrites an attention pattern while the test
set is evaluated (chain-of-thought sequences ``[task, x_1 .. x_L, EoI, s_1 .. s_L]``, EoI at
position L+1, the position predicting s_t at L+t):

- ``zero_eoi_l0``: layer 0's attention from the CoT positions to EoI set to 0;
- ``zero_iteration_l1``: layer 1's attention from the position predicting s_t to x_t set to 0;
- ``ideal_l0`` / ``ideal_l1`` / ``ideal_both``: the ideal iteration-head maps patched in
  (layer 0: every CoT position attends only to EoI; layer 1: the position predicting s_t
  attends only to x_t; other positions attend to themselves).

If the trained model computes with iteration heads, zeroing them drops accuracy and the
ideal maps keep it. Evaluation runs the last layer on a window of query positions; the
rewrites use absolute positions, so they apply the same either way.
"""

from __future__ import annotations

from typing import Callable

import torch

from iterhead.trainable.evaluate import accuracy_metrics, correct_rows
from iterhead.trainable.loop import Trainer

Rewrite = Callable[[torch.Tensor], torch.Tensor]


def _positions(pattern: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Absolute query positions of a pattern [B, H, Tq, T], and the input length L."""
    tq, t = pattern.shape[-2:]
    return torch.arange(t - tq, t, device=pattern.device), (t - 1) // 2


def zero_eoi(pattern: torch.Tensor) -> torch.Tensor:
    q, length = _positions(pattern)
    out = pattern.clone()
    cot = q > length + 1
    out[..., cot, length + 1] = 0.0
    return out


def zero_iteration(pattern: torch.Tensor) -> torch.Tensor:
    q, length = _positions(pattern)
    out = pattern.clone()
    rows = torch.nonzero((q >= length + 1) & (q <= 2 * length)).flatten()
    out[..., rows, q[rows] - length] = 0.0
    return out


def ideal(layer: int) -> Rewrite:
    def rewrite(pattern: torch.Tensor) -> torch.Tensor:
        q, length = _positions(pattern)
        target = q.clone()  # attend to itself unless the head has a job here
        if layer == 0:
            target[q > length + 1] = length + 1
        else:
            sel = (q >= length + 1) & (q <= 2 * length)
            target[sel] = q[sel] - length
        out = torch.zeros_like(pattern)
        out[..., torch.arange(len(q), device=q.device), target] = 1.0
        return out
    return rewrite


INTERVENTIONS: dict[str, dict[int, Rewrite]] = {
    "zero_eoi_l0": {0: zero_eoi},
    "zero_iteration_l1": {1: zero_iteration},
    "ideal_l0": {0: ideal(0)},
    "ideal_l1": {1: ideal(1)},
    "ideal_both": {0: ideal(0), 1: ideal(1)},
}


def accuracy_under(trainer: Trainer, rewrites: dict[int, Rewrite]) -> dict[str, float]:
    """``acc/<task>`` on the test set with the given layers' patterns rewritten."""
    blocks = trainer.model.blocks
    missing = sorted(layer for layer in rewrites if layer >= len(blocks))
    if missing:  # a rewrite left out would report the model's own accuracy as the intervention's
        raise ValueError(f"the model has {len(blocks)} layer(s); no layer {missing[0]} to rewrite")
    handles = [blocks[layer].attn.hook_pattern.register_forward_hook(lambda _m, _i, out, fn=fn: fn(out))
               for layer, fn in rewrites.items()]
    try:
        metrics = accuracy_metrics(trainer.eval_table, correct_rows(trainer.model, trainer.eval_table))
    finally:
        for h in handles:
            h.remove()
    return {k: v for k, v in metrics.items() if k.count("/") == 1}


def applicable(n_layers: int) -> list[str]:
    """The interventions a model of `n_layers` has every layer for (a 1-layer model has no
    layer 1 to rewrite)."""
    return [name for name, rewrites in INTERVENTIONS.items() if max(rewrites) < n_layers]


def ablate(trainer: Trainer) -> dict[str, dict[str, float]]:
    """Accuracy per task with no intervention and under each `applicable` intervention."""
    if not trainer.cur.data.cot:
        raise ValueError("the interventions are defined on chain-of-thought sequences (data.cot: true)")
    out = {"none": accuracy_under(trainer, {})}
    for name in applicable(len(trainer.model.blocks)):
        out[name] = accuracy_under(trainer, INTERVENTIONS[name])
    return out
