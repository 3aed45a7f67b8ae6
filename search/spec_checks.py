"""What a search spec must satisfy beyond its fields, checked before anything starts.

Every space key addresses a curriculum field (stages by name), and the curriculum stays
valid at each domain's ends and choices, each key alone and all keys together
(`_check_joint`); searched mix shares leave one of their stage's tasks out; a PBT section
fits its scheduler and its stage; and some trial trains. So a bad spec fails in a second,
not in the middle of a search.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from typing import TYPE_CHECKING, Any, Iterable

from iterhead.curricula.errors import ConfigError, shown, unknown
from iterhead.curricula.io import parse_curriculum
from iterhead.curricula.overrides import apply
from iterhead.curricula.schema import Curriculum, StageSpec

if TYPE_CHECKING:
    from iterhead.search.spec import Domain, SearchSpec

PBT_KEYS = ("lr", "mix.<task>", "train_modules")  # the stage fields PBT perturbs


def check_spec(spec: SearchSpec, base: Curriculum, file: str) -> None:
    """Every check below; `ConfigError` naming the field of the first that fails."""
    _check_space(spec, base, file)
    _check_pbt(spec, base, file)
    _check_trains(spec, base, file)
    _check_rungs(spec, file)


MAX_RUNGS = 10_000  # ASHA's rungs: log(1 / grace_fraction) / log(reduction_factor)


def _check_rungs(spec: SearchSpec, file: str) -> None:
    """ASHA compares trials at each rung; Tune builds them all at the start, so a
    `reduction_factor` just above 1 made ~1e15 of them: the search hung after Ray started."""
    s = spec.search
    if s.scheduler != "asha":
        return
    rungs = math.log(1 / s.grace_fraction) / math.log(s.reduction_factor)
    if rungs > MAX_RUNGS:
        raise ConfigError(f"{s.reduction_factor!r} with grace_fraction {s.grace_fraction:.3g} gives ASHA "
                          f"{rungs:.3g} rungs, past {MAX_RUNGS}; raise it (3 is usual) or raise grace_fraction",
                          field="search.reduction_factor", file=file)


def _check_space(spec: SearchSpec, base: Curriculum, file: str) -> None:
    data = base.model_dump(mode="json")
    if spec.seeds is not None:
        if len(set(spec.seeds)) != len(spec.seeds):
            twice = next(s for s in spec.seeds if spec.seeds.count(s) > 1)
            raise ConfigError(f"seed {twice} is listed twice; list each seed once", field="seeds", file=file)
        if "seed" in spec.space:
            raise ConfigError("the seeds are listed in `seeds:`, so seed cannot also be searched; "
                              "remove space.seed (or drop `seeds:` to search seeds as a key)",
                              field="space.seed", file=file)
    grids = [k for k, d in spec.space.items() if d.kind == "grid"]
    if grids and spec.search.algorithm == "optuna":
        raise ConfigError("grid domains need algorithm random or grid, not 'optuna' (Optuna samples, "
                          f"it does not enumerate); change search.algorithm or make {grids[0]!r} a choice",
                          field="search.algorithm", file=file)
    if spec.search.algorithm == "grid" and any(d.kind != "grid" for d in spec.space.values()):
        key = next(k for k, d in spec.space.items() if d.kind != "grid")
        raise ConfigError(f"algorithm grid enumerates grid domains only, not {spec.space[key].kind}; "
                          "make it a grid or use random",
                          field=f"space.{key}", file=file)
    for key, domain in spec.space.items():
        _check_space_key(key, domain, file)
    # which shares are searched, before their values: a share of 0 for a stage's only task failed on
    # its value first, and that message led to a lower end which this rule then refused
    _check_shares_leave_a_task(spec, base, file)
    for key, domain in spec.space.items():
        for value in domain.probes():
            err = _invalid(data, {key: value})
            if err is None:
                continue
            where = f"space.{key}"
            if err.field and err.field != key:
                raise ConfigError(f"the value {_shown(value)} makes the curriculum invalid: "
                                  f"{err.field}: {err.message}", field=where, file=file)
            raise ConfigError(err.message, field=where, file=file)
    _check_shares_sum(spec, file)
    _check_joint(spec.space, data, file)


def _searched_shares(spec: SearchSpec) -> dict[str, list[str]]:
    """The tasks whose mix shares the space searches, by stage name."""
    searched: dict[str, list[str]] = {}
    for key in spec.space:
        parts = key.split(".")
        if parts[0] == "stages" and len(parts) == 4 and parts[2] == "mix":
            searched.setdefault(parts[1], []).append(parts[3])
    return searched


def _check_shares_leave_a_task(spec: SearchSpec, base: Curriculum, file: str) -> None:
    """Searched shares of a stage's mix leave one of its tasks out, which takes what they leave
    (`overrides.blend`): with every weighted task searched (or the only one), the drawn shares
    would be rescaled behind the values MLflow records. PBT refuses this alike."""
    for name, tasks in _searched_shares(spec).items():
        stage = next((s for s in base.stages if s.name == name), None)
        if stage is not None and takes_every_task(stage, tasks):
            trained = ", ".join(sorted(_weighted(stage)))
            raise ConfigError(f"stage {name!r} of the base trains only {trained}, which the space searches, so the "
                              "drawn shares would be rescaled to sum to 1 behind the values recorded; leave one "
                              "task of the stage's mix out of the space to take the rest (give the base's mix that "
                              "task if it has none)",
                              field=f"space.stages.{name}.mix.{tasks[0]}", file=file)


def _check_shares_sum(spec: SearchSpec, file: str) -> None:
    """Searched shares of a stage's mix sum to at most 1, or they would be rescaled behind the
    values recorded; checked once each share's values are known to be valid."""
    for name, tasks in _searched_shares(spec).items():
        most = sum(max(float(v) for v in spec.space[f"stages.{name}.mix.{task}"].probes()) for task in tasks)
        if len(tasks) > 1 and most > 1:
            raise ConfigError(f"the searched shares of stage {name!r} ({', '.join(tasks)}) can sum to {most:g}, "
                              "past 1, where they would be rescaled behind the values recorded; narrow their "
                              "domains so that their upper ends sum to at most 1",
                              field=f"space.stages.{name}.mix.{tasks[0]}", file=file)


def _weighted(stage: StageSpec) -> list[str]:
    """The tasks a stage trains (a positive weight in its mix)."""
    return [task for task, share in stage.mix.items() if share > 0]


def takes_every_task(stage: StageSpec, tasks: Iterable[str]) -> bool:
    """Whether drawn shares of `tasks` leave no task of the stage's mix to take the rest
    (`overrides.blend` would then rescale them behind the values recorded)."""
    drawn = set(tasks)
    return all(task in drawn for task in _weighted(stage))


def _check_space_key(key: str, domain: Domain, file: str) -> None:
    """Keys a search may not vary whatever the base: a stage's name (every other key, the
    sharing plan and the results address the stage by it), and mix shares outside [0, 1]
    (`apply` trains every share from 1 up on the same mix, while MLflow would record the
    drawn values as if they differed; PBT refuses them alike)."""
    parts, where = key.split("."), f"space.{key}"
    if parts[0] != "stages" or len(parts) < 3:
        return
    if parts[2:] == ["name"]:
        raise ConfigError(f"a search cannot rename stage {parts[1]!r}: keys, results and shared prefixes "
                          "address stages by name; vary the stage's fields instead (or write a base "
                          "curriculum per name)", field=where, file=file)
    if parts[2] == "mix" and len(parts) == 4:
        _check_share(domain, where, file)


def _check_share(domain: Domain, where: str, file: str) -> None:
    """A mix share a search or PBT draws lies in [0, 1]: it is the task's fraction of the stage's
    examples, so every value from 1 up would train the same mix."""
    values = list(domain.args)
    if any(not 0.0 <= v <= 1.0 for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)):
        raise ConfigError(f"a mix share lies in [0, 1] (got {shown(values)}): it is the task's fraction of the "
                          "stage's examples, and every share from 1 up trains the same mix; narrow the "
                          "domain", field=where, file=file)


JOINT_PROBES = 4096  # combinations `_check_joint` tries; each costs ~0.05 ms, so ~0.2 s at most


def joint_probes(space: dict[str, Domain], limit: int = JOINT_PROBES) -> list[dict[str, Any]]:
    """Combinations of every key's probe values (`Domain.probes`): all of them when there are at
    most `limit`, else `limit` drawn with a fixed seed, so a spec validates the same every time."""
    keys = list(space)
    values = [space[k].probes() for k in keys]
    if math.prod(len(v) for v in values) <= limit:
        return [dict(zip(keys, combo)) for combo in itertools.product(*values)]
    rng = random.Random(0)
    return [{k: rng.choice(v) for k, v in zip(keys, values)} for _ in range(limit)]


def _check_joint(space: dict[str, Domain], data: dict[str, Any], file: str) -> None:
    """Values that are valid alone can clash together (min_len 3 with max_len 2); a trial drawing
    them would fail, so the first clashing combination of probes is refused here, cut down to
    the keys that clash: a key is left out where the base's value in its place fails the same way."""
    if len(space) < 2:
        return
    for combo in joint_probes(space):
        error = _invalid(data, combo)
        if error is None:
            continue
        for key in list(combo):  # drop the keys the clash does not need
            rest = {k: v for k, v in combo.items() if k != key}
            if len(rest) > 1 and str(_invalid(data, rest)) == str(error):
                combo = rest
        values = " with ".join(f"{k} = {_shown(v)}" for k, v in combo.items())
        where = error.field if error.field in combo else list(combo)[-1]
        raise ConfigError(f"{values} make the curriculum invalid ({error.field}: {error.message}), though each "
                          f"is valid alone; narrow these domains so that every combination of their ends and "
                          f"choices is valid", field=f"space.{where}", file=file)


def _invalid(data: dict[str, Any], overrides: dict[str, Any]) -> ConfigError | None:
    """Why the base with `overrides` is not a valid curriculum, or None if it is."""
    try:
        parse_curriculum(apply(data, overrides))
    except ConfigError as err:
        return err
    return None


def _shown(value: Any) -> str:
    """A probe value for a message: floats short (an interior probe has many digits)."""
    return f"{value:.6g}" if isinstance(value, float) else shown(value)


def _check_pbt(spec: SearchSpec, base: Curriculum, file: str) -> None:
    """A PBT search: the section and the scheduler go together, nothing else proposes trials, and
    every mutate key is a field of the PBT stage whose domain holds the base's value (so the mix
    shares' lower ends, which the base's shares meet, sum to at most 1, as exploring needs)."""
    pbt, settings = spec.pbt, spec.search
    if settings.scheduler != "pbt":
        if pbt is not None:
            raise ConfigError(f"a pbt: section needs search.scheduler: pbt (got {settings.scheduler!r})",
                              field="search.scheduler", file=file)
        return
    if pbt is None:
        raise ConfigError("scheduler pbt needs a pbt: section with interval_epochs and mutate (the stage "
                          "fields to perturb and their domains)", field="pbt", file=file)
    if "algorithm" in settings.model_fields_set and settings.algorithm != "random":
        raise ConfigError(f"PBT draws its first population at random from pbt.mutate, so algorithm "
                          f"{settings.algorithm!r} has nothing to propose; leave search.algorithm out",
                          field="search.algorithm", file=file)
    if spec.space:
        key = next(iter(spec.space))
        raise ConfigError(f"a PBT search varies only the stage fields in pbt.mutate; move {key!r} there if it "
                          "is one, or drop it", field=f"space.{key}", file=file)
    if spec.seeds is not None:
        raise ConfigError("PBT members all train the base curriculum's seed; remove seeds: (re-train an "
                          "exported lineage on other seeds with iterhead train --seeds)", field="seeds", file=file)
    if settings.num_samples < 2:
        raise ConfigError(f"a population needs at least 2 members, or none can copy another (got "
                          f"{settings.num_samples})", field="search.num_samples", file=file)
    training = [s.name for s in base.stages if s.epochs > 0]
    if not training:
        raise ConfigError("PBT changes the settings of a stage that trains, and every stage of the base has "
                          "epochs: 0; give one stage epochs", field="pbt.stage", file=file)
    name = pbt.stage or training[-1]
    if name not in training:
        message = (f"stage {name!r} of the base has epochs: 0, and PBT changes the settings of a stage that "
                   f"trains; name one of {', '.join(training)}, or give it epochs"
                   if any(s.name == name for s in base.stages) else
                   unknown("stage", name, training, listing="stages that train:"))
        raise ConfigError(message, field="pbt.stage", file=file)
    stage, every = base.stage(name), base.eval.every_epochs
    longest = f"{name}-m{settings.num_samples - 1}-e{stage.epochs}"  # `search.population`'s segment names
    if len(longest) > 64:
        raise ConfigError(f"PBT names the stage's segments like {longest!r}, over the 64 characters a stage "
                          "name may have; shorten the stage's name", field="pbt.stage", file=file)
    clash = next((s.name for s in base.stages if re.fullmatch(rf"{re.escape(name)}-m\d+-e\d+", s.name)), None)
    if clash is not None:
        raise ConfigError(f"stage {clash!r} of the base has the form of the names PBT gives the segments of "
                          f"stage {name!r}; rename it", field="pbt.stage", file=file)
    mutated = {key.split(".", 1)[1] for key in pbt.mutate if key.startswith("mix.")}
    if mutated and takes_every_task(stage, mutated):
        raise ConfigError(f"leave one task of stage {name!r}'s mix out of pbt.mutate: it takes the share the "
                          f"mutated ones leave (with every task mutated, the shares would be rescaled to sum "
                          f"to 1 behind the drawn values)", field="pbt.mutate", file=file)
    if pbt.interval_epochs % every:
        raise ConfigError(f"must be a multiple of the base's eval.every_epochs ({every}), since members are "
                          f"compared at evaluations (got {pbt.interval_epochs})", field="pbt.interval_epochs",
                          file=file)
    if pbt.interval_epochs >= stage.epochs:
        raise ConfigError(f"must be below the epochs of stage {name!r} ({stage.epochs}), or no member ever "
                          f"copies another (got {pbt.interval_epochs})", field="pbt.interval_epochs", file=file)
    data = base.model_dump(mode="json")
    for key, domain in pbt.mutate.items():
        where = f"pbt.mutate.{key}"
        kinds = {"lr": ("uniform", "loguniform", "choice"), "train_modules": ("choice",)}.get(
            key, ("uniform",) if key.startswith("mix.") else None)
        if kinds is None:
            raise ConfigError(unknown("stage field", key, PBT_KEYS, listing="PBT perturbs"), field=where, file=file)
        if domain.kind not in kinds:
            raise ConfigError(f"{key} takes a {' or '.join(kinds)} domain here, not {domain.kind}", field=where,
                              file=file)
        if key.startswith("mix."):
            task = key.split(".", 1)[1]
            if task not in base.tasks:
                raise ConfigError(unknown("task", task, base.tasks, listing="defined tasks:"), field=where, file=file)
            _check_share(domain, where, file)
            value: Any = stage.mix.get(task, 0.0) / sum(stage.mix.values())
        else:
            value = (stage.lr or base.optim.lr) if key == "lr" else stage.train_modules
        for probe in domain.probes():
            try:
                parse_curriculum(apply(data, {f"stages.{name}.{key}": probe}), file=file)
            except ConfigError as err:
                raise ConfigError(f"the value {_shown(probe)} makes the curriculum invalid: {err.field}: {err.message}",
                                  field=where, file=file) from None
        inside = value in domain.args if domain.kind == "choice" else domain.args[0] <= value <= domain.args[1]
        if not inside:
            raise ConfigError(f"stage {name!r} of the base has {key} = {shown(value)}, outside this domain; widen "
                              "the domain to hold it (so that the base's own schedule is one the population "
                              "can find)",
                              field=where, file=file)


def _check_trains(spec: SearchSpec, base: Curriculum, file: str) -> None:
    """Some trial trains: a search whose every stage has epochs 0 at every value of the space
    has nothing to compare, and its horizon (`space.horizon`), ASHA's max_t, would be 0."""
    def most_epochs(stage: StageSpec) -> int:
        domain = spec.space.get(f"stages.{stage.name}.epochs")
        return stage.epochs if domain is None else max(  # as the schema reads them: "2.0" is 2
            StageSpec.model_validate({**stage.model_dump(), "epochs": v}).epochs for v in domain.probes())

    if all(most_epochs(stage) == 0 for stage in base.stages):
        searched = " at every value of the space" if any(k.endswith(".epochs") for k in spec.space) else ""
        raise ConfigError(f"every stage of the base has epochs: 0{searched}, so no trial trains; give a stage "
                          "epochs, or search over one's", field="base", file=file)
