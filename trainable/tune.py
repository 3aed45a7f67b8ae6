"""The Ray Tune function trainable: a thin adapter over `Trainer` (the only file importing ray).

Per evaluation it reports the metrics with cumulative compute, the running
``compute_to_target`` (the search's censoring penalty until the target is reached) and
``target_acc`` for the scheduler. Checkpoints hold the whole trainer state, so a trial that
fails or is restored continues exactly where it stood; they are written at most every
`checkpoint_every_s` seconds (each one makes Tune snapshot its experiment state) and at the
last evaluation. Each checkpoint also carries the trial's artifacts (curriculum YAML,
attention maps, accuracy-against-compute plot) for the driver to log, so a trial that ASHA
stops early keeps those of its latest checkpoint. A trial ends when the target is reached,
its compute passes the budget (censored), or its last stage ends. A trial restored after
it had finished (its end not yet in Tune's state) reports its last result again.

Device: the GPU Ray assigned the trial (``ray.get_gpu_ids()``), else the CPU, never a GPU
outside Ray's accounting (`devices.trial_device`).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from iterhead.curricula.io import parse_curriculum
from iterhead.curricula.overrides import apply
from iterhead.trainable import checkpoint
from iterhead.trainable.artifacts import ARTIFACTS, write_artifacts
from iterhead.trainable.devices import prepare_cuda_env, trial_device
from iterhead.trainable.loop import Evaluation, Trainer
from iterhead.trainable.summary import censored_value

LAST_REPORT = "last_report.json"  # in each checkpoint: what was reported with it
SMOKE = {"max_len": 4, "train_per_len": 64, "test_per_len": 32, "epochs": 2}


def shrink(data: dict[str, Any]) -> dict[str, Any]:
    """A smoke-size copy of a curriculum mapping: short lengths, few rows, two epochs a stage."""
    d = data["data"]
    d["max_len"] = min(d["max_len"], max(d["min_len"], SMOKE["max_len"]))
    d["train_per_len"] = min(d["train_per_len"], SMOKE["train_per_len"])
    d["test_per_len"] = min(d["test_per_len"], SMOKE["test_per_len"])
    for stage in data["stages"]:
        stage["epochs"] = min(stage["epochs"], SMOKE["epochs"])
    data["eval"]["every_epochs"] = 1
    return data


def trial_curriculum(base: dict[str, Any], config: dict[str, Any], smoke: bool):
    """The curriculum one trial trains: the base with the sampled values (and smoke size)."""
    data = apply(base, config)
    return parse_curriculum(shrink(data) if smoke else data, file="trial")


def reached_within(trainer: Trainer, budget: float | None) -> bool:
    """Reached the target within the budget (the budget is checked at evaluations, so a
    trial can pass it before it is stopped; reaching the target past it does not count)."""
    o = trainer.outcome
    return o.reached and (budget is None or o.compute_to_target <= budget)


def trial_metrics(ev: Evaluation, trainer: Trainer, penalty: float, node_id: str,
                  budget: float | None) -> dict[str, Any]:
    """What one evaluation reports: its metrics, the running outcome, where it ran."""
    out: dict[str, Any] = dict(ev.metrics)
    reached = reached_within(trainer, budget)
    out["step"] = ev.step
    out["target_acc"] = ev.metrics.get(f"acc/{trainer.cur.target.task}", 0.0)  # none once diverged
    out["reached"] = float(reached)
    out["diverged"] = float(trainer.outcome.diverged)
    out["compute_to_target"] = trainer.outcome.compute_to_target if reached else penalty
    if reached:
        out["examples_to_target"] = float(trainer.outcome.examples_to_target)
        out["seconds_to_target"] = float(trainer.outcome.seconds_to_target)
    out["node_id"] = node_id
    out["torch_threads"] = torch.get_num_threads()
    out["device"] = str(trainer.device)
    out["stage"] = ev.stage
    return out


def train_trial(config: dict[str, Any], *, base: dict[str, Any], budget: float | None = None,
                penalty: float | None = None, smoke: bool = False, threads: int = 1,
                checkpoint_every_s: float = 30.0) -> None:
    """Train one trial of a search (module docstring).

    `penalty` is what a censored trial reports as compute_to_target; the driver passes one
    value for the whole search, so every censored trial ranks below every reached one.
    """
    prepare_cuda_env()  # before CUDA starts in this worker
    torch.set_num_threads(max(1, threads))
    cur = trial_curriculum(base, config, smoke)
    device = trial_device(ray.get_gpu_ids(), torch.cuda.is_available(), torch.cuda.device_count())
    saved = tune.get_checkpoint()
    state, last_report = None, None
    if saved is not None:
        with saved.as_directory() as folder:
            state = checkpoint.load(folder, device)
            last_report = json.loads((Path(folder) / LAST_REPORT).read_text())
    trainer = Trainer(cur, device, state)
    penalty = penalty if penalty is not None else censored_value(cur, budget)
    node_id = ray.get_runtime_context().get_node_id()
    saved_at = time.monotonic()
    reported = False
    spent = budget is not None and trainer.compute.flops >= budget  # restored past its budget
    for ev in [] if spent else trainer.run():
        reported = True
        metrics = trial_metrics(ev, trainer, penalty, node_id, budget)
        over_budget = budget is not None and metrics["compute/flops"] >= budget
        last = ev.final or over_budget
        if not last and time.monotonic() - saved_at < checkpoint_every_s:
            tune.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as folder:
            checkpoint.save(trainer.state_dict(), folder)
            (Path(folder) / LAST_REPORT).write_text(json.dumps(metrics))
            write_artifacts(trainer, Path(folder) / ARTIFACTS)  # a trial ASHA stops keeps its latest
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        saved_at = time.monotonic()
        if over_budget:
            return
    if not reported and last_report is not None:
        tune.report(last_report)
