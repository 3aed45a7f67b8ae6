"""`iterhead train`: one curriculum, one MLflow run, a summary on the terminal."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

import torch

from iterhead.curricula.io import flatten
from iterhead.curricula.schema import Curriculum
from iterhead.search.tracking import Heartbeat, RunWriter, ui_hint
from iterhead.trainable.artifacts import write_artifacts
from iterhead.trainable.loop import Evaluation, Trainer
from iterhead.trainable.summary import summary_metrics


def progress_line(ev: Evaluation) -> str:
    m = ev.metrics
    if ev.diverged:
        return (f"[{ev.stage} epoch {ev.epoch:4d}] DIVERGED: the training loss became NaN or infinite; "
                f"stopped after {m['compute/flops']:.3e} FLOP (lower the learning rate)")
    accs = "  ".join(f"{k[4:]} {v:6.1%}" for k, v in m.items() if k.startswith("acc/") and k.count("/") == 1)
    mark = "  <- target reached" if ev.reached else ""
    return (f"[{ev.stage} epoch {ev.epoch:4d}] {accs}  loss {m['loss/train']:.4f}  "
            f"{m['compute/flops']:.3e} FLOP  {m['compute/seconds']:7.1f} s{mark}")


def train(cur: Curriculum, *, uri: str, experiment: str, device: torch.device,
          source: str = "", out: TextIO | None = None) -> dict[str, float]:
    """Train `cur`, logging one run to `uri`; returns the summary metrics."""
    out = out or sys.stdout
    started = time.perf_counter()
    writer = RunWriter(uri)
    tags = {"iterhead.curriculum": cur.name, "iterhead.source": source, "iterhead.device": str(device),
            "iterhead.torch_threads": str(torch.get_num_threads())}
    run = writer.submit(writer.create_run, experiment, cur.name, tags, flatten(cur))
    heartbeat = Heartbeat(writer, run)
    status = "FAILED"
    try:
        trainer = Trainer(cur, device)
        print(f"training {cur.name!r} on {device} ({trainer.n_params:,} non-embedding parameters)", file=out)
        last: Evaluation | None = None
        for ev in trainer.run():
            last = ev
            writer.submit(lambda ev=ev: writer.log_metrics(run.result(), ev.metrics, ev.step))
            print(progress_line(ev), file=out, flush=True)
        summary = summary_metrics(cur, trainer.outcome)
        summary.update({f"final/{k}": v for k, v in last.metrics.items()
                        if k.startswith("acc/") and k.count("/") == 1} if last else {})
        writer.submit(lambda: writer.log_metrics(run.result(), summary, trainer.outcome.evaluations))
        with tempfile.TemporaryDirectory() as tmp:
            for path in write_artifacts(trainer, Path(tmp)):
                writer.submit(lambda p=path: writer.log_artifact(run.result(), p))
            writer.flush()
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        heartbeat.stop()

        def end() -> None:  # runs after the run's creation: the writer is ordered
            if run.exception() is None:
                writer.end_run(run.result(), status)
        writer.submit(end, check=False)  # an earlier write error must not hide the first error
        writer.close()
    reached = "reached" if summary["reached"] else ("DIVERGED before reaching" if trainer.outcome.diverged
                                                    else "did NOT reach")
    print(f"\n{cur.name}: {reached} {cur.target.task} accuracy {cur.target.accuracy:g} "
          f"after {trainer.compute.examples:,} examples, {trainer.compute.flops:.3e} training FLOP, "
          f"{trainer.compute.seconds:.1f} s training ({time.perf_counter() - started:.1f} s in all)", file=out)
    print(f"compute_to_target = {summary['compute_to_target']:.4e}"
          + ("" if summary["reached"] else " (censored: the documented penalty)"), file=out)
    print(f"MLflow run {run.result()} in experiment {experiment!r}; to look: {ui_hint(uri)}", file=out)
    return summary

