"""The paper's experiments, shipped as searches: each validates and runs at smoke size."""

from __future__ import annotations

import io
import math

import pytest
from mlflow import MlflowClient

from iterhead.search.cli import main
from iterhead.search.run import SearchOptions, run_search
from iterhead.search.spec import load_search

from support import ROOT

pytestmark = pytest.mark.integration
SPECS = sorted((ROOT / "examples" / "paper").glob("[0-9]_*.yaml"))
CPU_SPECS = sorted((ROOT / "examples" / "paper" / "cpu").glob("[0-9]_*.yaml"))
MID_SPECS = sorted((ROOT / "examples" / "paper" / "mid").glob("[0-9]_*.yaml"))


ALL = SPECS + MID_SPECS + CPU_SPECS
# The full-size tier is the GPU one; at smoke size its searches take the same path as the two
# CPU tiers' (only the base differs), so CI smoke-runs those two and `pytest -m slow` all three.
SMOKE_RUNS = [pytest.param(p, marks=pytest.mark.slow) for p in SPECS] + MID_SPECS + CPU_SPECS


def ident(path) -> str:
    return f"{path.parent.name}/{path.stem}"


@pytest.mark.parametrize("specs", [SPECS, MID_SPECS, CPU_SPECS], ids=["full", "mid", "cpu"])
def test_five_experiments_are_shipped(specs):
    assert [p.name[0] for p in specs] == ["1", "2", "3", "4", "5"]


@pytest.mark.parametrize("spec", ALL, ids=ident)
def test_validates(spec):
    assert main(["validate", str(spec)]) == 0


@pytest.mark.parametrize("spec", SMOKE_RUNS, ids=ident)
def test_runs_at_smoke_size(spec, ray_local, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    loaded = load_search(spec)
    rows = run_search(loaded, SearchOptions(uri=uri, storage_path=str(tmp_path / "ray"), smoke=True),
                      out=io.StringIO())
    grids = [d for d in loaded.spec.space.values() if d.kind == "grid"]
    expected = math.prod(min(2, len(d.grid)) for d in grids) if grids else 2  # smoke: 2 values a grid
    assert len(rows) == expected and all(r["status"] == "TERMINATED" for r in rows)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(loaded.spec.name).experiment_id])
    kinds = [r.data.tags.get("iterhead.kind") for r in runs]
    assert loaded.spec.seeds == [0, 1, 2]  # the shipped experiments score configurations over seeds
    assert kinds.count("configuration") == expected and kinds.count("seed") == 2 * expected  # smoke: 2 seeds
    assert all(r.info.status == "FINISHED" for r in runs)
    drawn = {row["trial_id"]: row for row in rows}  # as the terminal and trials.csv show them, before the cut
    for run in (x for x in runs if x.data.tags.get("iterhead.kind") == "configuration"):
        row = drawn[run.data.tags["iterhead.trial_id"]]
        assert {k: run.data.tags.get(f"iterhead.drawn.{k}") for k in loaded.spec.space} == \
            {k: str(row[k]) for k in loaded.spec.space}
