"""`iterhead train`: one curriculum, one MLflow run per seed, a summary on the terminal.

With ``--seeds`` the seeds train together in one schedule (`trainable/seeds.py`: lockstep on
CPUs, stacked on CUDA); each still gets its own run, the same as a single `iterhead train`
of that seed would write.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path
from typing import TextIO

import torch

from iterhead.curricula.io import flatten
from iterhead.curricula.schema import Curriculum
from iterhead.search.endpoints import first_answer
from iterhead.search.tracking import Heartbeat, RunWriter, begin_command, ui_hint
from iterhead.trainable import results as r
from iterhead.trainable.artifacts import write_artifacts
from iterhead.trainable.loop import Evaluation, Trainer
from iterhead.trainable.summary import summary_metrics


def progress_line(ev: Evaluation, prefix: str = "") -> str:
    m = ev.metrics
    where = f"[{prefix}{ev.stage} epoch {ev.epoch:4d}]"
    if ev.diverged:
        return (f"{where} DIVERGED: the training loss, the weights or the probes became NaN or infinite; "
                f"stopped after {m[r.FLOPS]:.3e} FLOP (lower the learning rate)")
    accs = "  ".join(f"{k[len(r.ACC_PREFIX):]} {v:6.1%}" for k, v in m.items()
                     if k.startswith(r.ACC_PREFIX) and k.count("/") == 1)
    accs += "".join(f"  (train {k[len(r.TRAIN_ACC_PREFIX):]} {v:6.1%})" for k, v in m.items()
                    if k.startswith(r.TRAIN_ACC_PREFIX) and k.count("/") == 1)
    mark = "  <- target reached" if ev.reached else ""
    return (f"{where} {accs}  loss {m[r.LOSS]:.4f}  "
            f"{m[r.FLOPS]:.3e} FLOP  {m[r.SECONDS]:7.1f} s{mark}")


class LoggedRun:
    """One trainer's MLflow run: created at once, then written in order through the writer."""

    def __init__(self, writer: RunWriter, cur: Curriculum, experiment: str, tags: dict[str, str],
                 name: str) -> None:
        self.writer, self.cur = writer, cur
        # unchecked: another run's failed creation is raised where its first answer is read, marked
        # (`first_answer`); raised here, unmarked, a URI naming no MLflow server exited 1, not 2
        self.run: Future = writer.submit(writer.create_run, experiment, name, tags, flatten(cur), check=False)
        self.heartbeat = Heartbeat(writer, self.run)
        self.last: Evaluation | None = None
        self.status = "FAILED"

    def log(self, ev: Evaluation) -> None:
        """Log `ev` stamped now, not when the background writer gets to it (seconds later while
        the store is slow), so MLflow's wall-time axis shows when each evaluation happened."""
        self.last = ev
        now_ms = int(time.time() * 1000)
        self.writer.submit(lambda: self.writer.log_metrics(self.run.result(), ev.metrics, ev.step, now_ms))

    def finish(self, trainer: Trainer, budget: float | None = None) -> dict[str, float]:
        """Log the summary metrics and the artifacts; returns the summary."""
        summary = summary_metrics(trainer.cur, trainer.outcome, budget)
        if self.last is not None:
            summary.update({r.FINAL_PREFIX + k: v for k, v in self.last.metrics.items()
                            if k.startswith(r.ACC_PREFIX) and k.count("/") == 1})
        self.writer.submit(lambda: self.writer.log_metrics(self.run.result(), summary, trainer.outcome.evaluations))
        with tempfile.TemporaryDirectory() as tmp:
            for path in write_artifacts(trainer, Path(tmp)):
                self.writer.submit(lambda p=path: self.writer.log_artifact(self.run.result(), p))
            self.writer.flush()
        self.status = "FINISHED"
        return summary

    def end(self) -> None:
        """Stop the heartbeat and end the run with `status` (FAILED unless `finish` ran)."""
        self.heartbeat.stop()
        status = self.status

        def end() -> None:  # runs after the run's creation: the writer is ordered
            if self.run.exception() is None:
                self.writer.end_run(self.run.result(), status)
        self.writer.submit(end, check=False)  # an earlier write error must not hide the first error


def run_tags(cur: Curriculum, source: str, device: torch.device, precision: str) -> dict[str, str]:
    return {r.CURRICULUM_TAG: cur.name, r.SOURCE_TAG: source, r.DEVICE_TAG: str(device),
            r.THREADS_TAG: str(torch.get_num_threads()), r.PRECISION_TAG: precision}


# The seconds of the summary line, as `benchmarks/whole_process.py` reads them from a whole process
SUMMARY_SECONDS = re.compile(r"([\d.]+) s training, ([\d.]+) s evaluating \(([\d.]+) s in all\)")


def print_summary(trainer: Trainer, summary: dict[str, float], seconds: float, run_id: str,
                  experiment: str, uri: str, out: TextIO) -> None:
    cur, outcome = trainer.cur, trainer.outcome
    reached = "reached" if summary[r.REACHED] else ("DIVERGED before reaching" if outcome.diverged
                                                    else "did NOT reach")
    lengths = "" if cur.target.min_len is None else f" (lengths {cur.target.min_len}+)"
    print(f"\n{cur.name} (seed {cur.seed}): {reached} {cur.target.task} accuracy {cur.target.accuracy:g}{lengths} "
          f"after {trainer.compute.examples:,} examples, {trainer.compute.flops:.3e} training FLOP, "
          f"{trainer.compute.seconds:.1f} s training, {trainer.compute.eval_seconds:.1f} s evaluating "
          f"({seconds:.1f} s in all)", file=out)
    print(f"compute_to_target = {summary[r.COMPUTE_TO_TARGET]:.4e}"
          + ("" if summary[r.REACHED] else " (censored: the documented penalty)"), file=out)
    print(f"MLflow run {run_id} in experiment {experiment!r}; to look: {ui_hint(uri)}", file=out)


def spent(budget: float | None, trainers: list[Trainer]) -> bool:
    """Whether training has reached the budget: a search trial stops there too."""
    return budget is not None and max(t.compute.flops for t in trainers) >= budget


def train(cur: Curriculum, *, uri: str, experiment: str, device: torch.device,
          source: str = "", precision: str = "fp32", budget: float | None = None,
          out: TextIO | None = None) -> dict[str, float]:
    """Train `cur`, logging one run to `uri`; returns the summary metrics.

    With a `budget` (FLOPs) training stops at the first evaluation at or past it and the run
    is censored as a search trial with that budget is, so a search's result re-trains
    exactly (`iterhead export` writes the budget into its command)."""
    out = out or sys.stdout
    started = time.perf_counter()
    begin_command()
    writer = RunWriter(uri)
    logged = LoggedRun(writer, cur, experiment, run_tags(cur, source, device, precision), cur.name)
    try:
        trainer = Trainer(cur, device, precision=precision)
        first_answer(logged.run)  # made meanwhile: a store or experiment that cannot take it fails first
        print(f"training {cur.name!r} on {device} in {precision} ({trainer.n_params:,} non-embedding parameters)",
              file=out)
        for ev in trainer.run():
            logged.log(ev)
            print(progress_line(ev), file=out, flush=True)
            if spent(budget, [trainer]):
                break
        summary = logged.finish(trainer, budget)
    except KeyboardInterrupt:
        logged.status = "KILLED"
        raise
    finally:
        logged.end()
        writer.close(stopping=logged.status == "KILLED")
    print_summary(trainer, summary, time.perf_counter() - started, logged.run.result(), experiment, uri, out)
    return summary


def train_seeds(cur: Curriculum, seeds: list[int], *, uri: str, experiment: str, device: torch.device,
                source: str = "", precision: str = "fp32", budget: float | None = None,
                out: TextIO | None = None) -> dict[int, dict[str, float]]:
    """Train `cur` once per seed in one schedule, one run per seed; summaries by seed."""
    from iterhead.trainable.seeds import Seeds, choose_engine

    out = out or sys.stdout
    started = time.perf_counter()
    begin_command()
    writer = RunWriter(uri)
    tags = {**run_tags(cur, source, device, precision), r.BATCHED_SEEDS_TAG: ",".join(map(str, seeds)),
            r.ENGINE_TAG: choose_engine("auto", device, len(seeds))}
    runs = {s: LoggedRun(writer, cur.model_copy(update={"seed": s}), experiment, tags, f"{cur.name}-seed{s}")
            for s in seeds}
    summaries: dict[int, dict[str, float]] = {}
    try:
        batch = Seeds(cur, seeds, device, precision)
        for logged in runs.values():  # made meanwhile: a store or experiment that cannot take them fails first
            first_answer(logged.run)
        print(f"training {cur.name!r} with seeds {seeds} ({batch.engine_name}) on {device} in {precision} "
              f"({batch.trainers[0].n_params:,} non-embedding parameters each)", file=out)
        for evaluations in batch.run():
            for seed, ev in evaluations:
                runs[seed].log(ev)
                print(progress_line(ev, f"seed {seed} "), file=out, flush=True)
            if spent(budget, batch.trainers):
                break
        for seed, trainer in zip(seeds, batch.trainers):
            summaries[seed] = runs[seed].finish(trainer, budget)
    except KeyboardInterrupt:
        for logged in runs.values():
            logged.status = "KILLED"
        raise
    finally:
        for logged in runs.values():
            logged.end()
        writer.close(stopping=any(logged.status == "KILLED" for logged in runs.values()))
    for seed, trainer in zip(seeds, batch.trainers):
        print_summary(trainer, summaries[seed], time.perf_counter() - started, runs[seed].run.result(),
                      experiment, uri, out)
    return summaries
