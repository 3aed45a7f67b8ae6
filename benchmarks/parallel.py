"""Several trainings on one device: N concurrent trials, and K seeds batched into one model.

Helpers for `throughput.py`. Each times training epochs only, after one warm-up epoch, and
counts tokens and FLOPs with the trainers' own analytic counters (padding never counted):

- `concurrent`: N processes, each one `Trainer` on the device (as N Tune trials sharing a
  GPU would be), released together at a barrier; the aggregate rate is all their tokens
  over the span from the first start to the last end.
- `batched`: K seeds stacked in one model (`Seeds`, engine `stacked`), against the same K seeds trained one after another
  by `Trainer`, in this process.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from typing import Any

import torch

from iterhead.curricula.io import parse_curriculum
from iterhead.curricula.schema import Curriculum
from iterhead.trainable.loop import Trainer
from iterhead.trainable.seeds import Seeds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_epochs(trainer: Trainer, epochs: int, barrier: Any = None) -> dict[str, float]:
    """Train the first stage's epochs 1..`epochs` after a warm-up epoch 0; tokens, FLOPs, times."""
    stage = trainer.cur.stages[0]
    trainer.start_stage(stage)
    trainer.train_epoch(*trainer.epoch_plan(stage, 0))
    sync(trainer.device)
    if barrier is not None:
        barrier.wait()
    tokens, flops = trainer.compute.tokens, trainer.compute.flops
    t0 = time.time()
    for epoch in range(1, epochs + 1):
        plan, g = trainer.epoch_plan(stage, epoch)
        trainer.train_epoch(plan, g)
        trainer.count(plan)
    sync(trainer.device)
    return {"tokens": trainer.compute.tokens - tokens, "flops": trainer.compute.flops - flops,
            "start": t0, "end": time.time()}


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
    batch = Seeds(cur, seeds, device, engine="stacked")
    stage, engine, runs = cur.stages[0], batch.engine, batch.trainers
    engine.start_stage(stage, runs)
    engine.train_epoch(runs, [t.epoch_plan(stage, 0) for t in runs])
    sync(device)
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        plans = [t.epoch_plan(stage, epoch) for t in runs]
        engine.train_epoch(runs, plans)
        for t, (plan, _) in zip(batch.trainers, plans):
            t.count(plan)
    sync(device)
    together = time.perf_counter() - t0
    tokens = sum(t.compute.tokens for t in batch.trainers)
    apart = 0.0
    for seed in seeds:
        r = timed_epochs(Trainer(cur.model_copy(update={"seed": seed}), device), epochs)
        apart += r["end"] - r["start"]
    return {"batched_s": together, "sequential_s": apart, "tok_s": tokens / together,
            "speedup": apart / together}
