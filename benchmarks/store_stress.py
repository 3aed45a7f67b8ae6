"""Sixteen processes writing metrics into one sqlite MLflow store at once: count every row.

Each writer process opens its own `RunWriter` (as sixteen `iterhead train` runs or search
drivers sharing a store would), creates a run, and logs `--steps` evaluations of
`--metrics` metrics, one batch per evaluation. Afterwards every metric history is read
back: the table says how many rows were expected, found, lost and duplicated, and the
write throughput. Not part of the test run; appends its table to BENCHMARKS.md.

    python benchmarks/store_stress.py [--writers 16] [--steps 50] [--metrics 40]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def writer(uri: str, index: int, steps: int, metrics: int, start: float) -> tuple[str, int]:
    from iterhead.search.tracking import RunWriter

    w = RunWriter(uri)
    run = w.submit(w.create_run, "stress", f"writer-{index}", {"iterhead.trial_id": f"w{index}"}, {}).result()
    while time.time() < start:  # all writers begin together
        time.sleep(0.01)
    errors = 0
    for step in range(steps):
        w.submit(w.log_metrics, run, {f"m/{k}": step + k / 1000 for k in range(metrics)}, step)
    try:
        w.close()
    except Exception:  # counted, and the rows it lost show up in the table
        errors += 1
    return run, errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--writers", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--metrics", type=int, default=40)
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        MlflowClient(uri).create_experiment("stress")  # the store, made once before the writers
        start = time.time() + 8.0
        with mp.get_context("spawn").Pool(args.writers) as pool:
            results = pool.starmap(writer, [(uri, i, args.steps, args.metrics, start) for i in range(args.writers)])
        wall = time.time() - start
        client = MlflowClient(uri)
        expected = args.writers * args.steps * args.metrics
        found = duplicated = 0
        for run, _ in results:
            for k in range(args.metrics):
                steps = [m.step for m in client.get_metric_history(run, f"m/{k}")]
                found += len(set(steps))
                duplicated += len(steps) - len(set(steps))
    errors = sum(e for _, e in results)
    lines = ["", f"## {args.writers} writers into one sqlite store", "",
             f"`python benchmarks/store_stress.py --writers {args.writers} --steps {args.steps} --metrics "
             f"{args.metrics}` on {time.strftime('%Y-%m-%d')} ({os.cpu_count()} CPUs): {args.writers} processes, "
             f"each one run and {args.steps} batched writes of {args.metrics} metrics.", "",
             "| writers | rows expected | rows found | lost | duplicated | writer errors | wall s | rows / s | batches / s |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| {args.writers} | {expected} | {found} | {expected - found} | {duplicated} | {errors} | {wall:.1f} "
             f"| {found / wall:,.0f} | {args.writers * args.steps / wall:.1f} |", ""]
    print("\n".join(lines))
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
