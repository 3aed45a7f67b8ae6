"""One seed's training state, driven by the one loop; `iterhead train`, Ray Tune and tests share it.

`schedule.Schedule` is the loop, written once: stages, epochs, evaluation cadence, target,
divergence and compute, for K >= 1 seeds of one curriculum. A `Trainer` is one seed's state
(data, model, optimiser, compute, outcome, checkpoint); an engine says how the seeds take
their steps: `Lockstep` (each seed's own model in turn; K = 1 is a plain run) or the stacked
engine of `trainable/seeds.py`. `Trainer.run()` is the schedule over that one seed: a
generator that yields an `Evaluation` every `eval.every_epochs` epochs of a stage and at
each stage's last epoch, and stops once the target accuracy is reached (or the last stage
ends). The caller decides what to do with each evaluation (log it, report it to Tune,
checkpoint with `state_dict()`), so variants are stages or engines of this loop, never
copies of it.

Speed: all data lives on the device as one token table; an epoch's row order goes to the
device in one copy; batches hold one length (two at a boundary) so padding is small; the
loss is accumulated on the device, so nothing waits on the host between steps; evaluation
runs in large no-grad chunks.

Divergence: after each epoch (one host sync per epoch, none per step) the epoch's summed
loss is checked, and before an evaluation the weights too (`weights_finite`: an epoch's last
step can leave them NaN after a finite loss, and a NaN model's argmax, token 0, scores the
answers made of it); if either is NaN or infinite, training stops at once and a final
evaluation marked ``diverged`` is yielded, with compute but no accuracy (a model with
non-finite weights has none worth measuring). So is an evaluation with a non-finite metric:
weights can stay finite while their products overflow float32 (NaN attention in the probes,
an accuracy read off NaN logits). It is an outcome, not an error.

Determinism: everything random derives from the curriculum seed: model init, each epoch's
rows and order (stream "sampler", stage, epoch), and each epoch's dropout (stream "dropout",
stage, epoch); a shared stage (`StageSpec.seed`) is trained by the run of its own seed and
copied to the others (`schedule.shared_lead`). Because every epoch re-derives its streams,
resuming from a checkpoint taken at an evaluation continues exactly as an uninterrupted
run would, on the same kind of device: on a CPU with the same torch version and thread
count; on CUDA, where a `Trainer` turns on torch's deterministic algorithms
(`devices.deterministic_cuda`), on the same GPU model with the same torch and CUDA
versions. Across GPU models, or between CPU and GPU, the numbers differ (CUDA dropout masks
follow the GPU's launch configuration, kernels sum in other orders); a checkpoint still
loads and trains there, but not bit for bit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from iterhead.curricula.data import answer_len, build_data, first_per_len, seq_len, stream
from iterhead.curricula.io import parse_curriculum
from iterhead.curricula.sampler import EpochPlan, Layout, plan_epoch
from iterhead.curricula.schema import Curriculum, StageSpec
from iterhead.trainable import results
from iterhead.trainable.adam import Optimizer, load_state, make_optimizer
from iterhead.trainable.allocator import keep_freed_memory
from iterhead.trainable.compute import Compute, Stopwatch, flops, input_tokens
from iterhead.trainable.devices import deterministic_cuda
from iterhead.trainable.evaluate import EvalTable, accuracy_metrics, correct_rows
from iterhead.trainable.mixed import Bf16Copy
from iterhead.trainable.model import Transformer
from iterhead.trainable.probes import probe_metrics
from iterhead.trainable.schedule import Lockstep, Position, Schedule


PRECISIONS = ("fp32", "bf16")  # bf16: steps on a bf16 copy (`mixed.Bf16Copy`); weights, optimiser, evaluation fp32


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on the device without waiting: pinned first on CUDA, so the copy is async."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def torch_seed(seed: int, *labels: object) -> int:
    """A 63-bit seed for a torch.Generator from the root seed and labels."""
    return int(stream(seed, *labels).integers(0, 2**63 - 1))


@dataclass
class Outcome:
    """What a trial achieved; `compute_to_target` is None until the target is reached."""

    reached: bool = False
    compute_to_target: float | None = None
    examples_to_target: int | None = None
    seconds_to_target: float | None = None
    evaluations: int = 0
    diverged: bool = False


@dataclass
class Evaluation:
    """One evaluation: where it happened and every metric, compute cumulative."""

    step: int  # evaluation index, 0-based
    stage: str
    epoch: int  # epochs done in this stage
    metrics: dict[str, float] = field(default_factory=dict)
    reached: bool = False
    final: bool = False  # no evaluation follows: the target is reached or training is over
    diverged: bool = False  # the loss, weights or probes became NaN or infinite; metrics hold compute only
    target_acc: float = 0.0  # what the target is judged on (`results.target_accuracy`); 0 once diverged


class Trainer:
    """Trains one curriculum. Build it, iterate `run()`, read `outcome` and `compute`."""

    def __init__(self, cur: Curriculum, device: torch.device | str = "cpu",
                 state: dict[str, Any] | None = None, precision: str = "fp32") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.cur = cur
        self.precision = precision
        self.device = torch.device(device) if isinstance(device, str) else device
        deterministic_cuda(self.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.vocab, data = build_data(cur)
        d = cur.data
        self.max_tokens = seq_len(d.max_len, d.cot)
        g = torch.Generator().manual_seed(torch_seed(cur.seed, "init"))
        self.model = Transformer(cur.model, self.vocab.size, self.max_tokens, g).to(self.device)
        self.n_params = self.model.n_params()
        self.test = data["test"]
        offsets, start = {}, 0
        for name, split in data["train"].items():
            offsets[name], start = start, start + len(split.lengths)
        self.layout = Layout(offsets, d.min_len, d.max_len, d.train_per_len)
        train_tokens = np.concatenate([s.tokens for s in data["train"].values()])
        self.train_tokens = torch.from_numpy(train_tokens).to(self.device)
        self.train_mask = self._loss_mask(np.concatenate([s.lengths for s in data["train"].values()]))
        self.eval_table = EvalTable.build(data["test"], d.cot, self.device)
        n_train = cur.eval.train_per_len
        self.train_table = EvalTable.build({name: first_per_len(split, n_train) for name, split in data["train"].items()},
                                           d.cot, self.device) if n_train else None
        self.position = Position()
        self.compute = Compute()
        self.outcome = Outcome()
        self.history: list[dict[str, Any]] = []  # per evaluation: stage and headline metrics
        self.optimizer: Optimizer | None = None
        self._optim_state: dict[str, Any] | None = None
        self._bf16: Bf16Copy | None = None  # made at the first bf16 epoch
        if state is not None:
            self.load_state_dict(state)

    def _loss_mask(self, lengths: np.ndarray) -> torch.Tensor:
        """True at the input positions that predict an answer token, per training row."""
        pos = np.arange(self.max_tokens - 1)[None, :]
        start = lengths[:, None] + 1
        stop = start + answer_len(lengths[:, None], self.cur.data.cot)
        return torch.from_numpy((pos >= start) & (pos < stop)).to(self.device)

    # -- stages ---------------------------------------------------------------------------

    def _set_trainable(self, modules: list[str] | None) -> list[torch.nn.Parameter]:
        names = dict(self.model.named_modules())
        for p in self.model.parameters():
            p.requires_grad_(modules is None)
        for name in modules or []:
            for p in names[name].parameters():
                p.requires_grad_(True)
        return [p for p in self.model.parameters() if p.requires_grad]

    def start_stage(self, stage: StageSpec) -> None:
        """Freeze what the stage freezes and give it a fresh optimiser (or the one a checkpoint
        saved in the middle of this stage)."""
        params = self._set_trainable(stage.train_modules)
        self.optimizer = make_optimizer(params, stage.lr or self.cur.optim.lr, self.cur.optim.weight_decay,
                                        self.device)
        if self._optim_state is not None:
            load_state(self.optimizer, self._optim_state)
            self._optim_state = None

    def enter_stage(self, index: int) -> None:
        """Stand at the start of stage `index` unless a checkpoint put us inside it already."""
        if index > self.position.stage:
            self.position, self._optim_state = Position(index, 0), None

    def epoch_plan(self, stage: StageSpec, epoch: int) -> tuple[EpochPlan, torch.Generator]:
        """An epoch's rows and batches, and its dropout generator: both from the seed alone."""
        cur = self.cur
        shared = stream(0, "batch order", stage.name, epoch) if cur.optim.batch_order == "shared" else None
        plan = plan_epoch(self.layout, stage.mix, cur.optim.batch_size,
                          stream(cur.seed, "sampler", stage.name, epoch), shared)
        g = torch.Generator(device=self.device)
        g.manual_seed(torch_seed(cur.seed, "dropout", stage.name, epoch))
        return plan, g

    def count(self, plan: EpochPlan) -> None:
        """Add an epoch's examples, tokens and analytic FLOPs to the compute so far."""
        cur = self.cur
        self.compute.examples += len(plan.rows)
        self.compute.tokens += int(input_tokens(plan.lengths, cur.data.cot).sum())
        self.compute.flops += flops(plan.lengths, cur.data.cot, self.n_params,
                                    cur.model.n_layers, cur.model.d_model)

    def run(self) -> Iterator[Evaluation]:
        """Train stage by stage, yielding each evaluation: the `Schedule` over this one seed."""
        for [(_, ev)] in Schedule([self], Lockstep()).run():
            yield ev

    def evaluates_after(self, stage: StageSpec) -> bool:
        """Whether the epoch just done (`position.epoch` counts it) ends with an evaluation."""
        done = self.position.epoch
        return done % self.cur.eval.every_epochs == 0 or done == stage.epochs

    @property
    def finished(self) -> bool:
        return self.outcome.reached or self.outcome.diverged

    def autocast(self) -> torch.autocast:
        """bf16 autocast around the stacked engine's forward passes when asked for (a single
        seed's bf16 steps run on a `Bf16Copy` instead; evaluation stays fp32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def train_epoch(self, plan, generator: torch.Generator) -> torch.Tensor:
        """One epoch's optimiser steps; returns the summed batch losses (on the device)."""
        cot = self.cur.data.cot
        model, copy = self.model, None
        if self.precision == "bf16":
            copy = self._bf16 = self._bf16 or Bf16Copy(self.model)
            copy.refresh()
            model = copy.model
            model.train(self.model.training)
        rows = to_device(plan.rows, self.device)
        total = torch.zeros((), device=self.device)
        for lo, hi, short, long in plan.batches():
            start, stop = short + 1, long + 1 + answer_len(long, cot)
            batch = self.train_tokens.index_select(0, rows[lo:hi])
            target = batch[:, start + 1:stop + 1]
            logits = model(batch[:, :stop], q_start=start, generator=generator)
            if copy is not None:
                logits = logits.float()  # the loss in fp32; other runs keep their own dtype (float64 in tests)
            if short == long:
                loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
            else:
                mask = self.train_mask.index_select(0, rows[lo:hi])[:, start:stop]
                each = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
                loss = (each * mask.flatten()).sum() / mask.sum()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if copy is not None:
                copy.push_grads()
            self.optimizer.step()
            if copy is not None:
                copy.pull()
            total += loss.detach()
        return total

    def weights_finite(self) -> bool:
        """Whether every weight is finite (one host sync)."""
        with torch.no_grad():
            return bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all())

    def diverged(self, stage: str) -> Evaluation:
        self.outcome.diverged = True
        step = self.outcome.evaluations
        self.outcome.evaluations += 1
        metrics = {**self.compute.metrics(), results.DIVERGED: 1.0}
        return Evaluation(step, stage, self.position.epoch, metrics, final=True, diverged=True)

    def evaluate(self, stage: str, loss: float, last: bool) -> Evaluation:
        watch = Stopwatch()
        watch.start()
        metrics: dict[str, float] = {}
        for prefix, table in ((results.ACC_PREFIX, self.eval_table), (results.TRAIN_ACC_PREFIX, self.train_table)):
            if table is not None:
                correct = correct_rows(self.model, table, precision=self.cur.eval.precision)
                metrics.update(accuracy_metrics(table, correct, prefix))
                self.compute.eval_flops += flops(table.lengths, self.cur.data.cot, self.n_params,
                                                 self.cur.model.n_layers, self.cur.model.d_model, training=False)
        metrics.update(probe_metrics(self.model, self.test, self.cur.eval.probe_per_len,
                                     self.cur.data.cot, self.device, self.cur.target.min_len))
        self.compute.eval_seconds += watch.stop()
        if not all(np.isfinite(v) for v in metrics.values()):  # finite weights, overflowing products
            return self.diverged(stage)
        metrics[results.LOSS] = loss
        metrics.update(self.compute.metrics())
        target = self.cur.target
        target_acc = results.target_accuracy(metrics, target.task, target.min_len, self.cur.data.max_len)
        reached = results.meets_target(target_acc, target.accuracy)
        if reached and not self.outcome.reached:
            self.outcome.reached = True
            self.outcome.compute_to_target = self.compute.flops
            self.outcome.examples_to_target = self.compute.examples
            self.outcome.seconds_to_target = self.compute.seconds
        step = self.outcome.evaluations
        self.outcome.evaluations += 1
        self.history.append({results.STAGE: stage, results.STEP: step, results.TARGET_ACC: target_acc, **{
            k: v for k, v in metrics.items()
            if k.count("/") == 1 and k.startswith((results.ACC_PREFIX, results.COMPUTE_PREFIX))}})
        return Evaluation(step, stage, self.position.epoch, metrics, reached, final=reached or last,
                          target_acc=target_acc)

    # -- checkpoints ----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimiser, position, compute."""
        return {
            "curriculum": self.cur.model_dump(mode="json"),
            "model": self.model.state_dict(),
            # a state loaded but not yet trained on keeps the optimiser state it was given
            "optimizer": self.optimizer.state_dict() if self.optimizer else self._optim_state,
            "position": asdict(self.position),
            "compute": asdict(self.compute),
            "outcome": asdict(self.outcome),
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = parse_curriculum(state["curriculum"], file="checkpoint")
        if saved != self.cur:
            raise ValueError("the checkpoint was written for a different curriculum")
        if list(saved.tasks) != list(self.cur.tasks):  # equal mappings, but the order sets token ids
            raise ValueError("the checkpoint was written for a different curriculum: it lists its tasks in "
                             f"another order ({', '.join(saved.tasks)}), which sets their tokens and rows")
        self.model.load_state_dict(state["model"])
        self.position = Position(**state["position"])
        self.compute = Compute(**state["compute"])
        self.outcome = Outcome(**state["outcome"])
        self.history = list(state["history"])
        self._optim_state = state["optimizer"]
        stage = self.cur.stages[self.position.stage] if self.position.stage < len(self.cur.stages) else None
        if stage is not None and self.position.epoch >= stage.epochs:
            self.position, self._optim_state = Position(self.position.stage + 1, 0), None
