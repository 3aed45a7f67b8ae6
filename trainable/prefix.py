"""What identifies a trained prefix of a curriculum, so that trials can share it exactly.

Training is deterministic by construction: an epoch's rows, order and dropout derive from
the seed, the stage name and the epoch (`loop.Trainer.epoch_plan`), a stage starts a fresh
optimiser, and evaluation changes nothing it trains. So the state after epoch `e` of stage
`i` depends on the seeds, the model, data, tasks and optimiser settings, every training
stage before `i` (all its fields), and stage `i`'s name, mix, lr and modules, but not on
how many epochs stage `i` will go on to train: a 40-epoch pretraining is the first 40
epochs of an 80-epoch one. `Point.key` hashes exactly that (`describe`), and
`environment` hashes what else makes numbers differ (seeds, device and CPU kind, thread
count, precision, engine, torch and iterhead versions, the search's budget and penalty
that shape what a trial reports).

A trial can start from another's state only at a point where both evaluate (`points`):
the stored state includes that evaluation and the reports up to it, which are then the
forked trial's own. Stages with no epochs train nothing and are left out, as the loop
skips them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from iterhead.curricula.schema import Curriculum, StageSpec


@dataclass(frozen=True)
class Point:
    """A point a curriculum evaluates at: `epoch` epochs done in stage `stage` (an index)."""

    stage: int
    epoch: int
    key: str  # `describe` hashed: equal keys, equal states (for equal environments)
    epochs_before: int  # training epochs of the earlier stages: the prefix's length is epochs_before + epoch

    @property
    def depth(self) -> int:
        """Training epochs of the prefix: a deeper point saves more."""
        return self.epochs_before + self.epoch


def _stage(cur: Curriculum, stage: StageSpec) -> dict[str, Any]:
    shared = {"seed": stage.seed} if stage.seed is not None else {}  # keys of unshared stages as before
    return {"name": stage.name, "mix": dict(sorted(stage.mix.items())), "lr": stage.lr or cur.optim.lr,
            "train_modules": stage.train_modules, **shared}


def describe(cur: Curriculum, stage: int, epoch: int) -> dict[str, Any]:
    """Everything in the curriculum that determines its state after `epoch` epochs of stage `stage`.

    The seed is left out (the environment holds the seeds), and so is the name; the current
    stage's epoch count is left out because training so far does not depend on it.
    """
    optim = cur.optim.model_dump(mode="json", exclude={"lr"})
    done = [{**_stage(cur, s), "epochs": s.epochs} for s in cur.stages[:stage] if s.epochs > 0]
    return {"model": cur.model.model_dump(mode="json"), "data": cur.data.model_dump(mode="json"),
            "tasks": {k: v.model_dump(mode="json") for k, v in sorted(cur.tasks.items())},
            "task_order": list(cur.tasks), "optim": optim,  # the order sets the tasks' tokens and rows
            "eval": cur.eval.model_dump(mode="json"), "target": cur.target.model_dump(mode="json"),
            "stages": done, "current": {**_stage(cur, cur.stages[stage]), "epoch": epoch}}


def digest(value: Any) -> str:
    """A stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:32]


def points(cur: Curriculum) -> list[Point]:
    """Every point where `cur` evaluates, in training order (`loop.Trainer.evaluates_after`)."""
    out, before, every = [], 0, cur.eval.every_epochs
    for i, stage in enumerate(cur.stages):
        if stage.epochs == 0:
            continue
        for e in sorted({*range(every, stage.epochs + 1, every), stage.epochs}):
            out.append(Point(i, e, digest(describe(cur, i, e)), before))
        before += stage.epochs
    return out


@lru_cache(maxsize=1)
def cpu_kind() -> str:
    """The CPU's model name and the vector ISA torch uses on it: kernels differ between them."""
    import torch

    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"{model} / {torch.backends.cpu.get_cpu_capability()}"


def environment(seeds: list[int], device: Any, precision: str, engine: str, threads: int,
                budget: float | None, penalty: float) -> str:
    """The hash of what, beside the curriculum, decides a prefix's numbers and reports."""
    import torch

    kind = torch.cuda.get_device_name(device) if getattr(device, "type", str(device)) == "cuda" else cpu_kind()
    try:
        own = version("iterhead")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree without install
        own = "source"
    return digest({"seeds": list(seeds), "device": kind, "precision": precision, "engine": engine,
                   "threads": threads, "torch": torch.__version__, "iterhead": own,
                   "budget": budget, "penalty": penalty})


def entry_key(env: str, point: Point) -> str:
    """The store's key of a prefix: its point's key in its environment."""
    return digest([env, point.key])


def worth_storing(cur: Curriculum, planned: set[str] | None = None) -> set[str]:
    """The point keys a trial stores. `planned`: the keys where the search knows that other
    trials start (a grid, known up front). None (a searcher that proposes as it goes): the
    ends of the trial's stages but the last, and the points 1, 2, 4, 8, ... evaluation
    intervals into each stage, so a shorter stage of the same kind finds a prefix at least
    half its length."""
    own = points(cur)
    if planned is not None:
        return set(planned) & {p.key for p in own}
    keep, every = set(), cur.eval.every_epochs
    for i, p in enumerate(own):
        ends = i + 1 < len(own) and own[i + 1].stage != p.stage
        steps = p.epoch // every
        if ends or (p.epoch % every == 0 and steps & (steps - 1) == 0):
            keep.add(p.key)
    return keep


def adopt(state: dict[str, Any], cur: Curriculum, seeds: list[int] | None) -> dict[str, Any]:
    """A prefix's state, as this trial's own: its curriculum (equal up to the prefix) replaces
    the one that trained it, so the trainers load it as their own checkpoint."""
    def own(one: dict[str, Any]) -> dict[str, Any]:
        mine = cur.model_copy(update={"seed": one["curriculum"]["seed"]})
        return {**one, "curriculum": mine.model_dump(mode="json")}

    return {"seeds": [own(s) for s in state["seeds"]]} if seeds is not None else own(state)
