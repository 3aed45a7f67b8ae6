"""Several trainings on one device: N concurrent trials, and K seeds batched into one model.

Helpers for `throughput.py`. Each times training epochs only, after one warm-up epoch, and
counts tokens and FLOPs with the trainers' own analytic counters (padding never counted):

- `concurrent`: N processes, each one `Trainer` on the device (as N Tune trials sharing a
  GPU would be), released together at a barrier; the aggregate rate is all their tokens
  over the span from the first start to the last end.
- `batched`: K seeds stacked in one model (`Seeds`, engine `stacked`), against the same K seeds trained one after another
  by `Trainer`, in this process.

The timing is written once, in `Epochs`: a training (one `Trainer`, or a `Seeds` object
through its engine, as `schedule.Schedule` drives either) warmed up by an untimed epoch 0, then
timed one epoch at a time, the clock read after a device synchronise (the real loop syncs
once an epoch too). `timed_epochs` and `timed_seeds` time consecutive epochs of one training;
a caller on a machine whose load moves can instead interleave several `Epochs` epoch by epoch
and take medians (`benchmarks/seeds.py`).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass
from typing import Any

import torch

from iterhead.curricula.io import parse_curriculum
from iterhead.curricula.schema import Curriculum
from iterhead.trainable.loop import Trainer
from iterhead.trainable.schedule import Engine, Lockstep
from iterhead.trainable.seeds import Seeds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Lap:
    """One timed epoch: wall seconds, this process's CPU seconds (all threads; without the time
    spent waiting for a core another process holds), and the tokens and analytic FLOPs it trained."""

    seconds: float
    cpu_seconds: float
    tokens: int
    flops: float


class Epochs:
    """The first stage of a training, warmed up by epoch 0 (untimed), then timed epoch by epoch.

    A `Trainer` is stepped through `Lockstep` with itself alone, exactly as its `run()` does;
    a `Seeds` object through its own engine, as `schedule.Schedule` calls it."""

    def __init__(self, run: Trainer | Seeds) -> None:
        self.runs = run.trainers if isinstance(run, Seeds) else [run]
        self.engine: Engine = run.engine if isinstance(run, Seeds) else Lockstep()
        self.device = self.runs[0].device
        self.stage = self.runs[0].cur.stages[0]
        self.epoch = 0
        self.losses: list[torch.Tensor] = []  # each epoch's summed batch losses, per run (on the device)
        self.engine.start_stage(self.stage, self.runs)
        self._step()
        sync(self.device)

    @property
    def loss(self) -> float:
        """The summed training loss of every epoch so far, warm-up included (one host sync)."""
        return sum(float(epoch.sum()) for epoch in self.losses)

    def _step(self) -> None:
        plans = [t.epoch_plan(self.stage, self.epoch) for t in self.runs]
        self.losses.append(self.engine.train_epoch(self.runs, plans))
        for t, (plan, _) in zip(self.runs, plans):
            t.count(plan)
        self.epoch += 1

    def lap(self) -> Lap:
        """Train the next epoch and time it."""
        tokens, flops = sum(t.compute.tokens for t in self.runs), sum(t.compute.flops for t in self.runs)
        t0, c0 = time.perf_counter(), time.process_time()
        self._step()
        sync(self.device)
        return Lap(time.perf_counter() - t0, time.process_time() - c0,
                   sum(t.compute.tokens for t in self.runs) - tokens, sum(t.compute.flops for t in self.runs) - flops)


def timed(clock: Epochs, epochs: int, barrier: Any = None) -> dict[str, Any]:
    """`epochs` consecutive timed epochs: tokens, FLOPs, start and end (wall clock, comparable
    across processes) and each epoch's seconds (`laps`)."""
    if barrier is not None:
        barrier.wait()
    t0 = time.time()
    laps = [clock.lap() for _ in range(epochs)]
    return {"tokens": sum(l.tokens for l in laps), "flops": sum(l.flops for l in laps), "start": t0,
            "end": time.time(), "laps": [l.seconds for l in laps]}


def timed_epochs(trainer: Trainer, epochs: int, barrier: Any = None) -> dict[str, Any]:
    """Train the first stage's epochs 1..`epochs` after a warm-up epoch 0; tokens, FLOPs, times."""
    return timed(Epochs(trainer), epochs, barrier)


def timed_seeds(batch: Seeds, epochs: int) -> dict[str, Any]:
    """`timed_epochs` for K seeds in one schedule, through the object's engine (lockstep or stacked)."""
    return timed(Epochs(batch), epochs)


def _trial(cur: dict, device: str, epochs: int, threads: int, barrier: Any, results: Any) -> None:
    torch.set_num_threads(threads)
    trainer = Trainer(parse_curriculum(cur, file="benchmark"), device)
    results.put(timed_epochs(trainer, epochs, barrier))


def concurrent(cur: dict, device: torch.device, n: int, epochs: int, threads: int) -> dict[str, float]:
    """Aggregate tokens/s and FLOP/s of `n` trial processes training together on `device`."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_trial, args=(cur, str(device), epochs, threads, barrier, results))
             for _ in range(n)]
    for p in procs:
        p.start()
    runs = [results.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"a benchmark trial process exited with {p.exitcode}")
    span = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    return {"tok_s": sum(r["tokens"] for r in runs) / span, "flop_s": sum(r["flops"] for r in runs) / span,
            "seconds": span}


def batched(cur: Curriculum, device: torch.device, k: int, epochs: int) -> dict[str, float]:
    """Seconds for `epochs` epochs of `k` seeds: batched in one model, and one after another."""
    seeds = list(range(k))
    r = timed_seeds(Seeds(cur, seeds, device, engine="stacked"), epochs)
    together = r["end"] - r["start"]
    apart = 0.0
    for seed in seeds:
        one = timed_epochs(Trainer(cur.model_copy(update={"seed": seed}), device), epochs)
        apart += one["end"] - one["start"]
    return {"batched_s": together, "sequential_s": apart, "tok_s": r["tokens"] / together,
            "speedup": apart / together}
