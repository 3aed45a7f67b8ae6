"""Does bf16 training reach the target as fp32 does? Compute to target over many seeds.

Trains one curriculum (default: `examples/paper/cpu/base_poly_then_parity.yaml`) on each
seed in fp32 and in bf16 (`trainable/mixed.py`), and compares how many seeds reach the target and the
distribution of `compute_to_target` (censored seeds at the curriculum's penalty): medians,
and an exact two-sided Mann-Whitney rank test (every split of the pooled values is
enumerated, ties take mid-ranks, so no normal approximation). The two precisions train in
two processes at once, one torch thread each; the numbers do not depend on timing.

    python benchmarks/precision.py --seeds 8

prints a table and writes it into BENCHMARKS.md under its own heading and machine kind.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import statistics
import time
from pathlib import Path

from markdown import cpu_model, machine_kind, replace_section  # beside this script

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## bf16 against fp32: compute to target over seeds"  # plus the machine kind: one section per kind


def train_all(curriculum: str, precision: str, seeds: list[int]) -> list[dict]:
    """Train `curriculum` on every seed at `precision`, one torch thread; one row per seed."""
    import torch

    from iterhead.curricula.io import load_curriculum
    from iterhead.trainable.loop import Trainer
    from iterhead.trainable.summary import summary_metrics

    torch.set_num_threads(1)
    base = load_curriculum(curriculum)
    out = []
    for seed in seeds:
        trainer = Trainer(base.model_copy(update={"seed": seed}), "cpu", precision=precision)
        t0 = time.perf_counter()
        for _ in trainer.run():
            pass
        s = summary_metrics(trainer.cur, trainer.outcome)
        out.append({"seed": seed, "reached": bool(s["reached"]), "ctt": s["compute_to_target"],
                    "seconds": time.perf_counter() - t0, "train_seconds": trainer.compute.seconds})
        print(f"{precision} seed {seed}: reached={out[-1]['reached']} ctt={out[-1]['ctt']:.4e} "
              f"({out[-1]['seconds']:.0f} s)", flush=True)
    return out


def ranks(values: list[float]) -> list[float]:
    """Mid-ranks (1-based): tied values share the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def mann_whitney_exact(a: list[float], b: list[float]) -> tuple[float, float]:
    """U of `a` and the exact two-sided p-value over all splits of the pooled mid-ranks."""
    pooled = ranks(a + b)
    n = len(a)
    mean = n * (len(pooled) + 1) / 2
    observed = abs(sum(pooled[:n]) - mean)
    hits = total = 0
    for chosen in itertools.combinations(range(len(pooled)), n):
        total += 1
        hits += abs(sum(pooled[i] for i in chosen) - mean) >= observed - 1e-9
    u = sum(pooled[:n]) - n * (n + 1) / 2
    return u, hits / total


def heading() -> str:
    """This script's section for this machine kind: a run on one kind keeps the others' evidence."""
    return f"{HEADING}: {machine_kind()}"


def table(results: dict[str, list[dict]], curriculum: str, command: str) -> list[str]:
    fp32, bf16 = results["fp32"], results["bf16"]
    u, p = mann_whitney_exact([r["ctt"] for r in fp32], [r["ctt"] for r in bf16])
    lines = ["", heading(), "",
             f"`{command}` on {time.strftime('%Y-%m-%d')}: {cpu_model()}, "
             f"one torch thread per precision, `{Path(curriculum).relative_to(ROOT)}`, seeds "
             f"{', '.join(str(r['seed']) for r in fp32)}. compute_to_target in FLOPs; censored seeds count at "
             "the penalty (twice the planned compute).", "",
             "| seed | fp32 reached | fp32 compute_to_target | bf16 reached | bf16 compute_to_target |",
             "|---|---|---|---|---|"]
    for a, b in zip(fp32, bf16):
        lines.append(f"| {a['seed']} | {'yes' if a['reached'] else 'no'} | {a['ctt']:.3e} | "
                     f"{'yes' if b['reached'] else 'no'} | {b['ctt']:.3e} |")
    for name, rows in (("fp32", fp32), ("bf16", bf16)):
        lines.append(f"| **{name}** | {sum(r['reached'] for r in rows)} of {len(rows)} | median "
                     f"{statistics.median_low([r['ctt'] for r in rows]):.3e} | | |")
    train = {k: sum(r["train_seconds"] for r in v) for k, v in results.items()}
    lines += ["", f"Exact two-sided Mann-Whitney test of the two compute_to_target samples: U = {u:g}, "
              f"p = {p:.3f}. Training wall time in all: fp32 {train['fp32']:.0f} s, bf16 {train['bf16']:.0f} s "
              f"({train['fp32'] / train['bf16']:.2f}x; both processes ran at once on the two cores)."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--curriculum", default=str(ROOT / "examples" / "paper" / "cpu" / "base_poly_then_parity.yaml"))
    args = ap.parse_args()
    seeds = list(range(args.seeds))
    with mp.get_context("spawn").Pool(2) as pool:
        jobs = {p: pool.apply_async(train_all, (args.curriculum, p, seeds)) for p in ("fp32", "bf16")}
        results = {p: job.get() for p, job in jobs.items()}
    lines = table(results, args.curriculum, f"python benchmarks/precision.py --seeds {args.seeds}")
    print("\n".join(lines))
    replace_section(ROOT / "BENCHMARKS.md", heading(), lines)


if __name__ == "__main__":
    main()
