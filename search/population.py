"""Population Based Training over a stage's settings, as a Ray Tune searcher that runs in the driver.

A PBT search (``search.scheduler: pbt`` with a ``pbt:`` section) trains `num_samples`
members of the base curriculum, all from its seed. Each member starts with settings of the
PBT stage (`pbt.stage`, by default the last stage that trains) drawn from the `pbt.mutate`
domains. Every `pbt.interval_epochs` epochs of that stage the members stand at the same
point, so at equal training compute (an epoch costs the same whatever the mix), and are
ranked on the target task's accuracy (ties: the lower training loss, then the member). The
worst `quantile` copy the state of one of the best `quantile` (chosen at random) and
perturb its settings (`search.explore`); the rest go on as they were.

A member's history is therefore a list of stages, and it is trained as one: its
*lineage*. The PBT stage is cut into segments; segment 0 keeps the stage's name, and the
segment a member starts when it copies another is named ``<stage>-m<member>-e<epoch>``
(unique within a lineage, and its own data order: a stage's rows, batch order and dropout
derive from the seed, its name and the epoch). Each segment starts a fresh optimiser, as
every stage does. A member that copies member D at epoch e of the stage takes D's lineage
with D's segment in force cut at e, and adds its new segment for the rest of the stage;
the stages after the PBT stage follow unchanged. So a lineage is an ordinary curriculum
that `iterhead train` re-trains to the same numbers, and `iterhead export` writes it.

How it runs on Tune: each trial is one member for one interval (a *generation*): it
starts from the member's state at the interval's start (a population entry that the
previous generation's trial wrote into ``population/`` in the search's folder, or from
scratch), trains its lineage up to the interval's end, writes its state there and ends.
When every trial of a generation has ended, this searcher ranks the members and proposes
the next generation; so the decisions depend only on the members' results and the search
seed (``stream(seed, "pbt", ...)``), never on which trial happened to finish first. The
last generation trains to the end of the curriculum.

A member ends when it reaches the target, diverges, spends the budget or finishes its
curriculum (censored). When one reaches the target the whole population ends with that
generation: every later lineage trains at least one more interval, so none can need less
compute. The search's answer is the lineage with the least compute_to_target.

Entries no trial can start from again are deleted as the search goes (`Population.prune`,
each time Tune saves the searcher), so the folder holds two or three generations of
members' states, not every generation's: an entry is kept while the searcher's state as
saved now, or as saved the time before (the one a restore reads if this save is torn),
starts a trial from it. The finished search removes the folder.
"""

from __future__ import annotations

import copy
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune.schedulers import FIFOScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

from iterhead.curricula.data import stream
from iterhead.curricula.overrides import blend
from iterhead.curricula.trial import SMOKE_PBT, shrink, trial_curriculum
from iterhead.search.explore import draw, perturb, project_shares
from iterhead.search.outcome import ended
from iterhead.search.spec import LoadedSearch, PbtSettings, SearchSettings
from iterhead.trainable import results as r
from iterhead.trainable.prefix import points


@dataclass
class Segment:
    """One segment of a member's lineage of the PBT stage."""

    name: str  # the stage name it trains under
    start: int  # the PBT stage's epoch it starts at
    settings: dict[str, Any]  # the mutate keys' values
    made_by: int  # the member that started it

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "start": self.start, "settings": self.settings, "made_by": self.made_by}


@dataclass
class Member:
    id: int
    segments: list[Segment]
    start: str | None = None  # the population entry its next trial starts from (None: from scratch)
    donor: int | None = None  # whose state that entry holds, when not its own
    alive: bool = True
    outcome: str = ""  # reached, censored, diverged, failed, or stopped (the population ended first)


def entry_name(generation: int, member: int) -> str:
    """The population entry a member's trial of `generation` leaves at the interval's end."""
    return f"g{generation:04d}-m{member:04d}"


ENTRY = re.compile(r"g(\d{4,})-m(\d{4,})")  # `entry_name`, read back


def pbt_stage(pbt: PbtSettings, base: dict[str, Any]) -> str:
    """The stage PBT acts on: `pbt.stage`, or the last stage that trains."""
    return pbt.stage or [s["name"] for s in base["stages"] if s["epochs"] > 0][-1]


def interval_for(pbt: PbtSettings, smoke: bool) -> int:
    """Epochs of the PBT stage between comparisons (one in a smoke search)."""
    return SMOKE_PBT["interval_epochs"] if smoke else pbt.interval_epochs


class Population(Searcher):
    """The PBT searcher (module docstring). Pickled state: plain data only, so a restored
    search continues the same population."""

    def __init__(self, base: dict[str, Any], pbt: PbtSettings, members: int, seed: int, smoke: bool,
                 folder: str | None = None) -> None:
        super().__init__(metric=r.COMPUTE_TO_TARGET, mode="min")
        self.folder = folder  # where the trials leave their entries (None: nothing is pruned)
        data = shrink(copy.deepcopy(base)) if smoke else base
        self.stage = pbt_stage(pbt, data)
        names = [s["name"] for s in data["stages"]]
        self.index = names.index(self.stage)  # where the PBT stage's segments sit in every lineage
        self.base_stage = copy.deepcopy(data["stages"][self.index])
        self.epochs = int(self.base_stage["epochs"])
        interval = interval_for(pbt, smoke)
        self.boundaries = [*range(interval, self.epochs, interval), self.epochs]
        self.mutate = dict(pbt.mutate)
        self.quantile, self.resample, self.seed = pbt.quantile, pbt.resample_probability, seed
        rng = stream(seed, "pbt", "initial population")
        self.members = [Member(m, [Segment(self.stage, 0, self.on_simplex(
            {k: draw(d, rng) for k, d in self.mutate.items()}), m)]) for m in range(members)]
        self.generation = 0
        self.queue = [self.config(m) for m in self.members]
        self.pending: dict[str, int] = {}  # trial id -> member
        self.results: dict[int, dict[str, Any]] = {}  # member -> its trial's last result, this generation
        self.done = False

    # -- lineages ----------------------------------------------------------------------------

    def stage_of(self, segment: Segment, epochs: int) -> dict[str, Any]:
        """A segment as a stage of the curriculum: the base stage with the segment's settings."""
        stage = copy.deepcopy(self.base_stage)
        shares = {k.split(".", 1)[1]: v for k, v in segment.settings.items() if k.startswith("mix.")}
        if shares:
            stage["mix"] = blend(self.base_stage["mix"], shares)
        for key, value in segment.settings.items():
            if not key.startswith("mix."):
                stage[key] = copy.deepcopy(value)
        stage["name"], stage["epochs"] = segment.name, epochs
        return stage

    def stages(self, member: Member) -> list[dict[str, Any]]:
        """The member's lineage of the PBT stage: its segments, the last to the stage's end."""
        ends = [s.start for s in member.segments[1:]] + [self.epochs]
        return [self.stage_of(s, end - s.start) for s, end in zip(member.segments, ends)]

    def config(self, member: Member) -> dict[str, Any]:
        """The trial config of `member` for the current generation (what `trial_curriculum` reads)."""
        boundary = self.boundaries[self.generation]
        last = self.generation == len(self.boundaries) - 1
        stop = None if last else [self.index + len(member.segments) - 1, boundary - member.segments[-1].start]
        return {"pbt": {"member": member.id, "generation": self.generation, "stage": self.stage,
                        "stages": self.stages(member), "segments": [s.to_dict() for s in member.segments],
                        "start": member.start, "donor": member.donor, "stop": stop,
                        "entry": entry_name(self.generation, member.id)}}

    # -- Tune's searcher interface ------------------------------------------------------------

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self.queue:
            config = self.queue.pop(0)
            self.pending[trial_id] = config["pbt"]["member"]
            return config
        if self.done and not self.pending:
            return Searcher.FINISHED
        return None  # the generation is still training: wait for it

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        member = self.pending.pop(trial_id, None)
        if member is None:  # not one this searcher waits for (a trial of before a restore)
            return
        self.results[member] = {"error": error or not result, **(result or {})}
        if not self.pending and not self.queue:
            self.next_generation()

    def next_generation(self) -> None:
        """Rank the generation's members, let the worst copy the best, and queue the next one."""
        alive = [m for m in self.members if m.alive]
        scores = {}
        for m in alive:
            res = self.results[m.id]
            ended = ("failed" if res["error"] else "reached" if res.get(r.REACHED) == 1.0 else
                     "diverged" if res.get(r.DIVERGED) == 1.0 else "censored" if res.get(r.MEMBER_ENDS) else "")
            if ended:
                m.alive, m.outcome = False, ended
            scores[m.id] = (-float(res.get(r.TARGET_ACC, 0.0)), float(res.get(r.LOSS, math.inf)), m.id)
        self.results = {}
        alive = [m for m in alive if m.alive]
        reached = any(m.outcome == "reached" for m in self.members)
        if reached or not alive or self.generation + 1 >= len(self.boundaries):
            for m in alive:
                m.alive, m.outcome = False, "stopped"
            self.done = True
            return
        boundary = self.boundaries[self.generation]
        ranked = sorted(alive, key=lambda m: scores[m.id])
        k = min(math.ceil(self.quantile * len(ranked)), len(ranked) // 2)
        top, bottom = ranked[:k], ranked[len(ranked) - k:] if k else []
        rng = stream(self.seed, "pbt", "generation", self.generation)
        for m in alive:
            m.start, m.donor = entry_name(self.generation, m.id), None
        for m in bottom:
            donor = top[int(rng.integers(len(top)))]
            settings = self.explore(donor.segments[-1].settings, rng)
            m.segments = copy.deepcopy(donor.segments) + [
                Segment(f"{self.stage}-m{m.id}-e{boundary}", boundary, settings, m.id)]
            m.start, m.donor = entry_name(self.generation, donor.id), donor.id
        self.generation += 1
        self.queue = [self.config(m) for m in alive]

    def explore(self, settings: dict[str, Any], rng) -> dict[str, Any]:
        """Perturb every mutate key; put the mix shares back on the simplex."""
        return self.on_simplex({k: perturb(v, self.mutate[k], rng, self.resample) for k, v in settings.items()})

    def on_simplex(self, settings: dict[str, Any]) -> dict[str, Any]:
        """`settings` with the mix shares moved where they sum to at most 1 (`project_shares`), so
        that the recorded shares are the ones trained (the spec leaves one task of the mix out
        of mutate to take what is left)."""
        shares = {k: v for k, v in settings.items() if k.startswith("mix.")}
        if not shares:
            return settings
        return {**settings, **project_shares(shares, {k: tuple(self.mutate[k].args) for k in shares})}

    # -- state, for a restored search ---------------------------------------------------------

    def get_state(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def set_state(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)
        self.prune()

    def starts(self) -> set[str]:
        """The entries that the trials of the current generation start from."""
        return {m.start for m in self.members if m.alive and m.start}

    def prune(self) -> None:
        """Delete the entries of earlier generations that neither this saved state nor the one
        saved before it starts a trial from. Entries of the current generation are being
        written and the next one starts from them: kept. Right after a restore the state saved
        before is not known, so that save deletes nothing."""
        now, before = self.starts(), getattr(self, "_starts_saved_before", None)
        self._starts_saved_before = now  # not in get_state (a leading "_"): this process's history
        if before is None or self.folder is None or not Path(self.folder).is_dir():
            return
        for path in Path(self.folder).glob("*.pt"):
            name = ENTRY.fullmatch(path.stem)
            if name and int(name.group(1)) < self.generation and path.stem not in now | before:
                path.unlink(missing_ok=True)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))


# -- the driver's side of a PBT search ---------------------------------------------------------

def tune_parts(loaded: LoadedSearch, base: dict[str, Any], settings: SearchSettings, smoke: bool,
               folder: Path) -> tuple[ConcurrencyLimiter, FIFOScheduler, int]:
    """The searcher, scheduler and most trials a PBT search can run (members x generations)."""
    population = Population(base, loaded.spec.pbt, settings.num_samples, settings.seed, smoke, str(folder))
    limited = ConcurrencyLimiter(population, max_concurrent=settings.max_concurrent)
    return limited, FIFOScheduler(), settings.num_samples * len(population.boundaries)


def prefix_plan(loaded: LoadedSearch, base: dict[str, Any], smoke: bool) -> list[str] | None:
    """Where every member's lineage still agrees, so the first generation trains it once (shared
    prefixes, `trainable.prefix_store`): the end of the stages before the PBT stage, if any train."""
    cur = trial_curriculum(base, {}, smoke)
    index = [s.name for s in cur.stages].index(pbt_stage(loaded.spec.pbt, base))
    before = [p for p in points(cur) if p.stage < index]
    return [before[-1].key] if before else None


def member_rows(grid, run_ids: dict[str, str], keys: list[str], finished: set[str] = frozenset()
                ) -> list[dict[str, Any]]:
    """One row per member from its trials (generations): its last trial's outcome and settings,
    its lineage's FLOPs, and what its own trials trained (the rest it took from the members it
    started from: ``compute/flops_forked``, so the search's accounting sums what was trained).
    A member whose training had not ended when the search stopped is UNFINISHED, as a cut trial
    of any other search is (a trial in `finished` ended before a resume: `folder.ended_before`)."""
    by_member: dict[int, list[Any]] = {}
    for result in grid:
        member = (result.config or {}).get("pbt")
        if member is not None:
            by_member.setdefault(int(member["member"]), []).append(result)
    ends = population_end(by_member)
    rows = []
    for m, results in sorted(by_member.items()):
        last = max(results, key=lambda res: res.config["pbt"]["generation"])
        # its outcome and lineage from the last generation that reported: one that failed before
        # its first report has no metrics, and reading them from it lost the member's lineage
        reported = [res for res in results if r.FLOPS_SEEDS in (res.metrics or {})]
        metrics = max(reported, key=lambda res: res.config["pbt"]["generation"]).metrics if reported else {}
        trained = sum(float((res.metrics or {}).get(r.FLOPS_SEEDS, 0.0)) - float((res.metrics or {}).get(
            r.FLOPS_FORKED, 0.0)) for res in results)
        lineage = float(metrics.get(r.FLOPS_SEEDS, 0.0))
        name = f"member-{m}"
        status = "ERROR" if last.error else "TERMINATED" if member_ended(last, ends, finished) else "UNFINISHED"
        row = {"trial_id": name, "status": status, "run_id": run_ids.get(name, ""),
               **{k: last.config["pbt"]["segments"][-1]["settings"].get(k) for k in keys},
               "switches": sum(1 for res in results if res.config["pbt"].get("donor") is not None),
               "generations": len(results), "forked_from": "", "reports": metrics.get("training_iteration", 0)}
        for k in (r.REACHED, r.COMPUTE_TO_TARGET, r.TARGET_ACC, r.FLOPS):
            row[k] = metrics.get(k, float("nan"))
        row.update({r.FLOPS_SEEDS: lineage, r.FLOPS_FORKED: lineage - trained})
        rows.append(row)
    return rows


def population_end(by_member: dict[int, list[Any]]) -> int | None:
    """The generation after which the population ended because a member reached the target in
    it (`Population.next_generation`), or None: none reached in the trials there are."""
    return min((res.config["pbt"]["generation"] for results in by_member.values() for res in results
                if (res.metrics or {}).get(r.REACHED) == 1.0), default=None)


def member_ended(last: Any, ends: int | None, finished: set[str]) -> bool:
    """Whether a member's training was over, from its last trial (`last`): that trial said the
    member ended (`results.MEMBER_ENDS`: it reached the target, diverged, spent the budget or
    trained its whole lineage), or it ended at the end of the generation in which the population
    ended (`ends`). Not Tune's trial state: a stopped search holds the trials it stopped as
    TERMINATED, and a member whose generation ended waits for its next trial, not yet made."""
    metrics = last.metrics or {}
    if metrics.get(r.MEMBER_ENDS):
        return True
    over = ended(metrics, False) or metrics.get("trial_id") in finished
    return over and ends is not None and last.config["pbt"]["generation"] >= ends


def summary_line(flops: dict[str, float], rows: list[dict[str, Any]]) -> str:
    """The terminal's account of what the population trained."""
    switches = sum(int(row.get("switches", 0)) for row in rows)
    return (f"the population trained {flops[r.FLOPS_TRAINED]:.3e} FLOPs in all; its {len(rows)} members' "
            f"lineages are worth {flops[r.FLOPS_CURRICULA]:.3e} trained one by one ({switches} copies of a "
            "better member's state)")
