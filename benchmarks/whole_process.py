"""2 and 0 epochs of the paper configuration as whole processes: `iterhead train` at its default
settings against the obvious loop (`baseline.py`), on one device. The difference of a
trainer's two runs is what its epochs of training cost, start-up and evaluation aside; the
authors' trainer was measured the same way (`REFERENCE.md`)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from iterhead.search.train import SUMMARY_SECONDS
from iterhead.trainable.devices import resolve_precision

from configs import CONFIGS, D_MODEL, PAPER, curriculum

ROOT = Path(__file__).resolve().parents[1]


def process_seconds(data: dict, device: torch.device, epochs: int, baseline: bool = False) -> tuple[float, str]:
    """Wall seconds of one whole process training `epochs` epochs of `data`: `iterhead train` at its
    default settings (precision auto; start-up, data, training, its evaluations, MLflow and
    artifacts included), or with `baseline` the obvious loop (fp32, then a full train+test
    evaluation). Both are told the device and nothing else; the second value is what it printed
    (the obvious loop's: its last line)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"paper_{epochs}_epochs.yaml"
        path.write_text(yaml.safe_dump(curriculum(data, epochs, f"paper-{epochs}-epochs")))
        command = ([sys.executable, str(ROOT / "benchmarks" / "baseline.py"), str(path), "--epochs", str(epochs)]
                   if baseline else [str(Path(sys.executable).parent / "iterhead"), "train", str(path),
                                     "--tracking-uri", f"sqlite:///{tmp}/mlflow.db"])
        t = time.perf_counter()
        out = subprocess.run([*command, "--device", str(device)], check=True, cwd=tmp, capture_output=True, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"}).stdout
        wall, text = time.perf_counter() - t, out.strip()
        return wall, text.splitlines()[-1] if baseline and text else text




def own_seconds(wall: float, printed: str) -> dict[str, float]:
    """Where a whole `iterhead train` process's `wall` seconds went, from the summary it printed:
    outside `train()` (the interpreter, imports and the command line before it, the summary and
    the exit after), its epochs, its evaluations, and the rest of `train()` (data, model,
    optimiser, MLflow writes and artifacts)."""
    found = SUMMARY_SECONDS.search(printed)
    if found is None:
        raise SystemExit(f"no summary line in iterhead train's output: {printed[-400:]!r}")
    training, evaluating, in_all = map(float, found.groups())
    return {"whole": wall, "start": wall - in_all, "training": training, "evaluating": evaluating,
            "rest": in_all - training - evaluating}


REFERENCE_TWO_EPOCHS_S = 86.0  # the authors' trainer, 2 paper epochs (REFERENCE.md: Intel Xeon with AMX, 2026-11-22)


def process_section(device: torch.device, epochs: int = 2) -> list[str]:
    """`epochs` and 0 epochs of the paper configuration as whole processes, iterhead and the
    obvious loop, one after the other: the difference is what `epochs` epochs of training cost."""
    data = CONFIGS[PAPER]
    runs = {n: process_seconds(data, device, n) for n in (0, epochs)}
    parts = {n: own_seconds(*runs[n]) for n in runs}
    ours = {n: parts[n]["whole"] for n in runs}
    base = {0: process_seconds(data, device, 0, baseline=True)[0]}
    base[epochs], detail = process_seconds(data, device, epochs, baseline=True)
    ours_d, base_d = ours[epochs] - ours[0], base[epochs] - base[0]
    auto = resolve_precision("auto", device, D_MODEL)
    lines = ["", f"## {epochs} and 0 epochs of the paper configuration, whole processes on {device.type}", "",
             f"`python {' '.join(sys.argv)}` on {time.strftime('%Y-%m-%d')}, load average "
             f"{os.getloadavg()[0]:.2f} at the end. Each trainer run as a whole process with {epochs} and with 0 "
             f"epochs, one after the other; the difference is {epochs} epochs of training (iterhead's {epochs}-epoch "
             "run also evaluates once at its end and builds an optimiser, which its 0-epoch run does not: on a "
             "CPU `trainable/adam.py`'s Adam, which does not import torch._dynamo as torch.optim's does; the "
             "obvious loop, torch.optim.Adam, evaluates fully in both).", "",
             f"| trainer | {epochs}-epoch run s | 0-epoch run s | {epochs} epochs of training s | speed-up |",
             "|---|---|---|---|---|",
             f"| obvious loop (`benchmarks/baseline.py --device {device}`, fp32) | {base[epochs]:.1f} | {base[0]:.1f} "
             f"| {base_d:.1f} | 1.0x |",
             f"| `iterhead train --device {device}` (precision auto: {auto}) | {ours[epochs]:.1f} | {ours[0]:.1f} "
             f"| {ours_d:.1f} | {base_d / ours_d:.1f}x |", "", f"Obvious loop, {epochs}-epoch run: {detail}.", "",
             "Where `iterhead train`'s seconds went, from the summary line each run printed: outside `train()` "
             "(the interpreter, imports and the command line before it, the summary and the exit after), its "
             "epochs, its evaluations, and the rest of `train()` (data, model, optimiser, MLflow writes and "
             "artifacts).", "",
             "| run | whole s | outside train() s | epochs s | evaluations s | rest of train() s |",
             "|---|---|---|---|---|---|"]
    for name, row in ((f"{epochs} epochs", parts[epochs]), ("0 epochs", parts[0]),
                      ("difference", {k: parts[epochs][k] - parts[0][k] for k in parts[0]})):
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.1f}" for k in
                                                 ("whole", "start", "training", "evaluating", "rest")) + " |")
    if device.type == "cpu" and epochs == 2:
        amx = torch.cpu._is_amx_tile_supported()
        lines += ["", "The obvious loop reuses iterhead's model and data, so it is itself faster than the authors' "
                  "reference trainer, whose code stays out of this project (its licence). `REFERENCE.md` (the "
                  f"project's shared notes) measured that trainer's 2 epochs at {REFERENCE_TWO_EPOCHS_S:.0f} s on a "
                  "2-core Intel Xeon with AMX on 2026-11-22, the same way (2-epoch minus 0-epoch whole processes)"
                  + (f": {REFERENCE_TWO_EPOCHS_S / ours_d:.1f}x this run's `iterhead train`, on the same machine "
                     "kind but not side by side." if amx else
                     "; this CPU has no AMX, so that figure is another machine kind's and no ratio is taken.")]
    print("\n".join(lines), flush=True)
    return lines
