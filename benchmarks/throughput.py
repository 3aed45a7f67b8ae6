"""Training throughput of iterhead's loop, and a whole `iterhead train` against the obvious loop.

Prints a table and writes (or replaces) its own sections of BENCHMARKS.md, leaving the other
scripts' sections in place. Its headings name the machine kind (`markdown.machine_kind`, e.g.
"AMD EPYC with AVX2"): the project's machines change kind, so a run replaces its own kind's
figures and keeps the other kinds':

1. the machine's measured matmul peak per dtype (the best of three rounds of square 1024 and
   2048 products, the same thread count): fp32 always, bf16 where the device multiplies bf16
   in hardware (`devices.native_bf16`), since a bf16 row is only comparable with a bf16 peak;
2. per configuration (`--configs`), device and precision (fp32, and bf16 autocast where
   native): seconds per epoch, trained tokens per second (padding excluded), achieved
   analytic GFLOP/s (`trainable/compute.py`) and its share of the peak of that precision's
   dtype, tokens / s against the fp32 row, and one whole evaluation's time, as
   `Trainer.evaluate` runs it by default (accuracy on every test row in fp32 and the
   attention probes), also as a fraction of that row's epoch, and in bf16 rows the same
   evaluation with `eval.precision: bf16` (bf16 products, the rows near a tie rescored in
   fp32: `evaluate.screened_rows`); timed epochs and evaluations follow an untimed warm-up
   one, so CUDA's first-launch costs are not counted, and the clock reads after a device
   synchronise; the text says which precision `iterhead train` picks by default there
   (`devices.resolve_precision("auto", ...)` at d_model 128); whether bf16 learns what
   fp32 learns is `benchmarks/precision.py`'s question, asked over seeds;
3. several trainings on one device (`benchmarks/parallel.py`), with the small
   configuration a search trial typically trains, in fp32: N concurrent trial processes
   against one, and K seeds batched into one model (`trainable/seeds.py`) against the same
   seeds one after another;
4. on CUDA, one full paper-configuration run (lengths 1..32, 1000 epochs, an evaluation
   every 100, fp32 as the baseline) against the obvious loop's per-epoch time on the same
   device, measured in the same run after a warm-up epoch, times the epochs;
5. per device, 2 and 0 epochs of the paper configuration as whole processes (`whole_process.py`):
   `iterhead train --device D` at its default settings (precision auto; start-up, data,
   training, evaluation, MLflow and artifacts included) against `benchmarks/baseline.py
   --device D` (fp32, padding to the longest length, DataLoader, `.item()` per step, a full
   train+test evaluation), both on device D; the difference of the two runs is 2 epochs of
   training.

    python benchmarks/throughput.py [--epochs 2] [--configs paper,small] [--devices cpu,cuda]
        [--concurrent 1,2] [--seeds 1,2,4] [--full-epochs 1000] [--skip-process | --only-process]
        [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from iterhead.curricula.io import parse_curriculum
from iterhead.trainable.devices import native_bf16, prepare_env, resolve_precision
from iterhead.trainable.loop import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import parallel  # noqa: E402  (beside this script)
from configs import CONFIGS, D_MODEL, PAPER, SMALL, curriculum  # noqa: E402
from markdown import cpu_model, machine_kind, replace_section  # noqa: E402
from whole_process import process_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # the matmul dtype each precision trains in

sync = parallel.sync  # one copy of the timing helpers


def precisions(device: torch.device) -> list[str]:
    """fp32 always; bf16 only where the hardware has it (emulated bf16 would measure the emulation)."""
    return ["fp32", "bf16"] if native_bf16(device) else ["fp32"]


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s over square `dtype` matmuls of 1024 and 2048, three rounds each: the ceiling a row of
    that precision is measured against (bf16 units can run several times fp32's rate, so one fp32 peak
    would flatter bf16). A shared machine's neighbours slow some rounds; the best one is the ceiling."""
    best = 0.0
    for n in (1024, 2048) * 3:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        for _ in range(2):
            a @ b
        sync(device)
        reps = 5 if device.type == "cpu" else 50
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e9)
    return best


def train_rate(data: dict, epochs: int, device: torch.device, precision: str = "fp32") -> dict:
    """`epochs` epochs of the real loop at `precision` and one evaluation, each after an untimed warm-up one.

    The first epoch and evaluation on CUDA pay for kernel loading and allocation; counting
    them would understate a run of hundreds of epochs. Tokens and FLOPs are the trainer's own
    analytic counters. The evaluation is `Trainer.evaluate`'s at `precision`."""
    trainer = Trainer(parse_curriculum(curriculum(data, epochs + 1)), device, precision=precision)
    r = parallel.timed_epochs(trainer, epochs)  # warm-up epoch, synchronised clock
    seconds = r["end"] - r["start"]
    stage = trainer.cur.stages[0].name
    as_run = timed_evaluation(trainer, stage)
    screened = None
    if precision == "bf16":  # the opt-in screened evaluation, on the same weights
        trainer.cur = trainer.cur.model_copy(update={"eval": trainer.cur.eval.model_copy(update={"precision": "bf16"})})
        screened = timed_evaluation(trainer, stage)
    return {"epoch_s": seconds / epochs, "tok_s": r["tokens"] / seconds,
            "gflops": r["flops"] / seconds / 1e9, "eval_s": as_run, "screened_s": screened}


def timed_evaluation(trainer: Trainer, stage: str) -> float:
    """Seconds of one `Trainer.evaluate`, after an untimed warm-up one."""
    trainer.evaluate(stage, 0.0, last=False)
    sync(trainer.device)
    t = time.perf_counter()
    trainer.evaluate(stage, 0.0, last=False)
    sync(trainer.device)
    return time.perf_counter() - t


def throughput(devices: list[torch.device], configs: list[str], epochs: int,
               peaks: dict[tuple[str, str], float]) -> list[str]:
    """The training-throughput rows: one per device, configuration and precision, each against its own peak."""
    lines = ["| device | configuration | precision | s / epoch | tokens / s | vs fp32 | GFLOP/s "
             "| share of its matmul peak | eval s | eval / epoch | eval s, `eval.precision: bf16` |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for device in devices:
        for name in configs:
            fp32 = 0.0
            for p in precisions(device):
                r = train_rate(CONFIGS[name], epochs, device, p)
                fp32 = fp32 or r["tok_s"]
                lines.append(f"| {device.type} | {name} | {p} | {r['epoch_s']:.2f} | {r['tok_s']:,.0f} "
                             f"| {r['tok_s'] / fp32:.2f}x | {r['gflops']:.1f} "
                             f"| {r['gflops'] / peaks[device.type, p]:.0%} | {r['eval_s']:.2f} "
                             f"| {r['eval_s'] / r['epoch_s']:.2f} "
                             f"| {'-' if r['screened_s'] is None else format(r['screened_s'], '.2f')} |")
                print(lines[-1], flush=True)
    return lines


def defaults(devices: list[torch.device]) -> str:
    """What `iterhead train` (precision auto) trains these configurations in on each device here, and why."""
    said = []
    for device in devices:
        native = native_bf16(device)
        said.append(f"{resolve_precision('auto', device, D_MODEL)} on {device.type} (which "
                    f"{'multiplies bf16 in hardware' if native else 'has no native bf16'}; "
                    f"`devices.resolve_precision` at d_model {D_MODEL})")
    return "; ".join(said)


def several(device: torch.device, counts: list[int], seeds: list[int], epochs: int, peak: float) -> list[str]:
    """Tables for N concurrent trials and K batched seeds on one device (small configuration, fp32)."""
    cur = curriculum(CONFIGS[SMALL], epochs + 1)
    cpus = os.cpu_count() or 1
    lines = ["", f"## Several trainings on one {device.type} device (small configuration, {epochs} epochs)", "",
             "In fp32 (the `Trainer` default; a search's default precision is auto); the share is of the fp32 "
             "matmul peak.", "",
             "| trial processes | threads each | aggregate tokens / s | GFLOP/s | share of matmul peak | vs one |",
             "|---|---|---|---|---|---|"]
    rates = {}
    for n in counts:
        threads = max(1, cpus // n)
        r = parallel.concurrent(cur, device, n, epochs, threads)
        rates[n] = r["tok_s"]
        gflops = r["flop_s"] / 1e9
        lines.append(f"| {n} | {threads} | {r['tok_s']:,.0f} | {gflops:.1f} | {gflops / peak:.0%} "
                     f"| {r['tok_s'] / rates[counts[0]]:.2f}x |")
        print(lines[-1], flush=True)
    best = max(rates.values())
    enough = min(n for n, r in rates.items() if r >= 0.9 * best)
    lines += ["", f"The fewest processes within 10% of the best aggregate rate: {enough} "
              f"(a trial share of {1 / enough:g} of the device).", "",
              "Batch order `seeded` (the default) pads each step to the longest of the seeds' "
              "batches; `shared` (`optim.batch_order`) gives every seed the same batch shapes.", "",
              "| batched seeds K | batch order | batched s | one after another s | tokens / s batched | speed-up |",
              "|---|---|---|---|---|---|"]
    for order in ("seeded", "shared"):
        ordered = {**cur, "optim": {**cur["optim"], "batch_order": order}}
        for k in seeds:
            r = parallel.batched(parse_curriculum(ordered), device, k, epochs)
            lines.append(f"| {k} | {order} | {r['batched_s']:.2f} | {r['sequential_s']:.2f} | {r['tok_s']:,.0f} "
                         f"| {r['speedup']:.2f}x |")
            print(lines[-1], flush=True)
    return lines


def full_run(device: torch.device, epochs: int, baseline_epochs: int) -> list[str]:
    """One whole paper-configuration run of `epochs` epochs against the obvious loop's epochs.

    The target is put on a task the run never trains (copy), so the run cannot stop early at
    100% parity and the time is that of every epoch and evaluation. fp32, as the baseline."""
    data = CONFIGS[PAPER]
    cur = curriculum(data, epochs, "paper-full")
    cur["tasks"]["copy"] = {"kind": "copy"}
    cur["target"] = {"task": "copy", "accuracy": 1.0}
    cur["eval"]["every_epochs"] = 100
    sync(device)
    t = time.perf_counter()
    trainer = Trainer(parse_curriculum(cur), device)
    evaluations = list(trainer.run())
    ours = time.perf_counter() - t
    parity = evaluations[-1].metrics["acc/parity"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "paper.yaml"
        path.write_text(yaml.safe_dump(curriculum(data, baseline_epochs, "paper-baseline")))
        out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "baseline.py"), str(path), "--epochs",
                              str(baseline_epochs), "--warmup-epochs", "1", "--device", str(device)], check=True,
                             capture_output=True, text=True).stdout.strip()
    per_epoch = float(out.split("(")[1].split(" s/epoch")[0])
    return ["", f"## One full paper-configuration run on {device.type}", "",
            f"{epochs} epochs, fp32 on both sides.", "",
            "| trainer | wall s | speed-up |", "|---|---|---|",
            f"| obvious loop (`benchmarks/baseline.py`): {baseline_epochs} epochs measured after a warm-up one, "
            f"x {epochs} | {per_epoch * epochs:.0f} | 1.0x |",
            f"| iterhead `Trainer`, {len(evaluations)} evaluation{'s' * (len(evaluations) != 1)} included "
            f"| {ours:.0f} "
            f"| {per_epoch * epochs / ours:.1f}x |",
            "", f"Final parity accuracy of the full run: {parity:.3f}. Baseline detail: {out}."]


def chosen(spec: str | None) -> list[str]:
    """The CONFIGS keys that `spec` (comma-separated substrings) names; every one when it is empty."""
    if not spec:
        return list(CONFIGS)
    wanted = [w.strip() for w in spec.split(",") if w.strip()]
    missing = [w for w in wanted if not any(w in name for name in CONFIGS)]
    if missing:
        raise SystemExit(f"--configs: {', '.join(missing)} matches none of: {'; '.join(CONFIGS)}")
    return [name for name in CONFIGS if any(w in name for w in wanted)]


def chosen_devices(spec: str | None) -> list[torch.device]:
    """The devices `spec` (comma-separated cpu, cuda) names; the CPU and CUDA where present when empty.

    A GPU machine's lease is short: `--devices cuda` times its GPU without its CPU's tables."""
    present = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    wanted = [w.strip() for w in (spec or ",".join(present)).split(",") if w.strip()]
    missing = [w for w in wanted if w not in present]
    if missing or not wanted:
        raise SystemExit(f"--devices: {', '.join(missing) or 'none named'}; this machine has: {', '.join(present)}")
    return [torch.device(w) for w in present if w in wanted]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per configuration and precision")
    ap.add_argument("--configs", default=None,
                    help="comma-separated substrings of the configuration names to time (default: all)")
    ap.add_argument("--devices", default=None,
                    help="comma-separated devices to time, cpu and cuda (default: the CPU and CUDA where present)")
    ap.add_argument("--skip-process", action="store_true", help="skip the whole-process comparison")
    ap.add_argument("--only-process", action="store_true",
                    help="only the whole-process comparison (its section alone is rewritten)")
    ap.add_argument("--concurrent", default=None, help="trial process counts (default: 1,2 on CPU, 1,2,4,8 on CUDA)")
    ap.add_argument("--seeds", default=None, help="batched seed counts (default: 1,2,4 on CPU, 1,4,8 on CUDA)")
    ap.add_argument("--several-epochs", type=int, default=3, help="timed epochs for the several-trainings tables")
    ap.add_argument("--full-epochs", type=int, default=1000, help="epochs of the full run (CUDA only; 0 skips)")
    ap.add_argument("--baseline-epochs", type=int, default=3, help="epochs the obvious loop is timed for")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    configs = chosen(args.configs)
    prepare_env()  # before the first training below, as in `iterhead train`
    devices = chosen_devices(args.devices)
    if args.only_process:
        return write([process_section(device) for device in devices], Path(args.out), devices)
    peaks = {(d.type, p): matmul_peak(d, DTYPES[p]) for d in devices for p in precisions(d)}
    measured = ", ".join(f"{d} {p} {v:.0f} GFLOP/s" for (d, p), v in peaks.items())
    print(f"matmul peaks: {measured}", flush=True)
    machine = f"{os.cpu_count()} CPUs ({cpu_model()}; native bf16: {'yes' if native_bf16(torch.device('cpu')) else 'no'})"
    if any(d.type == "cuda" for d in devices):
        machine += f", {torch.cuda.get_device_name()}"
    rows = throughput(devices, configs, args.epochs, peaks)
    sections = [["", "## Training throughput", "",
                 f"Written by `python {' '.join(sys.argv)}` on {time.strftime('%Y-%m-%d')}: {machine}, "
                 f"torch {torch.__version__}, torch threads: {torch.get_num_threads()}. {same_run(args)}", "",
                 "Analytic FLOPs (6 x non-embedding parameters x tokens + causal attention, the same count in "
                 "either precision). bf16 rows train on a bf16 copy of the model (`trainable/mixed.py`; weights "
                 "and optimiser in fp32); each "
                 "row's share is of the matmul peak of its own dtype, measured in the same run (best of three "
                 f"rounds of square 1024 and 2048 products, the same threads): {measured}. `vs fp32` is tokens / s "
                 "against the configuration's fp32 row. Evaluation as `Trainer.evaluate` runs it by default (accuracy in fp32, "
                 "and the probes); eval / epoch is against that row's epoch; the last column is the same "
                 "evaluation with `eval.precision: bf16` (bf16 products, the rows near a tie rescored in fp32: "
                 "`evaluate.screened_rows`). By default (precision auto) `iterhead train` "
                 f"trains in {defaults(devices)}.", "", *rows]]
    for device in devices:
        cuda = device.type == "cuda"
        counts = [int(v) for v in (args.concurrent or ("1,2,4,8" if cuda else "1,2")).split(",")]
        seeds = [int(v) for v in (args.seeds or ("1,4,8" if cuda else "1,2,4")).split(",")]
        sections.append(several(device, counts, seeds, args.several_epochs, peaks[device.type, "fp32"]))
        if cuda and args.full_epochs:
            sections.append(full_run(device, args.full_epochs, args.baseline_epochs))
            print("\n".join(sections[-1]), flush=True)
    if not torch.cuda.is_available():
        sections.append(["", "## GPU", "", "The sections whose headings name a GPU were written on a machine with "
                         "one (`python benchmarks/throughput.py --devices cuda`, `python benchmarks/step_profile.py`, "
                         "`python benchmarks/precision_width.py`); a run without CUDA writes no GPU figures and keeps "
                         "them."])
    for device in [] if args.skip_process else devices:
        sections.append(process_section(device))
    write(sections, Path(args.out), devices)


def same_run(args: argparse.Namespace) -> str:
    """Which of this machine kind's sections the run wrote: a skipped one keeps an earlier run's figures."""
    return ("This script's other sections for this machine kind come from the same run"
            + ("; the whole-process one did not run (`--skip-process`), so it is an earlier run's."
               if args.skip_process else "."))


def write(sections: list[list[str]], out: Path, devices: list[torch.device]) -> None:
    """Each section under its heading plus the machine kind (and the GPU's name where one was
    timed): a run replaces its own kind's only."""
    gpu = any(d.type == "cuda" for d in devices)
    kind = machine_kind() + (f" and {torch.cuda.get_device_name()}" if gpu else "")
    for lines in sections:
        at = next(i for i, line in enumerate(lines) if line.startswith("## "))
        if lines[at] != "## GPU":
            lines[at] += f": {kind}"
        replace_section(out, lines[at], lines)
    print(f"wrote {len(sections)} sections into {out}")


if __name__ == "__main__":
    main()
