"""Several seeds of one curriculum in one schedule: `Seeds`, and the stacked engine.

`Seeds` trains K seeds of a curriculum through the one loop (`schedule.Schedule`), each seed
the same trial a single `Trainer` with that seed runs: its own data, initialisation, row
order, dropout, optimiser state, compute count and outcome. A seed that reaches the target
or diverges leaves; the others go on. `state_dict()` holds every seed, and a `Seeds` built
from it resumes all of them exactly.

Two engines take the steps. `Lockstep` (schedule.py) steps each seed's own model in turn: the
numbers are exactly those of separate runs, and on a CPU, which one seed already keeps
busy, it is the faster one (BENCHMARKS.md). `Stacked` stacks the K seeds' parameters along
a new leading dimension (`torch.func.stack_module_state`, `vmap` over `functional_call`),
so one kernel launch serves K seeds: the aim on GPUs, where one tiny model leaves the chip
idle (not yet measured on one). Adam is elementwise, so one Adam over stacked tensors is K
Adams. At a step the seeds' batches may differ in size and length: they are padded to the
largest and masked, so each seed's loss is its own; the padding costs time, never counted
compute (`optim.batch_order: shared` makes the shapes equal). Stacked numbers agree with
separate runs up to float rounding (batched products sum in another order), not bit for
bit; a stacked run is itself deterministic. `engine="auto"` takes `Stacked` on CUDA and
`Lockstep` elsewhere.
"""

from __future__ import annotations

import copy
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from iterhead.curricula.data import answer_len
from iterhead.curricula.sampler import EpochPlan
from iterhead.curricula.schema import Curriculum, StageSpec
from iterhead.trainable.adam import Optimizer, load_state, make_optimizer
from iterhead.trainable.loop import Evaluation, Trainer, to_device
from iterhead.trainable.schedule import Engine, Lockstep, Schedule


ENGINES = ("auto", "lockstep", "stacked")


def choose_engine(name: str, device: torch.device, k: int) -> str:
    """`auto`: stacked on CUDA for K > 1 (by design, unmeasured), lockstep on CPUs (measured)."""
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {name!r}")
    if name != "auto":
        return name
    return "stacked" if device.type == "cuda" and k > 1 else "lockstep"


class Seeds:
    """Trains `cur` once per seed in `seeds`, in one schedule. Iterate `run()`; read `trainers`."""

    def __init__(self, cur: Curriculum, seeds: list[int], device: torch.device | str = "cpu",
                 precision: str = "fp32", engine: str = "auto", state: dict[str, Any] | None = None) -> None:
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
        if state is not None and [s["curriculum"]["seed"] for s in state["seeds"]] != list(seeds):
            raise ValueError("the checkpoint holds other seeds than the ones asked for")
        self.cur = cur
        self.seeds = list(seeds)
        self.trainers = [Trainer(cur.model_copy(update={"seed": s}), device, precision=precision,
                                 state=state["seeds"][i] if state is not None else None)
                         for i, s in enumerate(seeds)]
        self.device = self.trainers[0].device
        self.engine_name = choose_engine(engine, self.device, len(seeds))
        self.engine: Engine = Stacked(self.trainers) if self.engine_name == "stacked" else Lockstep()

    def run(self) -> Iterator[list[tuple[int, Evaluation]]]:
        """At each evaluation point, (seed, evaluation) for every seed evaluated there."""
        return Schedule(self.trainers, self.engine).run()

    @property
    def finished(self) -> bool:
        return all(t.finished for t in self.trainers)

    def state_dict(self) -> dict[str, Any]:
        """Every seed's state, each as a single run's checkpoint holds it."""
        return {"seeds": [self.engine.seed_state(t) for t in self.trainers]}


class Stacked:
    """K seeds as one model with stacked parameters, stepped together (module docstring)."""

    def __init__(self, trainers: list[Trainer]) -> None:
        self.row = {id(t): i for i, t in enumerate(trainers)}  # each seed's index in the stacked tables
        self.skeleton = copy.deepcopy(trainers[0].model)  # holds no seed's weights
        self.skeleton.fused_attention(False)
        self.skeleton.train()
        self.tokens = torch.stack([t.train_tokens for t in trainers])  # [K, N, T]
        self.mask = torch.stack([t.train_mask for t in trainers])  # [K, N, T-1]
        self.active: list[Trainer] = []  # the seeds in `params`, in order
        self.params: dict[str, torch.Tensor] = {}
        self.optimizer: Optimizer | None = None

    def start_stage(self, stage: StageSpec, runs: list[Trainer]) -> None:
        """Stack the seeds' weights, freeze what the stage freezes, and give it an optimiser:
        fresh, or the seeds' saved ones stacked (a resume inside this stage)."""
        for t in self.active:
            self.sync(t)
        self.active = list(runs)
        for t in runs:  # a seed that trained a stage alone (a shared one) may come with frozen
            t.model.requires_grad_(True)  # flags, and stacking takes equal ones; the stage sets its own below
        self.params, _ = stack_module_state([t.model for t in runs])
        prefixes = tuple(f"{m}." for m in stage.train_modules or [])
        for name, p in self.params.items():
            p.requires_grad_(stage.train_modules is None or name.startswith(prefixes))
        trainable = [p for p in self.params.values() if p.requires_grad]
        cur = runs[0].cur
        self.optimizer = make_optimizer(trainable, stage.lr or cur.optim.lr, cur.optim.weight_decay, runs[0].device)
        saved = [t._optim_state for t in runs]
        if any(s is not None for s in saved):
            load_state(self.optimizer, stack_optimizer_states(saved))
        for t in runs:
            t._optim_state = None

    def leave(self, runs: list[Trainer], keep: list[Trainer]) -> None:
        """Drop the seeds that left from the stacked parameters and the optimiser state."""
        for t in runs:
            if t not in keep:
                self.sync(t)
        index = torch.tensor([self.active.index(t) for t in keep], device=keep[0].device)
        old = self.optimizer
        state = slice_optimizer_state(old.state_dict(), index)
        self.params = {n: p.detach().index_select(0, index).requires_grad_(p.requires_grad)
                       for n, p in self.params.items()}
        group = old.param_groups[0]
        trainable = [p for p in self.params.values() if p.requires_grad]
        self.optimizer = make_optimizer(trainable, group["lr"], group["weight_decay"], keep[0].device)
        load_state(self.optimizer, state)
        self.active = list(keep)

    def sync(self, run: Trainer) -> None:
        """Copy the seed's slice of the stacked parameters into its own model."""
        if run not in self.active:
            return
        i = self.active.index(run)
        with torch.no_grad():
            for name, p in run.model.named_parameters():
                p.copy_(self.params[name][i])

    def seed_state(self, run: Trainer) -> dict[str, Any]:
        """The seed's state with its slice of the stacked optimiser, as a single run saves it."""
        self.sync(run)
        state = run.state_dict()
        if run in self.active and self.optimizer is not None:
            index = torch.tensor([self.active.index(run)], device=run.device)
            one = slice_optimizer_state(self.optimizer.state_dict(), index)
            for entry in one["state"].values():
                for key in ("exp_avg", "exp_avg_sq"):
                    entry[key] = entry[key][0]
            state["optimizer"] = one
        return state

    # -- one epoch ------------------------------------------------------------------------

    def _loss(self, params: dict[str, torch.Tensor], batch: torch.Tensor, mask: torch.Tensor,
              keep: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
        """One seed's masked mean loss over its answer positions (called under vmap)."""
        kwargs = {"q_start": start} if keep is None else {"q_start": start, "keep": keep}
        logits = functional_call(self.skeleton, params, (batch[:, :stop],), kwargs)
        each = F.cross_entropy(logits.flatten(0, 1), batch[:, start + 1:stop + 1].flatten(), reduction="none")
        m = mask.flatten().to(each.dtype)
        return (each * m).sum() / m.sum()

    def train_epoch(self, runs: list[Trainer], plans: list[tuple[EpochPlan, torch.Generator]]) -> torch.Tensor:
        """One epoch's optimiser steps for the seeds; their summed batch losses [K]."""
        cur, device = runs[0].cur, runs[0].device
        cot, p = cur.data.cot, cur.model.dropout
        # rows of the tables; copied as the batches are, so that CUDA does not wait on the host here
        seeds = to_device(np.array([self.row[id(t)] for t in runs], dtype=np.int64), device)[:, None]
        steps, picks, valid = epoch_steps([plan for plan, _ in plans])
        picks, valid = to_device(picks, device), to_device(valid, device)  # [S, K, B]
        rows = to_device(np.stack([plan.rows for plan, _ in plans]), device)  # [K, n]
        total = torch.zeros(len(runs), device=device)
        for s, batches in enumerate(steps):
            start = min(short for _, _, short, _ in batches) + 1
            stop = max(long + 1 + answer_len(long, cot) for _, _, _, long in batches)
            size = max(hi - lo for lo, hi, _, _ in batches)
            chosen = rows.gather(1, picks[s, :, :size])  # [K, B]
            batch = self.tokens[seeds, chosen]
            mask = self.mask[seeds, chosen][:, :, start:stop] & valid[s, :, :size, None]
            keep = None
            if p > 0:
                keep = torch.ones((len(batches), size, stop, cur.model.d_model), dtype=torch.bool, device=device)
                for i, ((lo, hi, _, long), (_, g)) in enumerate(zip(batches, plans)):
                    own = long + 1 + answer_len(long, cot)  # the shape a single run draws
                    keep[i, :hi - lo, :own] = torch.rand((hi - lo, own, keep.shape[-1]), generator=g,
                                                         device=device) >= p
            with runs[0].autocast():
                losses = vmap(self._loss, in_dims=(0, 0, 0, None if keep is None else 0, None, None))(
                    self.params, batch, mask, keep, start, stop)
            self.optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            self.optimizer.step()
            total += losses.detach()
        return total


def slice_optimizer_state(state: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
    """A stacked Adam state keeping only the seeds at `index` (Adam's state is elementwise)."""
    out = copy.copy(state)
    out["state"] = {k: {**entry, **{key: entry[key].index_select(0, index) for key in ("exp_avg", "exp_avg_sq")}}
                    for k, entry in state["state"].items()}
    return out


def stack_optimizer_states(states: list[dict[str, Any] | None]) -> dict[str, Any]:
    """K single-model Adam states (saved in one stage, so the same steps) as one stacked state."""
    if any(s is None for s in states):
        raise ValueError("a resumed stage needs every seed's optimiser state")
    first = states[0]
    out = copy.copy(first)
    out["state"] = {k: {**entry, **{key: torch.stack([s["state"][k][key] for s in states])
                                   for key in ("exp_avg", "exp_avg_sq")}}
                    for k, entry in first["state"].items()}
    return out


def epoch_steps(plans: list[EpochPlan]) -> tuple[list[tuple[tuple[int, int, int, int], ...]], np.ndarray, np.ndarray]:
    """The K plans' batches step by step, and where each seed's batch rows sit in its plan.

    Returns per step the K batches (start, stop, min length, max length), positions
    [S, K, B] into each plan's rows (short batches repeat their last row) and a validity
    mask [S, K, B] that is False on those repeats."""
    per_seed = [plan.batches() for plan in plans]
    if len({len(b) for b in per_seed}) != 1:
        raise ValueError("seeds of one curriculum must have the same number of batches an epoch")
    steps = list(zip(*per_seed))
    width = max(hi - lo for batches in per_seed for lo, hi, _, _ in batches)
    lo = np.array([[b[0] for b in step] for step in steps])[:, :, None]  # [S, K, 1]
    hi = np.array([[b[1] for b in step] for step in steps])[:, :, None]
    offset = np.arange(width)[None, None, :]
    return steps, np.minimum(lo + offset, hi - 1), lo + offset < hi
