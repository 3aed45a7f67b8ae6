"""Does the screened bf16 evaluation score what fp32 scores, and what does it rescore?

Trains a few curricula in fp32 and, at each of their evaluations, scores the test rows three
ways: fp32 (`correct_rows`), a plain bf16 pass (`evaluate.bf16_products`, its verdicts alone), and the
screened bf16 evaluation that `eval.precision: bf16` selects (`screened_rows`: bf16, then
the rows near a tie in fp32). Per snapshot it reports the largest shift of a row's margin
between bf16 and fp32 as a share of the row's largest |logit| (below `evaluate.SCREEN`, no
verdict can flip unscreened; above it, some could), the rows a plain bf16 pass scores
differently from fp32 and the largest of their bf16 margins on the same scale (what the
screen must stay above: it rescores those rows), the rows the screen scores differently (it
must be none), the share of distinct rows rescored, and, where the CPU multiplies bf16 in
hardware, the seconds of an fp32 and of a screened evaluation (elsewhere bf16 is emulated
and its time says nothing).

    python benchmarks/bf16_eval.py [--out BENCHMARKS.md]

prints a table and writes it into BENCHMARKS.md under its own heading.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from iterhead.curricula.io import parse_curriculum, read_yaml_mapping
from iterhead.trainable import evaluate
from iterhead.trainable.devices import native_bf16
from iterhead.trainable.loop import Trainer

from markdown import cpu_model, machine_kind, replace_section  # beside this script

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## bf16 evaluation: the verdicts of fp32, and the rows it rescores"
WORKLOADS = {  # name: (curriculum, overrides); every evaluation is a snapshot
    "transfer, d64, L 1..6": ("examples/paper/cpu/base_poly_then_parity.yaml", {"eval": {"every_epochs": 20}}),
    "parity, d128, L 1..16": ("examples/paper/base_parity.yaml", {
        "data": {"max_len": 16, "train_per_len": 512, "test_per_len": 128},
        "optim": {"lr": 1.0e-3, "batch_size": 128},
        "stages": [{"name": "train", "mix": {"parity": 1.0}, "epochs": 20}], "eval": {"every_epochs": 5}}),
    "transfer, d128, L 1..10": ("examples/poly_then_parity.yaml", {
        "data": {"max_len": 10, "train_per_len": 1024, "test_per_len": 256},
        "stages": [{"name": "pretrain", "mix": {"polynomial": 1.0}, "epochs": 10},
                   {"name": "finetune", "mix": {"parity": 1.0}, "epochs": 20}], "eval": {"every_epochs": 10}}),
}


def workload(name: str) -> Trainer:
    """A trainer for `WORKLOADS[name]`: its curriculum with the overrides applied."""
    path, overrides = WORKLOADS[name]
    data = read_yaml_mapping(ROOT / path)
    for key, value in overrides.items():  # a mapping updates the base's, a list replaces it
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    return Trainer(parse_curriculum(data, file=path))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def snapshot(trainer: Trainer, native: bool) -> dict:
    """Score one snapshot's test rows the three ways."""
    model, table = trainer.model, trainer.eval_table
    fp32, fp32_s = timed(lambda: evaluate.correct_rows(model, table))
    screened, screened_s = timed(lambda: evaluate.screened_rows(model, table))
    screened, rescored = screened
    exact = evaluate.row_margins(model, table)
    with evaluate.bf16_products(model):
        rounded = evaluate.row_margins(model, table)
    plain = evaluate.spread_rows(table, [m > 0 for m, _ in rounded])
    shift = max(float(((a - b).abs() / s).max()) for (a, _), (b, s) in zip(exact, rounded))
    # What the screen must stay above: the bf16 margin (as a share of the row's largest |logit|)
    # of the rows whose bf16 verdict is not fp32's. A large shift far from a tie flips nothing.
    flipped = [(b.abs() / s)[(a > 0) != (b > 0)] for (a, _), (b, s) in zip(exact, rounded)]
    closest = max((float(f.max()) for f in flipped if len(f)), default=None)
    distinct = sum(len(g.inputs) for g in table.groups)
    return {"distinct": distinct, "shift": shift, "closest": closest, "plain": int((plain != fp32).sum()),
            "screened": int((screened != fp32).sum()), "rescored": rescored / distinct,
            "fp32_s": fp32_s if native else None, "screened_s": screened_s if native else None}


def relation(share: float) -> str:
    """Where `share` (of a row's largest |logit|) stands against `evaluate.SCREEN`."""
    if share < evaluate.SCREEN:
        return f"{evaluate.SCREEN / share:.1f}x below the screen" if share > 0 else "the screen is above it"
    return f"above the screen, {evaluate.SCREEN}"


def flips(closest: list[float]) -> str:
    """What the screen had to catch: the largest bf16 margin of a row plain bf16 flipped, if any."""
    if not closest:
        return "a plain bf16 pass scored every row as fp32 did"
    return (f"of the rows a plain bf16 pass scored otherwise than fp32, the largest bf16 margin was "
            f"{max(closest):.4f} of the row's largest |logit| ({relation(max(closest))}; a screen above it "
            "rescores every such row)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    native = native_bf16(torch.device("cpu"))
    head = ("| workload | stage, epoch | target acc | test rows (distinct) | largest margin shift / largest \\|logit\\| "
            "| rows plain bf16 scores otherwise | their largest bf16 margin / largest \\|logit\\| "
            "| rows the screen scores otherwise | distinct rows rescored | fp32 eval s | screened eval s |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    shifts, closest, rescored, wrong, started = [], [], [], 0, time.perf_counter()
    for name in WORKLOADS:
        trainer = workload(name)
        for ev in trainer.run():
            r = snapshot(trainer, native)
            shifts.append(r["shift"])
            if r["closest"] is not None:
                closest.append(r["closest"])
            rescored.append(r["rescored"])
            wrong += r["screened"]
            secs = [f"{r[k]:.2f}" if r[k] is not None else "emulated" for k in ("fp32_s", "screened_s")]
            lines.append(f"| {name} | {ev.stage}, {ev.epoch} | {ev.target_acc:.3f} "
                         f"| {len(trainer.eval_table.lengths)} ({r['distinct']}) | {r['shift']:.3f} | {r['plain']} "
                         f"| {'-' if r['closest'] is None else format(r['closest'], '.4f')} "
                         f"| {r['screened']} | {r['rescored']:.1%} | {secs[0]} | {secs[1]} |")
            print(lines[-1], flush=True)
    heading = f"{HEADING}: {machine_kind()}"  # one section per machine kind
    said = [heading, "",
            f"`python benchmarks/bf16_eval.py` on {time.strftime('%Y-%m-%d')}: {cpu_model()} (native bf16: "
            f"{'yes' if native else 'no, so bf16 is emulated and no bf16 time is shown'}), 2 torch threads, "
            f"{time.perf_counter() - started:.0f} s. Each workload trains in fp32 and every evaluation is a "
            "snapshot. `evaluate.SCREEN` (the share of a row's largest |logit| within which a bf16 margin "
            f"is rescored in fp32) is {evaluate.SCREEN}.", "", *lines, "",
            f"Over {len(shifts)} snapshots: the largest margin shift was {max(shifts):.3f} of the row's largest "
            f"|logit| ({relation(max(shifts))}); {flips(closest)}; the screen scored "
            f"{wrong} rows otherwise than fp32; it rescored {min(rescored):.0%} to {max(rescored):.0%} of the "
            f"distinct rows (median {float(np.median(rescored)):.0%})."]
    print("\n".join(said[-1:]))
    replace_section(Path(args.out), heading, said)


if __name__ == "__main__":
    main()
