"""Where a training step's time goes on one device: the host's work against the device's.

A d_model-128 model leaves a large GPU idle unless the host can queue kernels faster than
they run. For the paper configuration (lengths 1..32, 1024 sequences a length, d_model 128,
2 layers, one head, batch 256) in each precision this script times one epoch without the
profiler (after an untimed warm-up epoch), then profiles the next one and reports, per
optimiser step: the wall time, the kernels launched (every device activity the profiler
records: kernels, copies, fills), the time the device spent in them (the union of their
intervals; the rest of the step the device waited for the host), the host calls that wait
for the device (stream, event or device synchronise, blocking copies), and the operators
that cost the host the most. On CUDA it also times an fp32 epoch with torch's
deterministic algorithms off, which iterhead keeps on (README, Reproducibility), to show
what determinism costs there.

    python benchmarks/step_profile.py [--device cuda] [--config paper|small] [--out BENCHMARKS.md]

prints the tables and writes them into BENCHMARKS.md under its own heading.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from iterhead.curricula.io import parse_curriculum
from iterhead.trainable.devices import native_bf16, prepare_env
from iterhead.trainable.loop import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from configs import CONFIGS, PAPER, SMALL, curriculum  # noqa: E402
from markdown import device_heading, replace_section  # noqa: E402
from parallel import Epochs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Where a training step's time goes: host against device"
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Microseconds covered by the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def steps_of(clock: Epochs) -> int:
    """Optimiser steps in the epoch `clock` trains next."""
    return sum(1 for _ in clock.runs[0].epoch_plan(clock.stage, clock.epoch)[0].batches())


def profiled(clock: Epochs, device: torch.device) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """One epoch timed plainly, the next under the profiler: per-step figures and the host's top operators."""
    plain = steps_of(clock)
    wall = clock.lap().seconds / plain
    steps = steps_of(clock)  # the profiled epoch's, which may batch its rows otherwise
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        clock.lap()
    events = prof.events()
    kernels = [(e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA]
    host = collections.Counter()
    for e in events:
        if e.device_type == DeviceType.CPU and e.name.startswith("aten::"):
            host[e.name] += e.self_cpu_time_total
    row = {"steps": steps, "wall_ms": 1e3 * wall,
           "kernels": len(kernels) / steps, "busy_ms": busy_us(kernels) / 1e3 / steps,
           "waits": sum(1 for e in events if e.name in WAITS) / steps,
           "aten": sum(1 for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::")) / steps}
    top = [(name, us / 1e3 / steps) for name, us in host.most_common(8)]
    return row, top


def trainer(config: str, device: torch.device, precision: str, epochs: int) -> Epochs:
    return Epochs(Trainer(parse_curriculum(curriculum(CONFIGS[config], epochs)), device, precision=precision))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", choices=("paper", "small"), default="paper")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    prepare_env()  # before training starts, as in `iterhead train`
    device = torch.device(args.device)
    config = PAPER if args.config == "paper" else SMALL
    heading, name = device_heading(HEADING, device)
    lines = [heading, "",
             f"`python {' '.join(sys.argv)}` on {time.strftime('%Y-%m-%d')}: {name}, torch {torch.__version__}. "
             f"Per optimiser step of the {config} configuration: wall ms (an epoch without the profiler, after a "
             "warm-up one), then from the next epoch under the profiler: kernels launched, ms the device spent "
             "in kernels, host calls that wait for the device, and aten operator calls (nested ones included).", "",
             "| precision | steps / epoch | wall ms / step | kernels / step | device busy ms / step "
             "| waits / step | aten ops / step |", "|---|---|---|---|---|---|---|"]
    tops, rows = [], {}
    for precision in ("fp32", "bf16") if native_bf16(device) else ("fp32",):
        row, top = profiled(trainer(config, device, precision, 3), device)
        rows[precision] = row
        lines.append(f"| {precision} | {row['steps']} | {row['wall_ms']:.2f} | {row['kernels']:.0f} "
                     f"| {row['busy_ms']:.2f} | {row['waits']:.1f} | {row['aten']:.0f} |")
        tops.append(f"{precision}: " + ", ".join(f"{n} {ms:.2f}" for n, ms in top))
        print(lines[-1], flush=True)
    lines += ["", "The host's costliest operators, self CPU ms per step under the profiler:", "",
              *[f"- {t}" for t in tops]]
    if device.type == "cuda":
        clock = trainer(config, device, "fp32", 2)
        steps = steps_of(clock)
        torch.use_deterministic_algorithms(False)
        try:
            off = clock.lap().seconds
        finally:
            torch.use_deterministic_algorithms(True)
        lines += ["", f"An fp32 epoch with torch's deterministic algorithms off: {1e3 * off / steps:.2f} ms a step "
                  f"against {rows['fp32']['wall_ms']:.2f} with them on (one epoch each)."]
    print("\n".join(lines[-4:]), flush=True)
    replace_section(Path(args.out), lines[0], lines)


if __name__ == "__main__":
    main()
