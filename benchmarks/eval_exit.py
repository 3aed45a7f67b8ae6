"""What rows stopping at their first wrong answer span save in an evaluation, and cost.

A chain-of-thought row is wrong as soon as one answer token is, so `evaluate.correct_rows`
runs the answer positions in spans and only the rows right so far go on
(`evaluate.FIRST_CUT`). This script times one fp32 accuracy evaluation
(`correct_rows`, no probes) with the spans and with whole rows (`FIRST_CUT` above every
answer length), alternating the two, best of `--repeats`, on:

- the paper configuration (lengths 1..32, 1024 test sequences per length, d128, 2 layers)
  after `--epochs` epochs at the default precision, as `benchmarks/throughput.py` trains it:
  a model that has not decided its rows, as most evaluations of a search see it;
- the same model scored against its own argmax (every row right to the end): no row stops
  early, so this is what the spans cost where they cannot save anything;
- every evaluation of a run that pretrains on polynomial iteration and finetunes on parity
  (`benchmarks/bf16_eval.py`'s workload "transfer, d128, L 1..10"), from undecided to partly
  learnt.

Where the two ways score a row differently the script gives the largest fp32 margin of such
rows: the spans reorder float32 sums, as a different chunk size does, so only a row at a tie
within rounding may differ.

    python benchmarks/eval_exit.py [--epochs 2] [--repeats 3] [--out BENCHMARKS.md]

prints a table and writes it into BENCHMARKS.md under its own heading.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from iterhead.curricula.io import parse_curriculum
from iterhead.trainable import evaluate
from iterhead.trainable.devices import resolve_precision
from iterhead.trainable.evaluate import EvalTable
from iterhead.trainable.loop import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parallel  # noqa: E402  (beside this script)
from bf16_eval import workload  # noqa: E402
from configs import CONFIGS, D_MODEL, PAPER, curriculum  # noqa: E402
from markdown import cpu_model, machine_kind, replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Evaluation: rows stop at their first wrong answer span"
SNAPSHOTS = "transfer, d128, L 1..10"  # a `bf16_eval.WORKLOADS` entry
WHOLE = 10**9  # a first span longer than any answer: every row runs whole


def compare(model: torch.nn.Module, table: EvalTable, repeats: int) -> dict:
    """Best seconds with spans and whole rows (alternating), accuracy, and the rows the two
    score differently with the largest of their fp32 margins (`evaluate.row_margins`, as a
    share of the row's largest |logit|): the spans reorder float32 sums, so only a row at a
    tie within rounding may differ."""
    times: dict[int, list[float]] = {evaluate.FIRST_CUT: [], WHOLE: []}
    verdicts = {}
    spans = evaluate.FIRST_CUT
    try:
        for _ in range(repeats):
            for cut in times:
                evaluate.FIRST_CUT = cut
                t = time.perf_counter()
                verdicts[cut] = evaluate.correct_rows(model, table)
                times[cut].append(time.perf_counter() - t)
    finally:
        evaluate.FIRST_CUT = spans
    differ = verdicts[spans] != verdicts[WHOLE]
    margins = evaluate.row_margins(model, table)
    share = evaluate.spread_rows(table, [(m / s).abs() for m, s in margins])
    return {"acc": float(verdicts[spans].mean()), "differ": int(differ.sum()),
            "closest": float(share[differ].max()) if differ.any() else None,
            "spans_s": min(times[spans]), "whole_s": min(times[WHOLE])}


def row(name: str, r: dict) -> str:
    closest = "-" if r["closest"] is None else f"{r['closest']:.1e}"
    return (f"| {name} | {r['acc']:.3f} | {r['whole_s']:.2f} | {r['spans_s']:.2f} "
            f"| {r['whole_s'] / r['spans_s']:.2f}x | {r['differ']} | {closest} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    device = torch.device("cpu")
    precision = resolve_precision("auto", device, D_MODEL)
    lines = ["| model | accuracy | whole rows s | spans s | speed-up | rows scored otherwise "
             "| their largest fp32 margin / largest \\|logit\\| |", "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    trainer = Trainer(parse_curriculum(curriculum(CONFIGS[PAPER], args.epochs), file="benchmark"), device,
                      precision=precision)
    parallel.timed_epochs(trainer, args.epochs - 1)  # epochs 0 .. epochs - 1
    own = evaluate.own_answers(trainer.model, trainer.eval_table)
    for name, table in ((f"paper, after {args.epochs} epochs ({precision})", trainer.eval_table),
                        ("the same, scored against its own argmax", own)):
        lines.append(row(name, compare(trainer.model, table, args.repeats)))
        print(lines[-1], flush=True)
    snap = workload(SNAPSHOTS)
    for ev in snap.run():
        lines.append(row(f"{SNAPSHOTS}, {ev.stage} epoch {ev.epoch}",
                         compare(snap.model, snap.eval_table, args.repeats)))
        print(lines[-1], flush=True)
    heading = f"{HEADING}: {machine_kind()}"
    said = [heading, "",
            f"`python benchmarks/eval_exit.py --epochs {args.epochs} --repeats {args.repeats}` on "
            f"{time.strftime('%Y-%m-%d')}: {cpu_model()}, 2 torch threads, {time.perf_counter() - started:.0f} s. "
            f"One fp32 accuracy evaluation of every test row (no probes), best of {args.repeats}, the two ways "
            f"alternating: whole rows, and answer spans (the first {evaluate.FIRST_CUT} answer positions, then "
            "spans as long as all before them while most rows stop in them, else the rest at once) after which "
            "only the rows right so far go on. Accuracy is the mean over test rows (not over lengths). A row "
            "the two ways score otherwise is shown with its fp32 margin (target logit minus the best other, "
            "least over the answer) as a share of its largest |logit|: float32 keeps 24 bits (6e-8).",
            "", *lines]
    replace_section(Path(args.out), heading, said)


if __name__ == "__main__":
    main()
