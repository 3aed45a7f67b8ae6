"""Where a small CPU search's wall time goes: training, or Ray, scheduling and MLflow.

Runs 6-trial searches (short trials, 2 at once on 2 CPUs), one per trial length, through `run_search` in this
process, from before Ray starts until the parent run is closed, and reads each trial's own
training and evaluation seconds back from MLflow. With `slots` trials running at once,

    share outside training = 1 - sum(trial training + evaluation seconds) / (wall x slots)

so it counts Ray's start, trial scheduling and start-up, checkpointing, MLflow writes and
idle slots. Appends a section to BENCHMARKS.md.

    python benchmarks/search_overhead.py [--epochs 150 600] [--every 5] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import yaml
from mlflow import MlflowClient

from iterhead.search.run import SearchOptions, run_search
from iterhead.search.spec import load_search

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, nargs="+", default=[150, 600], help="epochs per trial, one search each")
    ap.add_argument("--every", type=int, default=5, help="evaluate (and report) every N epochs")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    slots = 2
    rows = [measure(epochs, args.every, slots) for epochs in args.epochs]
    lines = ["", "## A 6-trial CPU search: wall time outside training", "",
             f"`python benchmarks/search_overhead.py --epochs {' '.join(map(str, args.epochs))} --every {args.every}` "
             f"on {time.strftime('%Y-%m-%d')} ({os.cpu_count()} CPUs): 6 trials (lengths 1..4, d_model 64, an "
             f"evaluation and report every {args.every} epochs), {slots} at once, scheduler none; the embedded Ray is "
             "started and stopped inside the timed span; sqlite MLflow store. Wall time outside the trials' own "
             "training and evaluation = Ray's start and stop, trial start-up, reports, checkpoints, artifacts, "
             "MLflow, and a slot idling while the last trial finishes.", "",
             "| epochs per trial | wall s | trials' training s | trials' evaluation s | slots | share outside training (goal <= 15%) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {e} | {w:.1f} | {t:.1f} | {v:.1f} | {slots} | {1 - (t + v) / (w * slots):.1%} |" for e, w, t, v in rows]
    print("\n".join(lines))
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n\n")


def measure(epochs: int, every: int, slots: int) -> tuple[int, float, float, float]:
    """(epochs, wall s, summed training s, summed evaluation s) of one 6-trial search."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = yaml.safe_load((ROOT / "examples" / "poly_then_parity_small.yaml").read_text())
        base["stages"] = [{"name": "train", "mix": {"parity": 0.5, "polynomial": 0.5}, "epochs": epochs}]
        base["eval"] = {"every_epochs": every}
        (folder / "base.yaml").write_text(yaml.safe_dump(base))
        (folder / "spec.yaml").write_text(yaml.safe_dump({
            "name": "overhead", "base": "base.yaml",
            "space": {"optim.lr": {"loguniform": [5.0e-4, 2.0e-3]}},
            "search": {"algorithm": "random", "num_samples": 6, "max_concurrent": slots, "scheduler": "none"},
            "resources": {"cpu": 1}}))
        uri = f"sqlite:///{folder}/mlflow.db"
        t = time.perf_counter()
        run_search(load_search(folder / "spec.yaml"),
                   SearchOptions(uri=uri, storage_path=str(folder / "ray"), num_cpus=slots), out=io.StringIO())
        wall = time.perf_counter() - t
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("overhead")
        children = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mlflow.parentRunId")]
        train = sum(r.data.metrics["compute/seconds"] for r in children)
        evals = sum(r.data.metrics["compute/eval_seconds"] for r in children)
    return epochs, wall, train, evals


if __name__ == "__main__":
    main()
