"""K seeds per trial against the same seeds as separate trials: the numbers `choose_engine` follows.

For K in `--seeds` and each engine of `trainable/seeds.py` (`lockstep`: each seed's own model
in turn; `stacked`: one vmapped model, with both `optim.batch_order`s, since `seeded` pads each
step to the longest of the K batches and `shared` does not), times a few epochs of K seeds
through a real `Seeds` object (its engine's `start_stage` and `train_epoch`, one untimed
warm-up epoch), against the same K seeds trained one after another as separate `Trainer`s.
One separate baseline serves both orders: a single seed's epoch has the same batch shapes in
either order, only shuffled. The timing is `parallel.Epochs`, the one copy of it.

Two configurations: `small` (lengths 1..8, 1024 per length, d_model 128, batch 256, dropout
0.1: the one `throughput.py`'s several-trainings tables use) and `trial` (the first stage of
`examples/poly_then_parity_small.yaml`: lengths 1..4, d_model 64, batch 64, the size a CPU
search trains, where per-step overheads weigh more). Runs on the CPU and, where present, CUDA.

All trainings of one K are warmed up, then take their timed epochs in turn (the order
rotating each epoch), and each figure is the median epoch, because a shared machine's load
moves between epochs. Writes (or replaces) its own section of BENCHMARKS.md, with the
command, the CPU model and the load average.

    python benchmarks/seeds.py [--seeds 1,3,8] [--epochs 3] [--trial-epochs 5]
        [--configs trial,small] [--threads N] [--out BENCHMARKS.md]

On a CPU another process also keeps busy, torch's default of one thread per core can be many
times slower than one thread (seen here: 40 s against 2.4 s an epoch of `small`, 2 threads
against 1, with one other process running), which swamps any engine difference: pass
`--threads 1` there (a search trial with `resources.cpu: 1` trains with one thread too).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from iterhead.curricula.io import load_curriculum, parse_curriculum
from iterhead.curricula.schema import Curriculum
from iterhead.trainable.devices import prepare_env
from iterhead.trainable.loop import Trainer
from iterhead.trainable.seeds import Seeds, choose_engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
import configs  # noqa: E402
import parallel  # noqa: E402  (beside this script)
from markdown import replace_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## K seeds per trial against separate trials"
VARIANTS = (("lockstep", "seeded"), ("stacked", "seeded"), ("stacked", "shared"))  # (engine, batch order)


def configurations(epochs: int, trial_epochs: int) -> dict[str, tuple[str, Curriculum, int]]:
    """name -> (description, curriculum whose first stage is timed, timed epochs)."""
    small = parse_curriculum(configs.curriculum(configs.CONFIGS[configs.SMALL], epochs + 1))
    trial = load_curriculum(ROOT / "examples" / "poly_then_parity_small.yaml")
    return {
        "trial": ("search trial: `examples/poly_then_parity_small.yaml` pretrain stage (L 1..4, 256/len, d64, "
                  "batch 64, no dropout)", trial, trial_epochs),
        "small": ("small: L 1..8, 1024/len, d128, batch 256, dropout 0.1 (as in `throughput.py`)", small, epochs),
    }


def with_order(cur: Curriculum, order: str) -> Curriculum:
    return cur.model_copy(update={"optim": cur.optim.model_copy(update={"batch_order": order})})


def measure(cur: Curriculum, device: torch.device, k: int, epochs: int) -> dict[tuple[str, str], dict[str, float]]:
    """Per (engine, order), and ("separate", "seeded"): wall seconds of the timed epochs, the
    median epoch's seconds and tokens per epoch, for K seeds.

    All trainings are built and warmed up first, then take their timed epochs in turn, the
    order rotating each epoch, so a change in the machine's load falls on every one of them
    alike. An epoch of the separate trials is the K `Trainer`s' epochs back to back."""
    seeds = list(range(k))
    clocks = {("separate", "seeded"): [parallel.Epochs(Trainer(cur.model_copy(update={"seed": s}), device))
                                       for s in seeds]}
    for engine, order in VARIANTS:
        clocks[engine, order] = [parallel.Epochs(Seeds(with_order(cur, order), seeds, device, engine=engine))]
    laps: dict[tuple[str, str], list[tuple[float, float, int]]] = {name: [] for name in clocks}
    names = list(clocks)
    for epoch in range(epochs):
        for name in names[epoch % len(names):] + names[:epoch % len(names)]:
            each = [c.lap() for c in clocks[name]]
            laps[name].append((sum(l.seconds for l in each), sum(l.cpu_seconds for l in each),
                               sum(l.tokens for l in each)))
    return {name: {"wall_s": sum(t for t, _, _ in runs), "epoch_s": statistics.median(t for t, _, _ in runs),
                   "cpu_s": statistics.median(c for _, c, _ in runs),
                   "epoch_tokens": statistics.mean(n for _, _, n in runs)} for name, runs in laps.items()}


def cpu_name() -> str:
    """lscpu's model name, family and model, and whether the bf16 / AMX matmul units are there."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}
    flags = set(info.get("Flags", "").split())
    units = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx512_bf16", "amx_tile"))
    return (f"{info.get('Model name', platform.machine())} (family {info.get('CPU family', '?')}, "
            f"model {info.get('Model', '?')}; {units})")


def table(device: torch.device, k: int, rows: dict[tuple[str, str], dict[str, float]]) -> list[str]:
    base, cpu = rows["separate", "seeded"]["epoch_s"], rows["separate", "seeded"]["cpu_s"]
    lines = []
    for (engine, order), r in rows.items():
        name = "separate trials" if engine == "separate" else engine
        lines.append(f"| {device.type} | {k} | {name} | {order} | {r['wall_s']:.2f} | {r['epoch_s']:.3f} "
                     f"| {r['epoch_tokens'] / r['epoch_s']:,.0f} | {base / r['epoch_s']:.2f}x | {r['cpu_s']:.3f} "
                     f"| {cpu / r['cpu_s']:.2f}x |")
    return lines


def verdict(device: torch.device, k: int, rows: dict[tuple[str, str], dict[str, float]]) -> str:
    """Whether `choose_engine("auto")` picks the faster engine at the default batch order."""
    auto = choose_engine("auto", device, k)
    fast = min(("lockstep", "stacked"), key=lambda e: rows[e, "seeded"]["epoch_s"])
    shared = rows["lockstep", "seeded"]["epoch_s"] / rows["stacked", "shared"]["epoch_s"]
    return (f"{device.type}, K = {k}: auto picks {auto}; faster at the default order: {fast} "
            f"({'agrees' if auto == fast else 'DISAGREES'}); stacked with `shared` order runs at "
            f"{shared:.2f}x lockstep's speed.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="1,3,8", help="seed counts K per trial")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs of the small configuration")
    ap.add_argument("--trial-epochs", type=int, default=5, help="timed epochs of the search-trial configuration")
    ap.add_argument("--configs", default="trial,small", help="which configurations (trial, small)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (default: torch's own; a search trial gets its `resources.cpu`)")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    prepare_env()
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = [int(v) for v in args.seeds.split(",")]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    configs = configurations(args.epochs, args.trial_epochs)
    load0, t0 = os.getloadavg(), time.perf_counter()
    header = ["| device | K | engine | batch order | wall s | median s / epoch | tokens / s | vs separate "
              "| median CPU s / epoch | vs separate, CPU s |", "|---|---|---|---|---|---|---|---|---|---|"]
    body, verdicts = [], []
    for name in args.configs.split(","):
        description, cur, epochs = configs[name]
        body += ["", f"### {description}; {epochs} timed epochs", ""] + header
        print(body[-3], flush=True)
        for device in devices:
            for k in counts:
                load = os.getloadavg()[0]
                rows = measure(cur, device, k, epochs)
                body += table(device, k, rows)
                verdicts.append(f"- {name}, {verdict(device, k, rows)} (Load average {load:.1f} before this K.)")
                print("\n".join(body[-len(rows):] + verdicts[-1:]), flush=True)
    load1 = os.getloadavg()
    gpu = f"; CUDA: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "; no CUDA device was present"
    argv = " ".join(["benchmarks/seeds.py", *sys.argv[1:]])
    threads = torch.get_num_threads()
    lines = ["", HEADING, "",
             f"Written by `python {argv}` on {time.strftime('%Y-%m-%d')} in {time.perf_counter() - t0:.0f} s: "
             f"{os.cpu_count()} CPUs ({cpu_name()}), torch {torch.__version__}, torch threads: {threads}{gpu}. "
             f"Load average {load0[0]:.1f} at the start and {load1[0]:.1f} at the end (a shared machine: each "
             "figure is a median epoch, and the trainings of one K took their epochs in turn, the order rotating).",
             "",
             "K seeds of one curriculum in one `Seeds` schedule, per engine (`lockstep`: each seed's own model "
             "in turn; `stacked`: one vmapped model with stacked parameters), against the same K seeds trained "
             "one after another as separate `Trainer`s. Each run: one untimed warm-up epoch, then the timed "
             "ones; wall s is all timed epochs, median s / epoch the median epoch (for separate trials, the K "
             "seeds' epochs back to back), tokens / s (padding never counted) and `vs separate` (above 1 is "
             "faster) from the median epoch; the CPU columns are the same from this process's CPU seconds (all "
             "its threads: time spent waiting for a core another process holds is not in them, OpenMP threads "
             "spinning at a barrier are). Batch order `seeded` (the default) pads each stacked step to the "
             "longest of the K batches; `shared` gives every seed the same shapes (and so other batches than a "
             "separate run's)."]
    lines += body + ["", "`choose_engine(\"auto\", device, K)` against these numbers:", ""] + verdicts
    replace_section(Path(args.out), HEADING, lines)
    print("\n".join(lines[:4] + lines[-len(verdicts) - 2:]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
