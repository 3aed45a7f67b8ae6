"""The probes read the right positions: ideal iteration-head patterns score exactly 1."""

from __future__ import annotations

from typing import Callable

import torch

from iterhead.curricula.data import build_data
from iterhead.trainable.loop import Trainer
from iterhead.trainable.probes import probe_metrics

from support import tiny


def ideal(pattern: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer 0: every query attends to EoI once past it; layer 1: position L+t attends to x_t."""
    b, h, q, k = pattern.shape
    length = (q - 1) // 2  # inputs are [task, x_1..x_L, EoI, s_1..s_{L-1}]: 2L + 1 positions
    out = torch.zeros_like(pattern)
    eoi = length + 1
    for pos in range(q):
        if layer == 0 and pos > eoi:
            out[:, :, pos, eoi] = 1.0
        elif layer == 1 and length + 1 <= pos <= 2 * length:
            out[:, :, pos, pos - length] = 1.0
        else:
            out[:, :, pos, pos] = 1.0
    return out


def probes_with(patterns: Callable[[torch.Tensor, int], torch.Tensor], min_len: int | None = None):
    """The probe metrics of a tiny model whose attention patterns are replaced by `patterns`
    (pattern, layer) -> pattern, and the curriculum."""
    cur = tiny(model={"d_model": 32, "n_layers": 2, "n_heads": 1, "dropout": 0.0})
    trainer = Trainer(cur)
    _, data = build_data(cur)
    handles = [trainer.model.blocks[i].attn.hook_pattern.register_forward_hook(
        lambda _m, _i, out, i=i: patterns(out, i)) for i in range(2)]
    try:
        return probe_metrics(trainer.model, data["test"], 4, True, torch.device("cpu"), min_len), cur
    finally:
        for h in handles:
            h.remove()


def test_ideal_patterns_score_one_and_others_zero():
    m, cur = probes_with(ideal)
    for task in cur.tasks:
        assert m[f"probe/{task}/cot_to_eoi/l0h0"] == 1.0
        assert m[f"probe/{task}/iteration/l1h0"] == 1.0
        assert m[f"probe/{task}/cot_to_eoi/l1h0"] == 0.0  # layer 1 never looks at EoI from CoT
        assert m[f"probe/{task}/iteration/l0h0"] == 0.0  # layer 0 looks at EoI, not at x_t


def test_probes_average_over_the_lengths_from_min_len():
    """With `min_len`, lengths below it leave the mean: a pattern ideal only from length 3 up
    scores 1 over those lengths and less over every length."""
    def ideal_from_3(pattern: torch.Tensor, layer: int) -> torch.Tensor:
        out = ideal(pattern, layer)
        return out if (pattern.shape[2] - 1) // 2 >= 3 else torch.eye(pattern.shape[2]).expand_as(pattern)

    every, cur = probes_with(ideal_from_3)
    from_3, _ = probes_with(ideal_from_3, min_len=3)
    for task in cur.tasks:
        assert from_3[f"probe/{task}/cot_to_eoi/l0h0"] == 1.0
        assert from_3[f"probe/{task}/iteration/l1h0"] == 1.0
        assert every[f"probe/{task}/iteration/l1h0"] < 1.0
