"""Several seeds of one curriculum trained together, as one model with stacked parameters.

Why: a 2-layer d=128 model uses a sliver of a GPU, so K seeds stacked along a new leading
dimension (`torch.func.stack_module_state`, `vmap` over `functional_call`) can keep it busy
where one seed cannot. That is the aim on GPUs, not yet measured there; on a CPU, which one
seed already keeps busy, batching is slower than running the seeds one after another
(BENCHMARKS.md), so use it on GPUs.

Each seed is the same trial `Trainer` runs with that seed: its own data, initialisation, row
order, dropout and optimiser state (Adam is elementwise, so one Adam over stacked tensors is
K Adams), its own compute count and outcome. At a step the K seeds' batches may differ in
size and length: they are padded to the largest and masked, so each seed's loss is its own;
the padding costs time, never counted compute. Numbers agree with separate runs up to float
rounding (batched products sum in another order), not bit for bit; a batched run is itself
deterministic. Time is shared: each seed's ``compute/seconds`` is the batch's wall time.

A seed that reaches the target or diverges leaves the batch after that epoch, so a slow
seed does not make the others pay. Evaluation, probes and artifacts run per seed on that
seed's own `Trainer` (parameters copied back first), exactly as in a single run.
"""

from __future__ import annotations

import copy
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from iterhead.curricula.data import answer_len
from iterhead.curricula.sampler import EpochPlan
from iterhead.curricula.schema import Curriculum, StageSpec
from iterhead.trainable.compute import Stopwatch
from iterhead.trainable.loop import Evaluation, Position, Trainer, last_stage, make_optimizer, to_device


class SeedBatch:
    """Trains `cur` once per seed in `seeds`, in lockstep. Iterate `run()`; read `trainers`."""

    def __init__(self, cur: Curriculum, seeds: list[int], device: torch.device | str = "cpu",
                 precision: str = "fp32") -> None:
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
        self.cur = cur
        self.seeds = list(seeds)
        self.trainers = [Trainer(cur.model_copy(update={"seed": s}), device, precision=precision)
                         for s in seeds]
        self.device = self.trainers[0].device
        self.skeleton = copy.deepcopy(self.trainers[0].model)  # holds no seed's weights
        self.skeleton.fused_attention(False)
        self.skeleton.train()
        self.tokens = torch.stack([t.train_tokens for t in self.trainers])  # [K, N, T]
        self.mask = torch.stack([t.train_mask for t in self.trainers])  # [K, N, T-1]
        self.active = list(range(len(seeds)))  # trainer indices still in the batch
        self.params, _ = stack_module_state([t.model for t in self.trainers])
        self.optimizer: torch.optim.Optimizer | None = None

    # -- stages ---------------------------------------------------------------------------

    def start_stage(self, stage: StageSpec) -> None:
        """Freeze what the stage freezes and give it a fresh optimiser (as `Trainer` does)."""
        prefixes = tuple(f"{m}." for m in stage.train_modules or [])
        for name, p in self.params.items():
            p.requires_grad_(stage.train_modules is None or name.startswith(prefixes))
        trainable = [p for p in self.params.values() if p.requires_grad]
        self.optimizer = make_optimizer(trainable, stage.lr or self.cur.optim.lr,
                                        self.cur.optim.weight_decay, self.device)

    def _keep(self, keep: list[int]) -> None:
        """Drop finished seeds from the stacked parameters and the optimiser state."""
        where = [self.active.index(k) for k in keep]
        index = torch.tensor(where, device=self.device)
        old = self.optimizer
        state = old.state_dict()
        for entry in state["state"].values():
            for key in ("exp_avg", "exp_avg_sq"):
                entry[key] = entry[key].index_select(0, index)
        self.params = {n: p.detach().index_select(0, index).requires_grad_(p.requires_grad)
                       for n, p in self.params.items()}
        group = old.param_groups[0]
        trainable = [p for p in self.params.values() if p.requires_grad]
        self.optimizer = make_optimizer(trainable, group["lr"], group["weight_decay"], self.device)
        self.optimizer.load_state_dict(state)
        self.active = keep

    def _sync(self, k: int) -> None:
        """Copy seed `k`'s slice of the stacked parameters into its own trainer's model."""
        i = self.active.index(k)
        with torch.no_grad():
            for name, p in self.trainers[k].model.named_parameters():
                p.copy_(self.params[name][i])

    def run(self) -> Iterator[list[tuple[int, Evaluation]]]:
        """Train stage by stage; yield, at each evaluation, (seed, evaluation) per seed evaluated."""
        watch = Stopwatch()
        last = last_stage(self.cur)
        for index, stage in enumerate(self.cur.stages):
            if stage.epochs == 0 or not self.active:
                continue
            for k in self.active:
                self.trainers[k].position = Position(index, 0)
            self.start_stage(stage)
            loss_sum = torch.zeros(len(self.active), device=self.device)
            n_batches = 0
            watch.start()
            for epoch in range(stage.epochs):
                plans = [self.trainers[k].epoch_plan(stage, epoch) for k in self.active]
                losses = self.train_epoch(plans)
                loss_sum += losses
                n_batches += len(plans[0][0].bounds) - 1
                for k, (plan, _) in zip(self.active, plans):
                    self.trainers[k].count(plan)
                    self.trainers[k].position.epoch += 1
                finite = torch.isfinite(losses).tolist()  # one sync per epoch
                ends = self.trainers[self.active[0]].evaluates_after(stage)
                if all(finite) and not ends:
                    continue
                seconds = watch.stop()
                means = (loss_sum / max(n_batches, 1)).tolist()
                out = []
                for i, k in enumerate(self.active):
                    t = self.trainers[k]
                    t.compute.seconds += seconds
                    if not finite[i]:
                        out.append((self.seeds[k], t.diverged(stage.name)))
                    elif ends:
                        self._sync(k)
                        final = index == last and epoch + 1 == stage.epochs
                        out.append((self.seeds[k], t.evaluate(stage.name, means[i], final)))
                yield out
                keep = [k for k in self.active if not self.trainers[k].finished]
                if not keep:
                    self.active = []
                    return
                if keep != self.active:
                    loss_sum = loss_sum[[self.active.index(k) for k in keep]]
                    self._keep(keep)
                if ends:
                    loss_sum.zero_()
                    n_batches = 0
                watch.start()
            watch.stop()

    # -- one epoch ------------------------------------------------------------------------

    def _loss(self, params: dict[str, torch.Tensor], batch: torch.Tensor, mask: torch.Tensor,
              keep: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
        """One seed's masked mean loss over its answer positions (called under vmap)."""
        kwargs = {"q_start": start} if keep is None else {"q_start": start, "keep": keep}
        logits = functional_call(self.skeleton, params, (batch[:, :stop],), kwargs)
        each = F.cross_entropy(logits.flatten(0, 1), batch[:, start + 1:stop + 1].flatten(), reduction="none")
        m = mask.flatten().to(each.dtype)
        return (each * m).sum() / m.sum()

    def train_epoch(self, plans: list[tuple[EpochPlan, torch.Generator]]) -> torch.Tensor:
        """One epoch's optimiser steps for the active seeds; their summed batch losses [K]."""
        cot, p = self.cur.data.cot, self.cur.model.dropout
        seeds = torch.tensor(self.active, device=self.device)[:, None]  # rows of the stacked tables
        steps, picks, valid = epoch_steps([plan for plan, _ in plans])
        picks, valid = to_device(picks, self.device), to_device(valid, self.device)  # [S, K, B]
        rows = to_device(np.stack([plan.rows for plan, _ in plans]), self.device)  # [K, n]
        total = torch.zeros(len(self.active), device=self.device)
        for s, batches in enumerate(steps):
            start = min(short for _, _, short, _ in batches) + 1
            stop = max(long + 1 + answer_len(long, cot) for _, _, _, long in batches)
            size = max(hi - lo for lo, hi, _, _ in batches)
            chosen = rows.gather(1, picks[s, :, :size])  # [K, B]
            batch = self.tokens[seeds, chosen]
            mask = self.mask[seeds, chosen][:, :, start:stop] & valid[s, :, :size, None]
            keep = None
            if p > 0:
                keep = torch.ones((len(batches), size, stop, self.cur.model.d_model), dtype=torch.bool,
                                  device=self.device)
                for i, ((lo, hi, _, long), (_, g)) in enumerate(zip(batches, plans)):
                    own = long + 1 + answer_len(long, cot)  # the shape a single run draws
                    keep[i, :hi - lo, :own] = torch.rand((hi - lo, own, keep.shape[-1]), generator=g,
                                                         device=self.device) >= p
            with self.trainers[0].autocast():
                losses = vmap(self._loss, in_dims=(0, 0, 0, None if keep is None else 0, None, None))(
                    self.params, batch, mask, keep, start, stop)
            self.optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            self.optimizer.step()
            total += losses.detach()
        return total


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
