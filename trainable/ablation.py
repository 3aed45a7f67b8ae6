"""Iteration-head evidence beyond attention maps: intervene on attention, measure accuracy.

Through the hook points, each intervention rewrites an attention pattern while the test
set is evaluated (chain-of-thought sequences ``[task, x_1 .. x_L, EoI, s_1 .. s_L]``, EoI at
position L+1, the position predicting s_t at L+t):

- ``zero_eoi_l{l}``: layer l's attention from the CoT positions to EoI set to 0;
- ``zero_iteration_l{l}``: layer l's attention from the position predicting s_t to x_t set to 0;
- ``ideal_l0`` / ``ideal_l1`` / ``ideal_both``: the ideal iteration-head maps patched in
  (layer 0: every CoT position attends only to EoI; layer 1: the position predicting s_t
  attends only to x_t; other positions attend to themselves).

Each pattern is zeroed in every layer in turn, not only where the paper's circuit puts it: a
trained model chooses its own layers (models here often attend from s_t's position to x_t in
layer 0, whose probe ``iteration/l0h0`` then reads high), and zeroing only layer 1 would read
as "no iteration head" when the head sits in layer 0. If the trained model computes with
iteration heads, zeroing them drops accuracy and the ideal maps keep it. Evaluation runs the
last layer on a window of query positions; the rewrites use absolute positions, so they
apply the same either way.
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


ZEROED: dict[str, Rewrite] = {"zero_eoi": zero_eoi, "zero_iteration": zero_iteration}
IDEAL: dict[str, dict[int, Rewrite]] = {  # the paper's two-layer circuit, at its layers
    "ideal_l0": {0: ideal(0)},
    "ideal_l1": {1: ideal(1)},
    "ideal_both": {0: ideal(0), 1: ideal(1)},
}


def interventions(n_layers: int) -> dict[str, dict[int, Rewrite]]:
    """Each pattern zeroed in each of the model's layers, then the ideal maps whose layers it has."""
    out = {f"{role}_l{layer}": {layer: fn} for role, fn in ZEROED.items() for layer in range(n_layers)}
    out.update({name: rewrites for name, rewrites in IDEAL.items() if max(rewrites) < n_layers})
    return out


def not_applicable(n_layers: int) -> list[str]:
    """The ideal maps a model of `n_layers` lacks a layer for (a 1-layer model has no layer 1)."""
    return [name for name, rewrites in IDEAL.items() if max(rewrites) >= n_layers]


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


def ablate(trainer: Trainer) -> dict[str, dict[str, float]]:
    """Accuracy per task with no intervention and under each of the model's `interventions`."""
    if not trainer.cur.data.cot:
        raise ValueError("the interventions are defined on chain-of-thought sequences (data.cot: true)")
    out = {"none": accuracy_under(trainer, {})}
    for name, rewrites in interventions(len(trainer.model.blocks)).items():
        out[name] = accuracy_under(trainer, rewrites)
    return out
