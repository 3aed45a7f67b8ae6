"""The schedule: the one training loop over a curriculum's stages, for K >= 1 seeds.

`Schedule` iterates stages and epochs, keeps the evaluation cadence, the target, divergence
and compute, and yields each evaluation; an `Engine` takes the optimiser steps (`Lockstep`
here: each seed's own model in turn; the stacked engine in `trainable/seeds.py`). A seed's
state (data, model, optimiser, compute, outcome, checkpoint) is a `loop.Trainer`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Protocol

import torch

from iterhead.curricula.sampler import EpochPlan
from iterhead.curricula.schema import Curriculum, StageSpec
from iterhead.trainable.compute import Stopwatch

if TYPE_CHECKING:
    from iterhead.trainable.loop import Evaluation, Trainer


def last_stage(cur: Curriculum) -> int:
    """Index of the last stage that trains at all; -1 where none does (a search trial whose
    drawn values give every stage epochs 0 trains nothing and is over at once)."""
    return max((i for i, s in enumerate(cur.stages) if s.epochs > 0), default=-1)


@dataclass
class Position:
    """Where training stands: the stage index and the epochs done in it."""

    stage: int = 0
    epoch: int = 0


class Engine(Protocol):
    """How the seeds of one schedule take their optimiser steps; the schedule does the rest.

    `Lockstep` steps each seed's own model in turn (K = 1 is one plain run); the stacked
    engine (`trainable/seeds.py`) steps K seeds as one vmapped model. Both leave every
    seed's `Trainer` holding its weights (after `sync`) and its compute, outcome and history.
    """

    def start_stage(self, stage: StageSpec, runs: list[Trainer]) -> None: ...

    def train_epoch(self, runs: list[Trainer], plans: list[tuple[EpochPlan, torch.Generator]]) -> torch.Tensor:
        """One epoch's steps for `runs`; their summed batch losses, shape [len(runs)], on the device."""

    def leave(self, runs: list[Trainer], keep: list[Trainer]) -> None:
        """The seeds not in `keep` are done (reached or diverged): stop training them."""

    def sync(self, run: Trainer) -> None:
        """Make `run.model` hold the seed's current weights (before evaluating or saving it)."""

    def seed_state(self, run: Trainer) -> dict[str, Any]:
        """The seed's whole state, as `Trainer.state_dict` gives it for a single run."""


class Lockstep:
    """Each seed's own model and optimiser, stepped through the epoch one seed after another.

    The numbers are exactly those of K separate runs (the same operations on the same
    tensors); on a CPU, which one seed keeps busy, it is also the fastest way (BENCHMARKS.md).
    """

    def start_stage(self, stage: StageSpec, runs: list[Trainer]) -> None:
        for run in runs:
            run.start_stage(stage)

    def train_epoch(self, runs: list[Trainer], plans: list[tuple[EpochPlan, torch.Generator]]) -> torch.Tensor:
        return torch.stack([run.train_epoch(plan, g) for run, (plan, g) in zip(runs, plans)])

    def leave(self, runs: list[Trainer], keep: list[Trainer]) -> None:
        """Nothing to do: a seed that left is simply not stepped again."""

    def sync(self, run: Trainer) -> None:
        """Nothing to do: each seed trains its own model."""

    def seed_state(self, run: Trainer) -> dict[str, Any]:
        return run.state_dict()


class Schedule:
    """The one training loop: stages, epochs, evaluation cadence, target, divergence, compute.

    It trains K >= 1 seeds of one curriculum in lockstep, epoch by epoch, through `engine`,
    and yields at each evaluation point the (seed, `Evaluation`) of every seed evaluated
    (or diverged) there. A seed that reaches the target or diverges leaves; the others go
    on. Seeds resumed from checkpoints stand at the same position (they were saved together).
    Time is shared: each seed's ``compute/seconds`` is the wall time of the epochs it was in.
    Shared stages (`StageSpec.seed`) are trained once, by `shared_lead`, and every seed then
    holds a copy of that run's state and reports its evaluations, compute included.
    """

    def __init__(self, runs: list[Trainer], engine: Engine) -> None:
        shared = runs[0].cur.model_copy(update={"seed": 0})
        if any(r.cur.model_copy(update={"seed": 0}) != shared for r in runs):
            raise ValueError("the seeds of one schedule must share one curriculum")
        if len({r.cur.seed for r in runs}) != len(runs):
            raise ValueError(f"seeds must be distinct, got {[r.cur.seed for r in runs]}")
        self.runs, self.engine = runs, engine

    def run(self) -> Iterator[list[tuple[int, Evaluation]]]:
        runs = [r for r in self.runs if not r.finished]
        if not runs:
            return
        cur, device = runs[0].cur, runs[0].device
        lead = shared_lead(runs)
        for r in {*runs, *([lead] if lead else [])}:
            r.model.train()
        watch = Stopwatch()
        for index, stage in enumerate(cur.stages):
            if index < runs[0].position.stage or stage.epochs == 0:
                continue
            shared = lead is not None and index < cur.shared_stages()
            group, engine = ([lead], Lockstep()) if shared else (runs, self.engine)
            for r in group:
                r.enter_stage(index)
            engine.start_stage(stage, group)
            loss_sum = torch.zeros(len(group), device=device)
            n_batches = [0] * len(group)
            watch.start()
            while group[0].position.epoch < stage.epochs:
                plans = [r.epoch_plan(stage, r.position.epoch) for r in group]
                losses = engine.train_epoch(group, plans)
                loss_sum += losses
                for i, (r, (plan, _)) in enumerate(zip(group, plans)):
                    n_batches[i] += len(plan.bounds) - 1
                    r.count(plan)
                    r.position.epoch += 1
                    if stage.seed is not None:
                        r.compute.flops_shared = r.compute.flops
                finite = torch.isfinite(losses).tolist()  # the one host sync per epoch
                ends = group[0].evaluates_after(stage)
                if all(finite) and not ends:
                    continue
                seconds = watch.stop()
                sums = loss_sum.tolist()  # the one host sync per evaluation
                last = index == last_stage(cur) and group[0].position.epoch == stage.epochs
                out = []
                for i, r in enumerate(group):
                    r.compute.seconds += seconds
                    if finite[i] and ends:
                        engine.sync(r)
                        finite[i] = r.weights_finite()  # the epoch's last step may have left NaN weights
                    if not finite[i]:
                        out.append((r.cur.seed, r.diverged(stage.name)))
                    elif ends:
                        out.append((r.cur.seed, r.evaluate(stage.name, sums[i] / max(n_batches[i], 1), last)))
                if shared:  # every seed stands where the lead does, with its evaluation
                    copy_lead(lead, runs)
                    out = [(r.cur.seed, out[0][1]) for r in runs]
                yield out
                keep = [i for i, r in enumerate(runs) if not r.finished]
                if not keep:
                    return
                if len(keep) < len(runs):  # never in a shared stage: its seeds end together
                    self.engine.leave(runs, [runs[i] for i in keep])
                    runs, loss_sum = [runs[i] for i in keep], loss_sum[keep]
                    group = runs
                    n_batches = [n_batches[i] for i in keep]
                if ends:
                    loss_sum.zero_()
                    n_batches = [0] * len(group)
                watch.start()
            watch.stop()
            for r in {*runs, *group}:  # the next stage starts with a fresh optimiser
                r.enter_stage(index + 1)


def shared_lead(runs: list[Trainer]) -> Trainer | None:
    """The trainer that trains the curriculum's shared stages (`StageSpec.seed`) for `runs`.

    None when no shared stage is left to train. It is the run of the shared seed if that
    seed is one of `runs`, else a trainer of its own, unreported: fresh, or, once the seeds
    have passed an evaluation in the shared stages, loaded from the copy they all hold of it
    (`copy_lead`), which is how a resumed or forked trial gets it back.
    """
    cur, seed = runs[0].cur, runs[0].cur.shared_seed()
    if seed is None or runs[0].position.stage >= cur.shared_stages():
        return None
    own = next((r for r in runs if r.cur.seed == seed), None)
    if own is not None:
        return own
    state = reseeded(runs[0].state_dict(), seed) if runs[0].outcome.evaluations else None
    trainer = type(runs[0])  # `loop.Trainer`, which imports this module
    return trainer(cur.model_copy(update={"seed": seed}), runs[0].device, state, runs[0].precision)


def reseeded(state: dict[str, Any], seed: int) -> dict[str, Any]:
    """A deep copy of a trainer's state, as the trainer of another seed of its curriculum holds it."""
    out = copy.deepcopy(state)
    out["curriculum"] = {**out["curriculum"], "seed": seed}
    return out


def copy_lead(lead: Trainer, runs: list[Trainer]) -> None:
    """Give every run the lead's whole state (weights, optimiser, position, compute, outcome,
    history): after a shared stage each seed stands where the shared seed's run stands."""
    state = lead.state_dict()
    for r in runs:
        if r is not lead:
            own = reseeded(state, r.cur.seed)
            r.load_state_dict(own)
            # not yet moved on to the next stage, nor rid of the stage's optimiser (which loading a state at
            # a stage's last epoch drops): a trial forked here whose stage goes on keeps the lead's Adam state
            r.position = Position(lead.position.stage, lead.position.epoch)
            r._optim_state = own["optimizer"]
