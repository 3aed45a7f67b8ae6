"""bf16 against fp32 training time by model width, on one device: where `--precision auto`
should train in bf16.

bf16 pays where the matrix products dominate a step; it costs where they do not, since the
bf16 copy of the model adds casts (`trainable/mixed.py`). For each d_model in `--widths`
(head width 128, as the paper's d_model 128 with one head; 2 layers; `--batch`, 256 by
default; `--config` paper, the default, is the paper's data, lengths 1..32 with 1024
sequences a length, and small is lengths 1..8) this script builds an fp32 and a bf16 trainer,
warms each up with one untimed epoch, then times their epochs in turn, the order
alternating from round to round, and reports the median seconds per epoch of each and
their ratio. On CUDA the clock reads after a device synchronise (`parallel.Epochs`).

    python benchmarks/precision_width.py [--device cuda] [--widths 128,256,512,768,1024] [--rounds 3]
        [--batch 256] [--config paper|small] [--out BENCHMARKS.md]

prints a table and writes it into BENCHMARKS.md under its own heading, which names the
batch and data, the machine kind and the device.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from iterhead.curricula.io import parse_curriculum
from iterhead.trainable.devices import native_bf16, prepare_env, resolve_precision
from iterhead.trainable.loop import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from configs import CONFIGS, PAPER, SMALL, curriculum  # noqa: E402
from markdown import device_heading, replace_section  # noqa: E402
from parallel import Epochs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## bf16 against fp32 training time by model width"
PRECISIONS = ("fp32", "bf16")


def trainers(config: str, batch: int, d_model: int, rounds: int, device: torch.device) -> dict[str, Epochs]:
    """An fp32 and a bf16 trainer of one width, each warmed up by an untimed epoch."""
    cur = curriculum(CONFIGS[config], rounds + 1, f"width-{d_model}")
    cur["model"] = {**cur["model"], "d_model": d_model, "n_heads": max(1, d_model // 128)}
    cur["optim"] = {**cur["optim"], "batch_size": batch}
    return {p: Epochs(Trainer(parse_curriculum(cur), device, precision=p)) for p in PRECISIONS}


def measure(config: str, batch: int, d_model: int, rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds per epoch of each precision, epochs taken in turn (order alternating)."""
    clocks = trainers(config, batch, d_model, rounds, device)
    laps: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for r in range(rounds):
        for p in PRECISIONS if r % 2 == 0 else PRECISIONS[::-1]:
            laps[p].append(clocks[p].lap().seconds)
    return {p: statistics.median(v) for p, v in laps.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--widths", default="128,256,512,768,1024", help="comma-separated d_model values")
    ap.add_argument("--rounds", type=int, default=3, help="timed epochs per precision and width")
    ap.add_argument("--batch", type=int, default=256, help="sequences a step")
    ap.add_argument("--config", choices=("paper", "small"), default="paper",
                    help="the data: paper is lengths 1..32, small lengths 1..8 (1024 sequences a length)")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    prepare_env()  # before training starts, as in `iterhead train`
    device = torch.device(args.device)
    if not native_bf16(device):
        raise SystemExit(f"--device {args.device}: no native bf16 here, so there is nothing to compare")
    config = PAPER if args.config == "paper" else SMALL
    data = CONFIGS[config]
    about = f"batch {args.batch}, lengths {data['min_len']}..{data['max_len']}"
    heading, name = device_heading(f"{HEADING}, {about}", device)
    lines = [heading, "",
             f"`python {' '.join(sys.argv)}` on {time.strftime('%Y-%m-%d')}: {name}, torch {torch.__version__}, "
             f"torch threads: {torch.get_num_threads()}. Lengths {data['min_len']}..{data['max_len']} with "
             f"{data['train_per_len']} sequences a length, 2 layers, heads of width 128, batch {args.batch}; the "
             "median of each precision's timed epochs, taken in turn after an untimed warm-up epoch each. `auto` is "
             "what `--precision auto` trains in at that width here.", "",
             "| d_model | heads | fp32 s / epoch | bf16 s / epoch | bf16 / fp32 | auto |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for d in (int(w) for w in args.widths.split(",")):
        s = measure(config, args.batch, d, args.rounds, device)
        lines.append(f"| {d} | {max(1, d // 128)} | {s['fp32']:.3f} | {s['bf16']:.3f} | {s['bf16'] / s['fp32']:.2f} "
                     f"| {resolve_precision('auto', device, d)} |")
        print(lines[-1], flush=True)
    replace_section(Path(args.out), lines[0], lines)
    print(f"wrote {lines[0]!r} into {args.out}")


if __name__ == "__main__":
    main()
