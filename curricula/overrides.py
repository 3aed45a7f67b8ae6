"""Dotted overrides of a curriculum: how a search addresses the fields it varies.

Keys are dotted field paths; stages are addressed by name, never by index:
``optim.lr``, ``seed``, ``stages.pretrain.epochs``, ``stages.finetune.mix.parity``.

A mix weight set this way is a share of the stage's mix: the tasks whose weights were set
keep their values, and the stage's other tasks share what is left (1 minus their sum) in
their original proportions. So ``stages.train.mix.polynomial: 0.3`` on a mix of
``{parity: 1.0}`` trains on 30% polynomial and 70% parity. If the set shares add up to 1 or
more, or no other task is left to take the rest, the set shares alone are normalised to
sum 1 and the other tasks get none.
"""

from __future__ import annotations

import copy
from typing import Any

from iterhead.curricula.errors import ConfigError, shown, unknown


def _stage(data: dict[str, Any], name: str, key: str) -> dict[str, Any]:
    for stage in data.get("stages", []):
        if stage.get("name") == name:
            return stage
    names = [str(s.get("name")) for s in data.get("stages", [])]
    raise ConfigError(unknown("stage", name, names, listing="stages:"), field=key)


def check_key(data: dict[str, Any], key: str) -> None:
    """Raise `ConfigError` unless `key` addresses a field of the curriculum mapping `data`."""
    parts = key.split(".")
    node: Any = data
    start = 0
    if parts[0] == "stages":
        if len(parts) < 3:
            raise ConfigError("address a stage field as stages.<stage name>.<field>", field=key)
        node, start = _stage(data, parts[1], key), 2
        if parts[2] == "mix":
            tasks = list(data.get("tasks", {}))
            if len(parts) != 4:
                raise ConfigError("address a mix weight as stages.<stage>.mix.<task>, a task of: "
                                  f"{', '.join(tasks)}", field=key)
            if parts[3] not in tasks:
                raise ConfigError(unknown("task", parts[3], tasks, listing="defined tasks:"), field=key)
            return
    for i in range(start, len(parts)):
        part, where = parts[i], ".".join(parts[:i]) or "the top level"
        if not isinstance(node, dict):
            raise ConfigError(f"{where} is a single value ({shown(node)}); it has no field {part!r}",
                              field=key)
        if part not in node:
            raise ConfigError(unknown("field", part, node, listing=f"fields of {where}:"), field=key)
        node = node[part]
    if isinstance(node, dict) and node:
        raise ConfigError(f"address a single value, not a whole section (fields: {', '.join(node)})",
                          field=key)


def apply(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of the curriculum mapping `data` with `overrides` set (module docstring)."""
    out = copy.deepcopy(data)
    shares: dict[str, dict[str, float]] = {}
    for key, value in overrides.items():
        check_key(out, key)
        parts = key.split(".")
        if parts[0] == "stages":
            stage = _stage(out, parts[1], key)
            if parts[2] == "mix":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"a mix share must be a number, not {shown(value)}", field=key)
                shares.setdefault(parts[1], {})[parts[3]] = float(value)
                continue
            node, parts = stage, parts[2:]
        else:
            node = out
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    for name, fixed in shares.items():
        stage = _stage(out, name, f"stages.{name}.mix")
        stage["mix"] = blend(stage.get("mix", {}), fixed)
    return out


def blend(mix: dict[str, float], fixed: dict[str, float]) -> dict[str, float]:
    """`mix` with the `fixed` shares set and the other tasks scaled into what is left."""
    rest = {k: float(v) for k, v in mix.items() if k not in fixed and v > 0}
    left = 1.0 - sum(fixed.values())
    if left <= 0 or not rest:
        total = sum(fixed.values())
        return {k: v / total for k, v in fixed.items()} if total > 0 else dict(fixed)
    scale = left / sum(rest.values())
    return {**{k: v * scale for k, v in rest.items()}, **fixed}
