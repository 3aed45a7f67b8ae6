"""The search spec: a base curriculum, a space over its fields, how to search, the budget.

    name: poly-parity-transfer
    base: poly_then_parity.yaml          # relative to this file
    seeds: [0, 1, 2]                     # each configuration trains on every one, scored over them
    space:
      stages.pretrain.epochs: {randint: [0, 60]}         # both ends included
      stages.finetune.mix.polynomial: {uniform: [0.0, 0.5]}   # a share of the mix
      optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
    search: {algorithm: optuna, num_samples: 32, max_concurrent: 4, scheduler: asha, seed: 0}
    budget: {flops: 2.0e14}              # a trial is censored past this compute
    resources: {cpu: 1, gpu: 0.25}       # gpu is ignored where no CUDA device exists

A PBT search (`search/population.py`) has no space; it names the settings of one stage that
change over time, and its population size is `num_samples`:

    search: {scheduler: pbt, num_samples: 8, max_concurrent: 2, seed: 0}
    pbt:
      interval_epochs: 4                 # members are compared, and the worst copy the best, this often
      quantile: 0.25                     # the worst quarter copies the best quarter
      mutate:                            # fields of the stage in force: lr, mix.<task>, train_modules
        mix.polynomial: {uniform: [0.0, 1.0]}
        lr: {loguniform: [1.0e-4, 3.0e-3]}

Checked before anything starts: every domain is well formed (here), every space key
addresses a curriculum field (stages by name), and the curriculum stays valid at each
domain's ends and choices, each key alone and all keys together (`search.spec_checks`), so
a bad space fails in a second, not in the middle of a search. A trial whose values make an invalid curriculum
all the same (an interior value of a range: `model.d_model: {randint: [30, 32]}` with two
heads draws 31) fails alone, with its reason, while the search goes on
(`search.callback`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from iterhead.curricula.errors import ConfigError, shown
from iterhead.curricula.io import parse_curriculum, read_yaml_mapping, validation_error
from iterhead.curricula.schema import Curriculum, Name, Spec
from iterhead.search.spec_checks import check_spec
from iterhead.trainable.results import MAX_BUDGET

MAX_SEEDS = 64  # a configuration's seeds (`seeds:`), and `iterhead train --seeds`

DOMAINS = ("uniform", "loguniform", "randint", "choice", "grid")


class Domain(Spec):
    """Exactly one of: uniform, loguniform, randint ([low, high]); choice, grid ([values])."""

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = None
    grid: list[Any] | None = None

    @model_validator(mode="after")
    def _one(self) -> "Domain":
        given = [k for k in DOMAINS if getattr(self, k) is not None]
        if len(given) != 1:
            got = ", ".join(given) if given else "none"
            raise ValueError(f"give exactly one domain of {', '.join(DOMAINS)} (got {got})")
        kind = given[0]
        value = getattr(self, kind)
        if kind in ("uniform", "loguniform", "randint") and not value[0] < value[1]:
            raise ValueError(f"{kind} needs low < high (got {list(value)})")
        if kind == "randint" and not (-2**63 <= value[0] and value[1] < 2**63 - 1):  # Tune draws up to high + 1
            raise ValueError(f"randint ends must fit in a 64-bit integer (got {list(value)})")
        if kind == "loguniform" and value[0] <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {value[0]})")
        if kind in ("choice", "grid") and not value:
            raise ValueError(f"{kind} needs at least one value (got [])")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DOMAINS if getattr(self, k) is not None)

    @property
    def args(self) -> Any:
        return getattr(self, self.kind)

    def probes(self) -> list[Any]:
        """Values whose curricula must all be valid: the ends, or every listed value.

        Float domains add a non-integral interior point, so a float domain on an integer
        field fails here rather than in every trial.
        """
        if self.kind in ("choice", "grid"):
            return list(self.args)
        low, high = self.args
        if self.kind == "randint":
            return [low, high]
        if self.kind == "loguniform":
            return [low, high, math.exp(math.log(low) + 0.37 * (math.log(high) - math.log(low)))]
        return [low, high, low + 0.37 * (high - low)]


class SearchSettings(Spec):
    algorithm: Literal["optuna", "random", "grid"] = "optuna"
    num_samples: Annotated[int, Field(gt=0, le=100_000)] = 8
    max_concurrent: Annotated[int, Field(gt=0, le=10_000)] = 2
    scheduler: Literal["asha", "none", "pbt"] = "asha"
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0
    grace_fraction: Annotated[float, Field(gt=0, le=1)] = 1 / 9
    reduction_factor: Annotated[float, Field(gt=1)] = 3.0
    max_failures: Annotated[int, Field(ge=0, le=100)] = 2  # retries of a trial that errored
    checkpoint_every_s: Annotated[float, Field(ge=0)] = 30.0  # and at each trial's last evaluation


class PbtSettings(Spec):
    """Population Based Training over the settings of one stage (`search/population.py`)."""

    interval_epochs: Annotated[int, Field(gt=0)]  # members are compared, and the worst copy the best, this often
    quantile: Annotated[float, Field(gt=0, le=0.5)] = 0.25  # the worst quantile copies the best quantile
    resample_probability: Annotated[float, Field(ge=0, le=1)] = 0.25  # explore by a fresh draw, not a nudge
    stage: Name | None = None  # the stage whose settings change over time; default: the last that trains
    mutate: Annotated[dict[str, Domain], Field(min_length=1)]  # stage fields (`spec_checks.PBT_KEYS`) and their domains


class Budget(Spec):
    flops: Annotated[float, Field(gt=0, le=MAX_BUDGET)] | None = None


RAY_UNIT = 1e-4  # the smallest share of a resource Ray schedules: it refused less after the search began


class Resources(Spec):
    cpu: Annotated[float, Field(ge=RAY_UNIT, le=1024)] = 1.0
    gpu: Annotated[float, Field(ge=0, le=64)] = 0.0

    @model_validator(mode="after")
    def _one_gpu(self) -> "Resources":
        if self.gpu > 1:  # `devices.trial_device` trains on the first of the trial's GPUs: more would sit idle
            raise ValueError(f"a trial trains on one GPU or a share of one; set gpu to at most 1 (got {self.gpu:g})")
        return self

    @field_validator("gpu")
    @classmethod
    def _gpu_share(cls, gpu: float) -> float:
        if 0 < gpu < RAY_UNIT:
            raise ValueError(f"Ray schedules GPU shares of at least {RAY_UNIT:g}; set gpu to 0 or at least that "
                             f"(got {gpu:g})")
        return gpu


Seed = Annotated[int, Field(ge=0, lt=2**63)]


class SearchSpec(Spec):
    name: Name
    base: str
    # Replicates: every configuration trains on each of these seeds, and is scored over them.
    seeds: Annotated[list[Seed], Field(min_length=1, max_length=MAX_SEEDS)] | None = None
    space: dict[str, Domain] = {}
    search: SearchSettings = SearchSettings()
    budget: Budget = Budget()
    resources: Resources = Resources()
    pbt: PbtSettings | None = None  # with search.scheduler: pbt


class LoadedSearch:
    """A checked spec with its base curriculum, as read from `path`."""

    def __init__(self, spec: SearchSpec, base: Curriculum, base_path: Path, path: Path) -> None:
        self.spec, self.base, self.base_path, self.path = spec, base, base_path, path


def load_search(path: str | Path) -> LoadedSearch:
    """Read and check a search spec and its base curriculum; `ConfigError` on bad input."""
    path = Path(path)
    file = str(path)
    data = read_yaml_mapping(path)
    try:
        spec = SearchSpec.model_validate(data)
    except ValidationError as err:
        raise validation_error(err, SearchSpec, file=file) from None
    try:
        base_path = (path.parent / spec.base).resolve()
        found = base_path.is_file()
    except (OSError, ValueError, RuntimeError) as err:  # a name too long, a NUL byte, a symlink loop
        raise ConfigError(f"no curriculum file at {shown(spec.base)} ({err})", field="base", file=file) from None
    if not found:
        raise ConfigError(f"no curriculum file at {str(base_path)!r} (base is relative to the spec)",
                          field="base", file=file)
    try:
        base_data = read_yaml_mapping(base_path)
        if is_search_spec(base_data):
            raise ConfigError("it is a search spec, not a curriculum; point base at a curriculum file",
                              file=str(base_path))
        base = parse_curriculum(base_data, file=str(base_path))
    except ConfigError as err:
        raise ConfigError(f"the base curriculum is invalid: {err}", field="base", file=file) from None
    check_spec(spec, base, file)
    return LoadedSearch(spec, base, base_path, path)


SPEC_ONLY = ("base", "space", "search", "pbt", "seeds", "budget", "resources")  # no curriculum has these


def is_search_spec(data: dict[str, Any]) -> bool:
    """Search specs name a base curriculum and its search; curricula never have those fields (a
    spec that forgot `base:` is still read as a spec, and told so)."""
    return any(key in data for key in SPEC_ONLY)
