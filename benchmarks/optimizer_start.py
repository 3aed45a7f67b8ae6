"""What the first Adam costs a fresh process: torch.optim's against iterhead's CPU Adam.

`torch.optim.Adam` imports `torch._dynamo` on first use (its methods are wrapped to keep
torch.compile out); `trainable/adam.py`'s Adam runs the same foreach arithmetic without it.
Each run is a fresh Python process that imports torch and iterhead's loop, builds the paper's
model (d_model 128, 2 layers), and times the optimiser's construction plus one step; the two
kinds alternate, so a slow moment of a shared machine hits both alike. The times are CPU seconds
of that process (user + system) and wall seconds.

    python benchmarks/optimizer_start.py [--runs 5] [--out BENCHMARKS.md]

prints a table and writes it into BENCHMARKS.md under its own heading.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from markdown import write_kind_section

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## The first Adam of a process: torch.optim against iterhead's"

ONE_RUN = """
import json, resource, sys, time, torch
from iterhead.trainable.adam import Adam
from iterhead.trainable.loop import Trainer  # what a training process has imported by then
from iterhead.curricula.schema import ModelSpec
from iterhead.trainable.model import Transformer
torch.set_num_threads(1)
model = Transformer(ModelSpec(), vocab_size=16, max_len=66, generator=torch.Generator().manual_seed(0))
model.eval()  # no dropout, so no generator needed: the gradients are all this needs
model(torch.zeros(4, 66, dtype=torch.long)).sum().backward()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
params = list(model.parameters())
opt = torch.optim.Adam(params, lr=1e-3, foreach=True) if sys.argv[1] == "torch" else Adam(params, lr=1e-3)
opt.step()
r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
cpu = r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime
print(json.dumps({"wall": t1 - t0, "cpu": cpu, "dynamo": "torch._dynamo" in sys.modules}))
"""


def one(kind: str) -> dict:
    out = subprocess.run([sys.executable, "-c", ONE_RUN, kind], check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    kinds = {"torch": "`torch.optim.Adam(foreach=True)`", "iterhead": "`trainable/adam.py`'s `Adam`"}
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(args.runs):
        for kind in kinds:
            runs[kind].append(one(kind))
    lines = ["| optimiser | construction and first step, CPU s (median; min to max) | wall s (median) "
             "| imported torch._dynamo |", "|---|---|---|---|"]
    for kind, label in kinds.items():
        cpu, wall = [r["cpu"] for r in runs[kind]], [r["wall"] for r in runs[kind]]
        lines.append(f"| {label} | {statistics.median(cpu):.2f} ({min(cpu):.2f} to {max(cpu):.2f}) "
                     f"| {statistics.median(wall):.2f} | {'yes' if all(r['dynamo'] for r in runs[kind]) else 'no'} |")
    print("\n".join(lines))
    write_kind_section(args.out, HEADING, [
        f"`python benchmarks/optimizer_start.py --runs {args.runs}` on {time.strftime('%Y-%m-%d')}, torch "
        f"{__import__('torch').__version__}: {args.runs} fresh processes of each kind, alternating; each times its "
        "optimiser's construction and first step over the paper model's parameters, after importing torch "
        f"and iterhead's training loop (load average {os.getloadavg()[0]:.2f} at the end). The difference is "
        "paid once by every process that trains on a CPU.",
        "", *lines])


if __name__ == "__main__":
    main()
