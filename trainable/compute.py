"""Analytic compute: what a dense implementation of the model spends, independent of ours.

Per trained sequence of T input tokens (padding excluded; T = sequence length - 1):

    training FLOPs = 6 * N * T  +  6 * n_layers * d_model * T * (T + 1)
    evaluation FLOPs = 2 * N * T  +  2 * n_layers * d_model * T * (T + 1)

N counts every parameter except the token and position embeddings (the blocks, the final
LayerNorm and the head). The first term is the usual 2 FLOPs per multiply-add, forward, and
twice that backward. The second is causal attention: a query at position t (1-based) takes
2 * d * t FLOPs for its scores and as many to mix the values, forward; summed over t that
is 2 * d * T * (T + 1) per layer. Our trainer skips work the loss never reads (see
`model.Transformer.forward`), so its real FLOPs are lower than these: the analytic count is
what makes compute_to_target comparable across implementations and with the paper.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from iterhead.curricula.data import seq_len


def input_tokens(lengths: np.ndarray, cot: bool) -> np.ndarray:
    """Input tokens per sequence of the given input lengths (padding excluded)."""
    return seq_len(np.asarray(lengths), cot) - 1


def flops(lengths: np.ndarray, cot: bool, n_params: int, n_layers: int, d_model: int,
          training: bool = True, copies: int = 1) -> float:
    """Analytic FLOPs for sequences of the given input lengths, each `copies` times (module
    docstring). The token sums are exact integers, so `copies` gives what the repeated lengths
    would, without an array as long as every sequence of an epoch."""
    t = input_tokens(lengths, cot).astype(np.int64)
    tokens, pairs = int(t.sum()) * copies, int((t * (t + 1)).sum()) * copies
    factor = 3.0 if training else 1.0
    return float(factor * (2.0 * n_params * float(tokens) + 2.0 * n_layers * d_model * float(pairs)))


@dataclass
class Compute:
    """Cumulative compute of one trial, across all its stages."""

    examples: int = 0
    tokens: int = 0
    flops: float = 0.0
    seconds: float = 0.0
    eval_flops: float = 0.0
    eval_seconds: float = 0.0
    flops_shared: float = 0.0  # of `flops`, those of shared stages (`StageSpec.seed`): trained once for all seeds

    def metrics(self) -> dict[str, float]:
        return {f"compute/{k}": float(v) for k, v in asdict(self).items()}


class Stopwatch:
    """Wall time that accumulates across start/stop pairs."""

    def __init__(self) -> None:
        self._t0: float | None = None

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        """Seconds since `start` (0 if not started)."""
        if self._t0 is None:
            return 0.0
        dt, self._t0 = time.perf_counter() - self._t0, None
        return dt


def count_params(d_model: int, n_layers: int, mlp_ratio: int, vocab_size: int) -> int:
    """Non-embedding parameters of `model.Transformer` (a test checks it against the model)."""
    d, h = d_model, mlp_ratio * d_model
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * h + h) + (h * d + d)
    return n_layers * block + 2 * d + (d * vocab_size + vocab_size)
