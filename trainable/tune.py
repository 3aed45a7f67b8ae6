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

Replicates (a search with ``seeds:``): the trial is one configuration trained on every seed
in one schedule (`trainable.seeds.Seeds`). Each report carries the configuration's scores
over the seeds (`results.over_seeds`: the median ``compute_to_target`` with censored seeds
at the penalty, the median ``target_acc``, ``seeds_reached``, ``reached``) and each seed's
own report under ``seed_<s>/``; its checkpoint holds every seed. A seed that reaches the
target stops training; the trial ends when every seed has reached, been censored or
diverged, or when ASHA stops the configuration, which stops all its seeds at once.

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

from iterhead.curricula.trial import trial_curriculum
from iterhead.trainable import checkpoint, results
from iterhead.trainable.artifacts import ARTIFACTS, write_artifacts
from iterhead.trainable.devices import prepare_cuda_env, resolve_precision, trial_device
from iterhead.trainable.loop import Evaluation, Trainer
from iterhead.trainable.results import Report, over_seeds
from iterhead.trainable.seeds import Seeds
from iterhead.trainable.summary import censored_value

LAST_REPORT = "last_report.json"  # in each checkpoint: what was reported with it


def reached_within(trainer: Trainer, budget: float | None) -> bool:
    """Reached the target within the budget (the budget is checked at evaluations, so a
    trial can pass it before it is stopped; reaching the target past it does not count)."""
    o = trainer.outcome
    return o.reached and (budget is None or o.compute_to_target <= budget)


def seed_report(ev: Evaluation, trainer: Trainer, penalty: float, budget: float | None) -> Report:
    """One seed's evaluation and its running outcome: what a single-seed trial reports."""
    o, reached = trainer.outcome, reached_within(trainer, budget)
    return Report(step=ev.step, stage=ev.stage, reached=reached, diverged=o.diverged,
                  compute_to_target=o.compute_to_target if reached else penalty,
                  target_acc=ev.metrics.get(results.acc(trainer.cur.target.task), 0.0),  # none once diverged
                  metrics=dict(ev.metrics),
                  examples_to_target=float(o.examples_to_target) if reached else None,
                  seconds_to_target=float(o.seconds_to_target) if reached else None)


def configuration_report(step: int, stage: str, trainers: list[Trainer], penalty: float,
                         budget: float | None) -> Report:
    """A replicate trial's scores over its seeds (`trainable.results.over_seeds`)."""
    outcomes = [(reached_within(t, budget), t.outcome.compute_to_target) for t in trainers]
    target = results.acc(trainers[0].cur.target.task)
    accs = [t.history[-1].get(target, 0.0) if t.history and not t.outcome.diverged else 0.0 for t in trainers]
    score = over_seeds(outcomes, accs, penalty)
    metrics = {results.FLOPS: max(t.compute.flops for t in trainers)}  # ASHA's clock: it only grows
    return Report(step=step, stage=stage, reached=score.reached, diverged=all(t.outcome.diverged for t in trainers),
                  compute_to_target=score.compute_to_target, target_acc=score.target_acc, metrics=metrics,
                  seeds_reached=score.seeds_reached)


def train_trial(config: dict[str, Any], *, base: dict[str, Any], budget: float | None = None,
                penalty: float | None = None, smoke: bool = False, threads: int = 1,
                checkpoint_every_s: float = 30.0, seeds: list[int] | None = None, precision: str = "auto") -> None:
    """Train one trial of a search (module docstring).

    `penalty` is what a censored trial reports as compute_to_target; the driver passes one
    value for the whole search, so every censored trial ranks below every reached one.
    With `seeds`, the trial is one configuration trained on each seed (`trainable.seeds`).
    """
    prepare_cuda_env()  # before CUDA starts in this worker
    torch.set_num_threads(max(1, threads))
    cur = trial_curriculum(base, config, smoke)
    device = trial_device(ray.get_gpu_ids(), torch.cuda.is_available(), torch.cuda.device_count())
    precision = resolve_precision(precision, device)
    saved = tune.get_checkpoint()
    state, last_report = None, None
    if saved is not None:
        with saved.as_directory() as folder:
            state = checkpoint.load(folder, device)
            last_report = json.loads((Path(folder) / LAST_REPORT).read_text())
    if seeds is None:
        trainer = Trainer(cur, device, state, precision)
        trainers, rounds, state_dict = [trainer], ([(cur.seed, ev)] for ev in trainer.run()), trainer.state_dict
    else:
        group = Seeds(cur, seeds, device, precision, state=state)
        trainers, rounds, state_dict = group.trainers, group.run(), group.state_dict
    penalty = penalty if penalty is not None else censored_value(cur, budget)
    where = {results.NODE_ID: ray.get_runtime_context().get_node_id(),
             results.TORCH_THREADS: torch.get_num_threads(), results.DEVICE: str(device), results.PRECISION: precision}
    by_seed = {t.cur.seed: t for t in trainers}
    step = last_report[results.STEP] + 1 if last_report else 0  # a replicate trial counts its reports
    saved_at = time.monotonic()
    reported = False
    spent = budget is not None and max(t.compute.flops for t in trainers) >= budget  # restored past its budget
    for evaluations in [] if spent else rounds:
        reported = True
        if seeds is None:
            (_, ev), = evaluations
            report = seed_report(ev, trainer, penalty, budget)
        else:
            report = configuration_report(step, evaluations[0][1].stage, trainers, penalty, budget)
            for seed, ev in evaluations:
                own = seed_report(ev, by_seed[seed], penalty, budget).to_dict()
                report.metrics.update({results.per_seed(seed, k): v for k, v in own.items()})
        step += 1
        metrics = {**report.to_dict(), **where}
        over_budget = budget is not None and metrics[results.FLOPS] >= budget
        last = all(t.finished for t in trainers) or any(ev.final for _, ev in evaluations) or over_budget
        if not last and time.monotonic() - saved_at < checkpoint_every_s:
            tune.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as folder:
            checkpoint.save(state_dict(), folder)
            (Path(folder) / LAST_REPORT).write_text(json.dumps(metrics))
            for t in trainers:  # a trial ASHA stops keeps those of its latest checkpoint
                write_artifacts(t, Path(folder) / ARTIFACTS / (f"seed_{t.cur.seed}" if seeds else ""))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        saved_at = time.monotonic()
        if over_budget:
            return
    if not reported and last_report is not None:
        tune.report(last_report)
