"""Eager training against `torch.compile`: whether compiling the model pays on this machine.

Trains a few epochs of one configuration through the real `Trainer.train_epoch`, alternating
fresh eager and compiled trainers (eager, compiled, eager, compiled), and prints, for each: the
first epoch's seconds (a compiled trainer's includes compiling), the median of the later
epochs, the recompilations dynamo gave up on, and the summed training loss over the epochs, so
that differing numbers (from the compiled kernels' other summation orders, or from run to run)
show. The compiled model is `torch.compile(model, dynamic=True)` (batches come in many lengths
and sizes), with the embedding-dropout mask drawn outside it from the trainer's own generator
(a `torch.Generator` argument would break the graph there; the masks are the eager ones).
Inductor's CPU backend needs a C compiler: the script says so if there is none. Compiling
starts from an empty inductor cache of the script's own (`TORCHINDUCTOR_CACHE_DIR`), so the
first compiled trainer's first epoch compiles every kernel; torch keeps its precompiled C++
headers in `/tmp/torchinductor_<user>` whatever that variable says, so where an earlier
compile left them there, a fresh machine pays more than the table shows. The second
compiled trainer reuses what the first compiled in this process.

Writes (or replaces) its own section of BENCHMARKS.md with the command, the CPU model and the
load average.

    python benchmarks/compile.py [--epochs 3] [--max-len 12] [--batch 64] [--threads 2]
                                 [--precision fp32|bf16] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="iterhead-bench-inductor-")  # cold, before torch
import torch  # noqa: E402

from iterhead.curricula.io import parse_curriculum  # noqa: E402
from iterhead.trainable.devices import native_bf16  # noqa: E402
from iterhead.trainable.loop import Trainer  # noqa: E402
from iterhead.trainable.mixed import Bf16Copy  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import configs  # noqa: E402
import markdown  # noqa: E402
import parallel  # noqa: E402

HEADING = "## torch.compile against eager training"


class GaveUp(logging.Handler):
    """Counts dynamo's "hit config.recompile_limit" warnings: frames it stopped compiling (and
    runs eagerly from then on)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "hit config." in record.getMessage()


GAVE_UP = GaveUp()
logging.getLogger("torch._dynamo").addHandler(GAVE_UP)


class MaskOutside(torch.nn.Module):
    """The compiled model, called with an explicit keep mask drawn as the eager forward draws it."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.inner = model
        self.compiled = torch.compile(model, dynamic=True)

    def forward(self, tokens: torch.Tensor, q_start: int = 0, generator: torch.Generator | None = None):
        shape = (*tokens.shape, self.inner.spec.d_model)
        keep = torch.rand(shape, generator=generator, device=tokens.device) >= self.inner.spec.dropout
        return self.compiled(tokens, q_start, keep=keep)


def one(cur, mode: str, epochs: int, precision: str) -> dict:
    """A fresh trainer's `epochs` epochs through `parallel.Epochs`: its warm-up epoch (which
    compiles) timed whole, the later ones as laps. In bf16 the compiled model is the copy that
    takes the steps (the trainer keeps it across epochs); the fp32 weights stay eager."""
    trainer = Trainer(cur, "cpu", precision=precision)
    if mode == "compiled" and precision == "bf16":
        trainer._bf16 = Bf16Copy(trainer.model)
        trainer._bf16.model = MaskOutside(trainer._bf16.model)
    elif mode == "compiled":
        trainer.model = MaskOutside(trainer.model)
    before = GAVE_UP.count
    start = time.perf_counter()
    clock = parallel.Epochs(trainer)
    first = time.perf_counter() - start
    later = [clock.lap().seconds for _ in range(epochs - 1)]
    return {"mode": mode, "first": first, "later": statistics.median(later), "loss": clock.loss,
            "gave_up": GAVE_UP.count - before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-len", type=int, default=12)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "BENCHMARKS.md")
    args = ap.parse_args()
    try:
        run(args)
    finally:
        shutil.rmtree(os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


def run(args: argparse.Namespace) -> None:
    if args.epochs < 2:
        raise SystemExit("--epochs: at least 2 (the first one compiles; the later ones are timed)")
    if shutil.which(os.environ.get("CXX", "g++")) is None and shutil.which("cc") is None:
        raise SystemExit("torch.compile's CPU backend needs a C++ compiler (g++ or $CXX); none found")
    if args.precision == "bf16" and not native_bf16(torch.device("cpu")):
        raise SystemExit("--precision bf16: this CPU has no native bf16 (AMX or AVX-512 bf16), so its bf16 is emulated")
    torch.set_num_threads(args.threads)
    data = {"min_len": 1, "max_len": args.max_len, "train_per_len": 1024, "test_per_len": 256}
    raw = configs.curriculum(data, args.epochs)
    raw["optim"] = {"lr": 1.0e-3, "batch_size": args.batch}
    cur = parse_curriculum(raw, file="benchmark")
    rows = [one(cur, mode, args.epochs, args.precision) for mode in ("eager", "compiled", "eager", "compiled")]
    eager = statistics.median(r["later"] for r in rows if r["mode"] == "eager")
    # the fp32 section keeps its heading; a bf16 one is per size and machine kind (bf16 units differ by kind)
    heading = HEADING if args.precision == "fp32" else (
        f"{HEADING}, bf16 steps, lengths 1..{args.max_len}, batch {args.batch}: {markdown.machine_kind()}")
    steps = "fp32" if args.precision == "fp32" else "bf16 steps on a bf16 copy (the compiled model), fp32 weights"
    lines = [heading, "",
             f"`python benchmarks/compile.py --epochs {args.epochs} --max-len {args.max_len} --batch {args.batch} "
             f"--threads {args.threads}{'' if args.precision == 'fp32' else ' --precision bf16'}` on "
             f"{markdown.cpu_model()} ({os.cpu_count()} cores), torch "
             f"{torch.__version__}, load average {os.getloadavg()[0]:.2f} at the end. Lengths 1..{args.max_len}, "
             f"1024 training sequences per length, d_model 128, 2 layers, batch {args.batch}, dropout 0.1, "
             f"{steps}. "
             "Fresh trainers in turn; a compiled one's first epoch includes compiling (the first from an empty "
             "inductor cache; torch's precompiled headers may have been there already, so a fresh machine "
             "can pay more); the summed loss is over all its epochs (equal values: the same numbers).", "",
             "| run | first epoch s | later epochs s (median) | speed-up | recompilations given up | summed loss |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['first']:.1f} | {r['later']:.2f} | {eager / r['later']:.2f}x "
                     f"| {r['gave_up']} | {r['loss']:.6f} |")
    print("\n".join(lines))
    markdown.replace_section(args.out, heading, lines)


if __name__ == "__main__":
    main()
