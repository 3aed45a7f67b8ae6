"""The curriculum: one trial's data, model, optimiser and stages, as validated data.

Pydantic checks each field (types, ranges, unknown keys); `Curriculum.check` then checks
what spans fields (mix names defined tasks, stage names unique, ...). Both raise errors
that name the field path, turned into one-line `ConfigError`s by `iterhead.curricula.io`.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from iterhead.curricula.errors import ConfigError, shown, unknown
from iterhead.curricula.tasks import KINDS, Task

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
BOOL_FOR_NUMBER = "bool_for_number"  # the pydantic error type of `Spec._no_bool_for_number`
Name = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_\-]*$", max_length=64)]


def _is_number(tp: Any) -> bool:
    """Whether a field type is int or float (optional or constrained)."""
    if get_origin(tp) is Annotated:
        return _is_number(get_args(tp)[0])
    if get_origin(tp) in (Union, types.UnionType):
        return any(_is_number(a) for a in get_args(tp))
    return tp in (int, float)


def _number_items(tp: Any) -> bool:
    """Whether a field type is a list or tuple of numbers (optional or constrained)."""
    if get_origin(tp) is Annotated:
        return _number_items(get_args(tp)[0])
    if get_origin(tp) in (Union, types.UnionType):
        return any(_number_items(a) for a in get_args(tp))
    return get_origin(tp) in (list, tuple) and any(_is_number(a) for a in get_args(tp) if a is not Ellipsis)


class Spec(BaseModel):
    """Base of every spec: unknown keys are errors, numbers must be finite and be numbers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_for_number(cls, data: Any) -> Any:
        """YAML's true and false are not numbers, though pydantic reads ``epochs: true`` as 1
        (checked for a number field, the values of a mapping of numbers, as mix, and the items
        of a list or tuple of numbers, as seeds).
        The error's ``where`` is the field's path below this model (`io.validation_error`)."""
        for name, value in data.items() if isinstance(data, dict) else ():
            field = cls.model_fields.get(name)
            tp, where = None if field is None else field.annotation, (name,)
            if get_origin(tp) is dict and isinstance(value, dict):
                key = next((k for k, v in value.items() if isinstance(v, bool)), None)
                tp, value, where = get_args(tp)[1], value.get(key), (name, key)
            elif isinstance(value, (list, tuple)) and _number_items(tp):  # seeds, a domain's ends
                at = next((i for i, v in enumerate(value) if isinstance(v, bool)), None)
                tp, value, where = float, None if at is None else value[at], (name, at)
            if isinstance(value, bool) and _is_number(tp):
                raise PydanticCustomError(
                    BOOL_FOR_NUMBER,
                    "a number is needed here, not the boolean {given} (YAML reads true, yes and on so)",
                    {"given": str(value).lower(), "where": where})
        return data


class ModelSpec(Spec):
    d_model: PositiveInt = 128
    n_layers: Annotated[int, Field(gt=0, le=1024)] = 2  # a model's module names are listed: 1e8 hung validate
    n_heads: PositiveInt = 1
    positional: Literal["learned", "rotary"] = "learned"
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    mlp_ratio: PositiveInt = 4


class DataSpec(Spec):
    min_len: PositiveInt = 1
    max_len: Annotated[int, Field(gt=0, le=512)] = 32
    train_per_len: PositiveInt = 1024
    test_per_len: PositiveInt = 1024
    cot: bool = True
    split: Literal["iid", "disjoint"] = "iid"


class ParitySpec(Spec):
    kind: Literal["parity"]


class PolynomialSpec(Spec):
    kind: Literal["polynomial"]
    modulus: Annotated[int, Field(ge=2, le=1000)] = 11


class CopySpec(Spec):
    kind: Literal["copy"]


TaskSpec = Annotated[Union[ParitySpec, PolynomialSpec, CopySpec], Field(discriminator="kind")]


# Adam's first step is lr / (1 - beta1) = 10 x lr, and the weight decay a factor, in float32 (at most
# 3.4e38): a bound far past any rate that trains, with room for rates that make a run diverge on purpose
MAX_LR = 1e30
LearningRate = Annotated[float, Field(gt=0.0, le=MAX_LR)]
# `trainable.results.TARGET_SLACK` (1e-12) below: a smaller target would count as met at accuracy 0
MIN_TARGET = 1e-9


# A batch past an epoch's examples trains the epoch as one batch, so a bound takes nothing; past
# 2**63 numpy's batch offsets turned float and the sampler failed after the run was made.
MAX_BATCH = 2**31 - 1


class OptimSpec(Spec):
    lr: LearningRate = 3.0e-4
    batch_size: Annotated[int, Field(gt=0, le=MAX_BATCH)] = 256
    weight_decay: Annotated[float, Field(ge=0.0, le=MAX_LR)] = 0.0
    # Who draws an epoch's batch order: each seed its own ("seeded"), or one stream shared by
    # every seed ("shared"), which lets batched seeds step through equal shapes unpadded.
    batch_order: Literal["seeded", "shared"] = "seeded"


MAX_MIX_WEIGHT = 1e12  # weights are relative; a bound keeps slots x weight finite (`sampler.shares`)
# Far past any run (a billion epochs); an int of hundreds of digits passed, and the planned FLOPs
# (`summary.planned_flops`) overflowed a float after the search had started.
MAX_EPOCHS = 10**9


class StageSpec(Spec):
    name: Name
    mix: dict[str, Annotated[float, Field(ge=0.0, le=MAX_MIX_WEIGHT)]]
    epochs: Annotated[int, Field(ge=0, le=MAX_EPOCHS)]
    lr: LearningRate | None = None
    train_modules: list[str] | None = None
    # A shared stage: it trains as the run of this seed does (that seed's data, initial
    # weights, batches and dropout), whatever the curriculum's seed, and every replicate seed
    # starts the stages after it from those weights, as the paper's finetunings all start
    # from one pretrained checkpoint. The schedule trains it once for all seeds. Only a
    # leading run of stages, all with one seed, may set it (`Curriculum.check`).
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None


class TargetSpec(Spec):
    task: str
    accuracy: Annotated[float, Field(ge=MIN_TARGET, le=1.0)] = 1.0
    # Score the target over test lengths from this one up (default: every length). Under a
    # disjoint split the shortest lengths hold out one or a few inputs, so their accuracy
    # flips between 0 and 1 and decides a target over all lengths alone.
    min_len: PositiveInt | None = None


class EvalSpec(Spec):
    every_epochs: PositiveInt = 1
    probe_per_len: Annotated[int, Field(ge=0)] = 16
    # Training sequences per length also scored (``train_acc/<task>``): far above ``acc/`` is
    # a model that memorised its training inputs without the algorithm. 0: not scored.
    train_per_len: Annotated[int, Field(ge=0)] = 0
    # fp32 scores every row in float32, whatever the training precision. bf16 scores a bf16
    # pass and rescores the rows near a tie in fp32 (`evaluate.screened_rows`): on the one
    # native-bf16 CPU it was timed on, level with fp32 or slower once a quarter of the rows
    # are near a tie, as in undecided models (BENCHMARKS.md), so it is opt-in.
    precision: Literal["fp32", "bf16"] = "fp32"


class Curriculum(Spec):
    name: Name
    seed: Annotated[int, Field(ge=0, lt=2**63)] = 0
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    tasks: dict[Name, TaskSpec]
    optim: OptimSpec = OptimSpec()
    stages: list[StageSpec]
    target: TargetSpec
    eval: EvalSpec = EvalSpec()

    def check(self) -> "Curriculum":
        """Checks that span fields; raises `ConfigError` naming the field. Returns self."""
        if not self.tasks:
            raise ConfigError("define at least one task", field="tasks")
        if not self.stages:
            raise ConfigError("define at least one stage", field="stages")
        if self.data.max_len < self.data.min_len:
            raise ConfigError(
                f"max_len ({self.data.max_len}) must be >= min_len ({self.data.min_len})",
                field="data.max_len",
            )
        if self.model.d_model % self.model.n_heads:
            raise ConfigError(
                f"d_model ({self.model.d_model}) must be divisible by n_heads ({self.model.n_heads})",
                field="model.d_model",
            )
        if self.model.positional == "rotary" and (self.model.d_model // self.model.n_heads) % 2:
            raise ConfigError("rotary positions need an even head size (got d_model / n_heads = "
                              f"{self.model.d_model // self.model.n_heads})", field="model.positional")
        self._check_size()
        seen: set[str] = set()
        modules = module_names(self.model)
        for i, stage in enumerate(self.stages):
            where = f"stages[{i}]"
            if stage.name in seen:
                raise ConfigError(f"stage name {stage.name!r} is used twice; names must be unique",
                                  field=f"{where}.name")
            seen.add(stage.name)
            for task in stage.mix:
                if task not in self.tasks:
                    raise ConfigError(unknown("task", task, self.tasks, listing="defined tasks:"),
                                      field=f"{where}.mix.{task}")
            if stage.epochs > 0 and sum(stage.mix.values()) <= 0:
                raise ConfigError(f"mix weights must have a positive sum (got {shown(stage.mix)})",
                                  field=f"{where}.mix")
            if stage.train_modules == []:
                raise ConfigError("an empty list trains nothing; name a module, or leave the field out "
                                  "to train them all", field=f"{where}.train_modules")
            for j, module in enumerate(stage.train_modules or []):
                if module not in modules:
                    raise ConfigError(unknown("module", module, sorted(modules),
                                              listing="modules of this model:"),
                                      field=f"{where}.train_modules[{j}]")
        self._check_shared_stages()
        if self.data.split == "disjoint":
            for name, spec in self.tasks.items():
                if len(make_task(spec).alphabet()) < 2:
                    raise ConfigError("a disjoint split needs at least two possible inputs; this task has "
                                      "one (polynomial with modulus 2): use split iid", field=f"tasks.{name}")
        if self.eval.train_per_len > self.data.train_per_len:
            raise ConfigError(f"at most data.train_per_len ({self.data.train_per_len}) training sequences a length "
                              f"can be scored (got {self.eval.train_per_len})", field="eval.train_per_len")
        if self.target.task not in self.tasks:
            raise ConfigError(unknown("task", self.target.task, self.tasks, listing="defined tasks:"),
                              field="target.task")
        low = self.target.min_len
        if low is not None and not self.data.min_len <= low <= self.data.max_len:
            raise ConfigError(f"must be a test length, from data.min_len ({self.data.min_len}) to data.max_len "
                              f"({self.data.max_len}) (got {low})", field="target.min_len")
        return self

    def _check_size(self) -> None:
        """A curriculum whose weights (fp32, with gradients and Adam's two moments: 16 bytes a
        parameter) or data (int64 tokens) would take more than `MAX_BYTES` is a typo: it passed
        validation, then failed in an allocation after the run was made, or hung this check."""
        m, d = self.model, self.data
        weights = 16 * m.n_layers * (4 + 2 * m.mlp_ratio) * m.d_model ** 2
        lengths = d.max_len - d.min_len + 1
        tokens = len(self.tasks) * (d.train_per_len + d.test_per_len) * lengths * (2 * d.max_len + 3)
        for field, size, what in (("model", weights, "weights and optimiser state"), ("data", 8 * tokens, "tokens")):
            if size > MAX_BYTES:
                raise ConfigError(f"its {what} would take about {size / 2**40:.3g} TiB, past {MAX_BYTES // 2**40} "
                                  "TiB; check the sizes for a typo", field=field)

    def _check_shared_stages(self) -> None:
        """Shared stages (`StageSpec.seed`) lead the curriculum and agree on their seed: a stage
        after an unshared one would start from weights that differ between seeds anyway."""
        first = self.stages[0].seed
        for i, stage in enumerate(self.stages):
            if stage.seed is None:
                continue
            if any(s.seed is None for s in self.stages[:i]):
                raise ConfigError("only the first stages can be shared: set seed on every stage before "
                                  f"{stage.name!r} too, or remove it here", field=f"stages[{i}].seed")
            if stage.seed != first:
                raise ConfigError(f"the shared stages train as one run, so they need one seed: use {first} "
                                  f"(the seed of stage {self.stages[0].name!r}) or remove it here",
                                  field=f"stages[{i}].seed")

    def shared_seed(self) -> int | None:
        """The seed of the shared leading stages, or None when no stage is shared."""
        return self.stages[0].seed

    def shared_stages(self) -> int:
        """How many leading stages are shared (`StageSpec.seed`)."""
        return next((i for i, s in enumerate(self.stages) if s.seed is None), len(self.stages))

    def stage(self, name: str) -> StageSpec:
        """The stage called `name` (stages are addressed by name, never by index)."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)


MAX_BYTES = 2**40  # more than any machine that trains these models holds


def module_names(model: ModelSpec) -> set[str]:
    """Dotted names of the model's modules that a stage may train.

    `iterhead.trainable.model.Transformer` builds exactly these; a test keeps the two in step.
    """
    names = {"tok_emb", "ln_f", "head", "blocks"}
    if model.positional == "learned":
        names.add("pos_emb")
    for i in range(model.n_layers):
        names |= {f"blocks.{i}", f"blocks.{i}.ln1", f"blocks.{i}.attn", f"blocks.{i}.ln2",
                  f"blocks.{i}.mlp", f"blocks.{i}.attn.qkv", f"blocks.{i}.attn.proj",
                  f"blocks.{i}.mlp.fc", f"blocks.{i}.mlp.proj"}
    return names


def make_task(spec: ParitySpec | PolynomialSpec | CopySpec) -> Task:
    """The generator and solver for a task spec."""
    params = spec.model_dump(exclude={"kind"})
    return KINDS[spec.kind](**params)
