"""Training epochs after an evaluation with oneDNN's primitive cache at its default size and at
iterhead's.

On a CPU, bf16 matrix products and GELU run as oneDNN primitives, one per shape, kept in a
cache of 1024 by default. One bf16 epoch of the paper configuration (lengths 1..32, 1024
sequences a length, d_model 128, 2 layers, batch 256) makes 924 of them and an evaluation
more (fp32: the GELUs, bf16: its products too), so the epoch after an evaluation rebuilt the
ones the evaluation evicted. `trainable.devices.prepare_env` sets the capacity to
`ONEDNN_CACHE_CAPACITY` unless the user set one. oneDNN reads it once a process, so each run
here is a process of its own, at the default precision (bf16 where the CPU has it natively):
a warm-up epoch (untimed), then twice an evaluation and an epoch, each timed, then once more,
untimed, with oneDNN's log of the primitives the epoch builds. The two capacities alternate
in order from round to round, for each evaluation precision; the ratio is the median over
rounds of (mean epoch at 1024) / (mean epoch at iterhead's).

    python benchmarks/primitive_cache.py [--rounds 3] [--out BENCHMARKS.md]

prints a table and writes it into BENCHMARKS.md under its own heading and machine kind.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from iterhead.curricula.io import parse_curriculum
from iterhead.trainable.devices import ONEDNN_CACHE_CAPACITY, ONEDNN_CACHE_ENV, resolve_precision
from iterhead.trainable.loop import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from configs import CONFIGS, D_MODEL, PAPER, curriculum  # noqa: E402
from markdown import cpu_run_line, write_kind_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Training epochs after an evaluation: oneDNN's primitive cache at 1024 and at iterhead's"
DEFAULT_CAPACITY = "1024"  # oneDNN's own
CAPACITIES = (DEFAULT_CAPACITY, ONEDNN_CACHE_CAPACITY)
EVAL_PRECISIONS = ("fp32", "bf16")


def child(eval_precision: str) -> dict:
    """One process's run (the capacity is in its environment): epoch and evaluation seconds."""
    torch.set_num_threads(2)
    device = torch.device("cpu")
    data = curriculum(CONFIGS[PAPER], 3)
    data["eval"]["precision"] = eval_precision
    trainer = Trainer(parse_curriculum(data), device, precision=resolve_precision("auto", device, D_MODEL))
    stage = trainer.cur.stages[0]
    trainer.start_stage(stage)
    trainer.train_epoch(*trainer.epoch_plan(stage, 0))  # warm-up: the epoch's primitives, allocations
    epochs, evals = [], []
    for epoch in (1, 2):
        t = time.perf_counter()
        trainer.evaluate(stage.name, 0.0, last=False)
        evals.append(time.perf_counter() - t)
        t = time.perf_counter()
        trainer.train_epoch(*trainer.epoch_plan(stage, epoch))
        epochs.append(time.perf_counter() - t)
    resident_mb = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    trainer.evaluate(stage.name, 0.0, last=False)
    # untimed: oneDNN's log of what it builds slows the epoch
    rebuilt = primitives_built(lambda: trainer.train_epoch(*trainer.epoch_plan(stage, 3)))
    return {"epochs": epochs, "evals": evals, "resident_mb": resident_mb, "precision": trainer.precision,
            "rebuilt": rebuilt}


def primitives_built(work: Callable[[], object]) -> int:
    """How many primitives oneDNN builds (cache misses) while `work` runs, from its log, which
    it writes to the process's standard output (redirected to a file meanwhile)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "onednn.log"
        sys.stdout.flush()
        saved = os.dup(1)
        with path.open("w") as log:
            os.dup2(log.fileno(), 1)
            try:
                with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON_CREATION):
                    work()
            finally:
                os.dup2(saved, 1)
                os.close(saved)
        return path.read_text().count("create:cache_miss")


def run_child(capacity: str, eval_precision: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", eval_precision], check=True, capture_output=True,
                         text=True, env={**os.environ, ONEDNN_CACHE_ENV: capacity}).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--child", choices=EVAL_PRECISIONS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    runs: dict[tuple[str, str], list[dict]] = {(e, c): [] for e in EVAL_PRECISIONS for c in CAPACITIES}
    for r in range(args.rounds):
        for eval_precision in EVAL_PRECISIONS:
            for capacity in CAPACITIES if r % 2 == 0 else CAPACITIES[::-1]:
                got = run_child(capacity, eval_precision)
                runs[eval_precision, capacity].append(got)
                print(f"round {r}: eval {eval_precision}, capacity {capacity}: epochs "
                      f"{', '.join(f'{s:.2f}' for s in got['epochs'])} s", flush=True)
    lines = ["| evaluation precision | primitive cache capacity | s / epoch after an evaluation (median; min to "
             "max) | primitives it rebuilt | s / evaluation (median) | resident MB at the end (median) |",
             "|---|---|---|---|---|---|"]
    ratios = []
    for eval_precision in EVAL_PRECISIONS:
        for capacity in CAPACITIES:
            got = runs[eval_precision, capacity]
            epochs = [s for g in got for s in g["epochs"]]
            named = f"{capacity} (oneDNN default)" if capacity == DEFAULT_CAPACITY else capacity
            lines.append(f"| {eval_precision} | {named} "
                         f"| {statistics.median(epochs):.2f} ({min(epochs):.2f} to {max(epochs):.2f}) "
                         f"| {', '.join(sorted({str(g['rebuilt']) for g in got}))} "
                         f"| {statistics.median(s for g in got for s in g['evals']):.2f} "
                         f"| {statistics.median(g['resident_mb'] for g in got):.0f} |")
        slow, fast = (runs[eval_precision, c] for c in CAPACITIES)
        ratio = statistics.median(statistics.mean(a["epochs"]) / statistics.mean(b["epochs"])
                                  for a, b in zip(slow, fast))
        ratios.append(f"{eval_precision} evaluations {ratio:.2f}x")
    precision = runs[EVAL_PRECISIONS[0], CAPACITIES[0]][0]["precision"]
    summary = (f"An epoch after an evaluation at capacity {DEFAULT_CAPACITY} took, against "
               f"{ONEDNN_CACHE_CAPACITY} (the median over rounds of the ratio of each run's mean epoch): "
               f"{', '.join(ratios)}.")
    print("\n".join(lines) + "\n\n" + summary)
    write_kind_section(args.out, HEADING, [
        f"`python benchmarks/primitive_cache.py --rounds {args.rounds}` on {time.strftime('%Y-%m-%d')}: "
        f"{cpu_run_line(2)}. The paper "
        f"configuration trained in {precision} (precision auto), one process a run: a warm-up epoch, then "
        "twice an evaluation (accuracy and probes, at the evaluation precision of the row) and an epoch; the "
        "capacities alternate in order from round to round. The primitives rebuilt (cache misses) are counted "
        "from oneDNN's log in one more evaluation and epoch of each run, untimed (the values seen in any run).",
        "", *lines, "", summary])


if __name__ == "__main__":
    main()
