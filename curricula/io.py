"""Reading and writing curricula as YAML, with one-line errors that name file and field.

YAML is read with a safe loader only (no tags that build Python objects) that also rejects
duplicate keys, which plain PyYAML would silently resolve to the last one, and reads numbers
in exponent form as YAML 1.2 does: PyYAML follows YAML 1.1, where ``1e-3`` and ``1.0e3`` are
strings, so ``lr: {choice: [1e-3, 3e-3]}`` was two strings that no float compared equal to.
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from iterhead.curricula.errors import ConfigError, shown, unknown
from iterhead.curricula.schema import BOOL_FOR_NUMBER, Curriculum
from iterhead.curricula.tasks import KINDS


class _StrictSafeLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate mapping keys, and turns a value its tag cannot read into
    a marked error (PyYAML let ``!!int abc`` or ``2020-13-45``, a date to YAML 1.1, escape as a
    Python exception: a traceback)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.tagged: set[int] = set()  # the ids of scalar nodes written with a tag (!!int "90")

    def compose_scalar_node(self, anchor: str | None) -> yaml.ScalarNode:
        tag = self.peek_event().tag
        node = super().compose_scalar_node(anchor)
        if tag not in (None, "!"):
            self.tagged.add(id(node))
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, LookupError, AttributeError, TypeError) as err:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            if not isinstance(node, yaml.ScalarNode):
                what = f"a {'sequence' if isinstance(node, yaml.SequenceNode) else 'mapping'} tagged {tag}"
                raise yaml.constructor.ConstructorError(
                    None, None, f"{what} does not read as one; write it without the tag", node.start_mark) from None
            why = f" ({err})" if tag == "!!timestamp" and str(err) else ""  # month must be in 1..12; not int()'s
            if id(node) in self.tagged:
                problem = (f"{tag} {shown(node.value)} is not a value of its tag{why}; give one it reads, or drop "
                           "the tag and quote it for text")
            else:  # resolved from how it looks, as YAML 1.1 does: 2020-13-45 is a date
                kind = {"!!timestamp": "a date", "!!int": "an integer"}.get(tag, f"a {tag.removeprefix('!!')}")
                problem = f"{shown(node.value)} reads as {kind} in YAML 1.1 but is none{why}; quote it for text"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


MERGE_TAG = "tag:yaml.org,2002:merge"


def _construct_mapping(loader: _StrictSafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == MERGE_TAG:  # `<<: *anchor`: construct_mapping merges it, explicit keys winning
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            continue  # construct_mapping below reports the unhashable key
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictSafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# after YAML 1.1's own float and int patterns, which still read everything they read
EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_StrictSafeLoader.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT_FLOAT, list("-+0123456789."))


OCTAL_1_1 = re.compile(r"[-+]?0[0-7_]+")  # YAML 1.1's octal integers: YAML 1.2 reads them as decimal


def _one_reading(kind: str):
    """YAML 1.1 reads ``1:30`` as the base-60 number 90 (YAML 1.2 as text): a `batch_size: 1:00`
    trained at 60 without a word. Such a value is refused, with its line, as is an integer with a
    leading zero (``seed: 010`` is 8 to YAML 1.1, 10 to YAML 1.2); so is ``!!int "1:30"``,
    which is 90 to YAML 1.1 (quotes do not change what a tag reads) and no int at all to YAML 1.2:
    there, quoting is no way out, so the message does not offer it."""
    construct = yaml.SafeLoader.yaml_constructors[f"tag:yaml.org,2002:{kind}"]

    def construct_one_reading(loader: _StrictSafeLoader, node: yaml.ScalarNode) -> Any:
        if kind == "int" and OCTAL_1_1.fullmatch(str(node.value)):  # 010: 8 to YAML 1.1, 10 to YAML 1.2
            octal, decimal = construct(loader, node), int(str(node.value).replace("_", ""))
            if octal != decimal:  # 07 and 00 read the same either way
                text = "" if id(node) in loader.tagged else ", or quote it for text"
                raise yaml.constructor.ConstructorError(
                    None, None, f"{node.value} is the octal number {octal} in YAML 1.1 (and {decimal} in YAML 1.2); "
                    f"write the number without the leading zero{text}", node.start_mark)
        if ":" not in str(node.value):
            return construct(loader, node)
        value = construct(loader, node)
        if id(node) in loader.tagged:  # quoting keeps the tag's reading: only the number itself will do
            problem = (f"!!{kind} {shown(node.value)} is a base-60 number in YAML 1.1 ({value}) and no number in "
                       f"YAML 1.2; write the number itself, without the tag")
        else:
            problem = (f"{node.value} is a base-60 number in YAML 1.1 ({value}); write the number itself, or quote it "
                       "for text")
        raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark)
    return construct_one_reading


for _kind in ("int", "float"):
    _StrictSafeLoader.add_constructor(f"tag:yaml.org,2002:{_kind}", _one_reading(_kind))


MAX_YAML_BYTES = 16 * 2**20  # far above any curriculum or spec; a bigger file is not one


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a YAML file; `ConfigError` for anything else. Only a regular
    file is read, and only so much of it: a named pipe blocked the read forever, and a device
    such as /dev/zero filled memory."""
    file = str(path)
    try:
        if Path(path).exists() and not (Path(path).is_file() or Path(path).is_dir()):  # a folder: below
            raise ConfigError("not a regular file (a pipe or a device); give a YAML file", file=file)
        with open(path, "rb") as f:
            raw = f.read(MAX_YAML_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"cannot read the file ({err.strerror or err})", file=file) from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"larger than {MAX_YAML_BYTES // 2**20} MiB: not a curriculum or a search spec",
                          file=file)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                          "give a YAML file", file=file) from None
    return parse_yaml_mapping(text, file=file)


def parse_yaml_mapping(text: str, *, file: str = "<string>") -> dict[str, Any]:
    """Parse YAML text that must hold one mapping."""
    try:
        data = yaml.load(text, Loader=_StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = ", ".join(p for p in (err.context, err.problem) if p) or "invalid YAML"
        if "constructor for the tag" in problem:
            problem = (f"the tag {problem.split('tag ')[-1]} is not allowed; "
                       "write plain YAML values (no !! or ! tags)")
        raise ConfigError(f"YAML error at {where}{problem}", file=file) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"YAML error: {str(err).splitlines()[0]}", file=file) from None
    except RecursionError:
        raise ConfigError("YAML error: values are nested too deeply", file=file) from None
    if data is None:
        raise ConfigError("the file is empty; write a mapping of fields", file=file)
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping of fields, not a {type(data).__name__}",
                          file=file)
    return data


def format_loc(loc: tuple[Any, ...]) -> str:
    """``('stages', 1, 'mix', 'x')`` -> ``stages[1].mix.x``; a bad mapping key is ``.key``."""
    out = ""
    for i, part in enumerate(loc):
        if part == "[key]":
            continue
        index = isinstance(part, int) and loc[i + 1:i + 2] != ("[key]",)
        out += f"[{part}]" if index else (f".{part}" if out else str(part))
    return out


def _unwrap(tp: Any) -> Any:
    """`tp` without ``Annotated[...]`` and ``| None``."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
        elif get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp):
            rest = [a for a in get_args(tp) if a is not type(None)]
            tp = rest[0] if len(rest) == 1 else Union[tuple(rest)]
        else:
            return tp


def _type_at(model: type[BaseModel], loc: tuple[Any, ...]) -> Any | None:
    """The schema type at pydantic's `loc`, walking models, lists (an index), dicts (a key) and
    tagged unions (the tag); None where `loc` leaves the schema."""
    tp: Any = model
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            tp = field.annotation
        elif get_origin(tp) is list and isinstance(part, int):
            tp = get_args(tp)[0]
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        elif get_origin(tp) in (Union, types.UnionType):
            tagged = [m for m in get_args(tp) if isinstance(m, type) and issubclass(m, BaseModel)
                      and "kind" in m.model_fields
                      and part in get_args(m.model_fields["kind"].annotation)]
            if len(tagged) != 1:
                return None
            tp = tagged[0]
        else:
            return None
    return _unwrap(tp)


def _allowed_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names allowed where the unknown key at the end of `loc` was found."""
    fields = getattr(_type_at(model, loc[:-1]), "model_fields", None)
    return sorted(fields) if fields else []


def _choices(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """The values a ``Literal`` field at `loc` allows, in the schema's order."""
    tp = _type_at(model, loc)
    return get_args(tp) if get_origin(tp) is Literal else ()


def _message(first: Any, model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, tuple[Any, ...]]:
    """One pydantic error as (message, field loc); every message names the value given."""
    kind = first["type"]
    given = first.get("input")
    if kind == "extra_forbidden":
        return unknown("field", loc[-1], _allowed_fields(model, loc), listing="allowed here:"), loc
    if kind == "missing":
        return "required field is missing", loc
    if kind == BOOL_FOR_NUMBER:
        return first["msg"], loc + tuple(first["ctx"]["where"])
    if kind in ("union_tag_invalid", "union_tag_not_found") and isinstance(given, dict):
        if kind == "union_tag_not_found":
            return f"required field is missing; choose one of {', '.join(KINDS)}", loc + ("kind",)
        return unknown("task kind", given.get("kind"), KINDS), loc + ("kind",)
    choices = _choices(model, loc) if kind == "literal_error" else ()
    if choices:
        return unknown(str(loc[-1]), given, choices), loc
    message = first["msg"].removeprefix("Value error, ")
    if "input" in first and (kind != "value_error" or not isinstance(given, (dict, list))):
        message += f" (got {shown(given)})"
    return message, loc


def validation_error(err: ValidationError, model: type[BaseModel], *, file: str = "") -> ConfigError:
    """The first error of a pydantic `ValidationError` as a one-line `ConfigError`."""
    errors = err.errors()
    message, loc = _message(errors[0], model, tuple(errors[0]["loc"]))
    if len(loc) >= 3 and loc[0] == "tasks" and loc[2] in KINDS:  # drop the union's tag
        loc = loc[:2] + loc[3:]
    more = len(errors) - 1
    if more:
        message += f" (and {more} more error{'s' if more > 1 else ''})"
    return ConfigError(message, field=format_loc(loc), file=file)


def parse_curriculum(data: dict[str, Any], *, file: str = "") -> Curriculum:
    """A checked `Curriculum` from a plain mapping."""
    try:
        cur = Curriculum.model_validate(data)
    except ValidationError as err:
        raise validation_error(err, Curriculum, file=file) from None
    try:
        return cur.check()
    except ConfigError as err:
        raise err.in_file(file) from None


def load_curriculum(path: str | Path) -> Curriculum:
    """Read, parse and check a curriculum YAML file."""
    return parse_curriculum(read_yaml_mapping(path), file=str(path))


def dump_curriculum(cur: Curriculum) -> str:
    """The curriculum as YAML in the input schema, every field written out."""
    return yaml.safe_dump(cur.model_dump(mode="json"), sort_keys=False, default_flow_style=None)


def flatten(cur: Curriculum) -> dict[str, Any]:
    """Dotted field -> value, stages addressed by name (MLflow params, search keys)."""
    data = cur.model_dump(mode="json")
    stages = data.pop("stages")
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        else:
            out[prefix] = value

    walk("", data)
    for stage in stages:
        name = stage.pop("name")
        walk(f"stages.{name}", stage)
    return out
