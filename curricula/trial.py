"""The curriculum one trial trains: a search's base, the trial's sampled values (or a PBT
member's lineage), and in a smoke search a tiny size.

Smoke size is applied after the sampled values, so a sampled epoch count or length is cut
too. The driver (`search/run.py`) decides once whether a search is a smoke search; this
function is the one place that says what smoke means, for the trials, for the driver's
MLflow runs and for the scheduler's horizon alike.
"""

from __future__ import annotations

import copy
from typing import Any

from iterhead.curricula.io import parse_curriculum
from iterhead.curricula.overrides import apply
from iterhead.curricula.schema import Curriculum

SMOKE = {"max_len": 4, "train_per_len": 64, "test_per_len": 32, "epochs": 2}
SMOKE_GRID = 2  # a smoke search keeps this many values of each grid
SMOKE_PBT = {"members": 4, "interval_epochs": 1}  # a smoke PBT search: so few members, compared every epoch


def shrink(data: dict[str, Any]) -> dict[str, Any]:
    """A smoke-size copy of a curriculum mapping: short lengths, few rows, two epochs a stage."""
    d = data["data"]
    d["max_len"] = min(d["max_len"], max(d["min_len"], SMOKE["max_len"]))
    d["train_per_len"] = min(d["train_per_len"], SMOKE["train_per_len"])
    d["test_per_len"] = min(d["test_per_len"], SMOKE["test_per_len"])
    for stage in data["stages"]:
        stage["epochs"] = min(stage["epochs"], SMOKE["epochs"])
    data["eval"]["every_epochs"] = 1
    data["eval"]["train_per_len"] = min(data["eval"].get("train_per_len", 0), d["train_per_len"])
    if data["target"].get("min_len") is not None:
        data["target"]["min_len"] = min(data["target"]["min_len"], d["max_len"])
    return data


TRIAL_FILE = "trial"  # what a trial's invalid curriculum names as its file: the search tells it apart by it


def trial_curriculum(base: dict[str, Any], config: dict[str, Any], smoke: bool) -> Curriculum:
    """The curriculum one trial trains: the base with the sampled values (and smoke size); for a
    PBT member (a ``pbt`` config, `search/population.py`) its lineage."""
    if "pbt" in config:
        return lineage(base, config["pbt"], smoke)
    data = apply(base, config)
    return parse_curriculum(shrink(data) if smoke else data, file=TRIAL_FILE)


def lineage(base: dict[str, Any], member: dict[str, Any], smoke: bool) -> Curriculum:
    """A PBT member's curriculum: the (smoke-size) base with its PBT stage replaced by the
    member's segments of it, each an ordinary stage."""
    data = copy.deepcopy(base)
    data = shrink(data) if smoke else data
    names = [s["name"] for s in data["stages"]]
    at = names.index(member["stage"])
    data["stages"][at:at + 1] = copy.deepcopy(member["stages"])
    return parse_curriculum(data, file=TRIAL_FILE)
