"""bf16 training epochs with the explicit attention's keys and values from two products,
against one product split in two.

bf16 training on a CPU runs the explicit attention (`trainable/mixed.py`). Its keys and values
come from two products (`Attention._keys_values`), not from one product split in two: the
split's halves are not contiguous, so the batched products of the attention copied them, and
the backward pass joined their gradients again. This script trains the paper configuration
(lengths 1..32, 1024 sequences a length, d_model 128, 2 layers, batch 256) in bf16 and
times epochs with each layout in turn, the order alternating from round to round, so a slow
moment of a shared machine hits both alike; every epoch trains on the same epoch plan (rows,
order, dropout), from where the last one left the model. It reports the median wall and
CPU seconds (user + system, both threads) of each layout, and in how many rounds two
products were the faster, with an exact two-sided sign test.

    python benchmarks/attention_layout.py [--rounds 16] [--out BENCHMARKS.md]

prints a table and writes it into BENCHMARKS.md under its own heading and machine kind.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from iterhead.curricula.io import parse_curriculum
from iterhead.trainable.loop import Trainer
from iterhead.trainable.model import Attention

sys.path.insert(0, str(Path(__file__).resolve().parent))
from configs import CONFIGS, PAPER, curriculum  # noqa: E402
from markdown import cpu_run_line, write_kind_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## bf16 training: keys and values from two products against one split in two"
LAYOUTS = ("two products", "one product, split")


def _one_product(self: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layout the explicit path had before: one product for keys and values, split in two."""
    d = x.shape[-1]
    k, v = F.linear(x, self.qkv.weight[d:], self.qkv.bias[d:]).split(d, dim=-1)
    return self._split(k), self._split(v)


@contextmanager
def layout(name: str) -> Iterator[None]:
    """Every `Attention` takes its keys and values the `name` way while the context is open."""
    kept = Attention._keys_values
    if name == LAYOUTS[1]:
        Attention._keys_values = _one_product
    try:
        yield
    finally:
        Attention._keys_values = kept


def sign_test(wins: int, n: int) -> float:
    """Exact two-sided p of `wins` of `n` under a fair coin."""
    tail = sum(math.comb(n, k) for k in range(min(wins, n - wins) + 1)) / 2**n
    return min(1.0, 2 * tail)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    trainer = Trainer(parse_curriculum(curriculum(CONFIGS[PAPER], 2)), "cpu", precision="bf16")
    stage = trainer.cur.stages[0]
    trainer.start_stage(stage)
    trainer.train_epoch(*trainer.epoch_plan(stage, 0))  # warm-up: kernels, allocations
    wall: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    cpu: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for r in range(args.rounds):
        for name in LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]:
            with layout(name):
                plan, generator = trainer.epoch_plan(stage, 1)
                t, c = time.perf_counter(), time.process_time()
                trainer.train_epoch(plan, generator)
                wall[name].append(time.perf_counter() - t)
                cpu[name].append(time.process_time() - c)
            print(f"round {r}: {name}: {wall[name][-1]:.2f} s", flush=True)
    wins = sum(a < b for a, b in zip(*(wall[name] for name in LAYOUTS)))
    ratio = statistics.median(a / b for a, b in zip(*(wall[name] for name in LAYOUTS)))
    lines = ["| keys and values | s / epoch (median; min to max) | CPU s / epoch (median) |", "|---|---|---|"]
    for name in LAYOUTS:
        lines.append(f"| {name} | {statistics.median(wall[name]):.2f} ({min(wall[name]):.2f} to "
                     f"{max(wall[name]):.2f}) | {statistics.median(cpu[name]):.2f} |")
    summary = (f"Two products were the faster in {wins} of {args.rounds} rounds (exact two-sided sign test "
               f"p = {sign_test(wins, args.rounds):.3f}); the median of the rounds' wall-time ratios, two "
               f"products over one, is {ratio:.3f}.")
    print("\n".join(lines) + "\n\n" + summary)
    write_kind_section(args.out, HEADING, [
        f"`python benchmarks/attention_layout.py --rounds {args.rounds}` on {time.strftime('%Y-%m-%d')}: "
        f"{cpu_run_line(2)}. The paper "
        "configuration in bf16 (`trainable/mixed.py`), one epoch of each layout a round, the order "
        "alternating; both scale and mask the attention scores in place.",
        "", *lines, "", summary])


if __name__ == "__main__":
    main()
