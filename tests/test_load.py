"""Eight trials at once against one sqlite store, two of them diverging: no row lost or doubled."""

from __future__ import annotations

import io

import pytest
import yaml
from mlflow import MlflowClient

from iterhead.search.cli import main
from iterhead.search.run import SearchOptions, run_search
from iterhead.search.spec import load_search

from support import PARITY_BASE

pytestmark = pytest.mark.integration

LRS = [1.0e-3, 2.0e-3, 3.0e-3, 4.0e-3, 5.0e-3, 6.0e-3, 1.0e10, 2.0e10]  # the last two diverge


@pytest.fixture(scope="module")
def eight(ray_local, tmp_path_factory):
    folder = tmp_path_factory.mktemp("load")
    base = {**PARITY_BASE, "stages": [{"name": "train", "mix": {"parity": 1.0}, "epochs": 12}],
            "target": {"task": "parity", "accuracy": 0.3}}  # healthy trials reach it
    (folder / "base.yaml").write_text(yaml.safe_dump(base))
    (folder / "spec.yaml").write_text(yaml.safe_dump({
        "name": "eight", "base": "base.yaml", "space": {"optim.lr": {"grid": LRS}},
        "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent": 8, "scheduler": "asha",
                   "grace_fraction": 0.5},
        "resources": {"cpu": 0.25}}))
    uri = f"sqlite:///{folder}/mlflow.db"
    rows = run_search(load_search(folder / "spec.yaml"),
                      SearchOptions(uri=uri, storage_path=str(folder / "ray")), out=io.StringIO())
    return folder, uri, rows


def test_every_report_is_one_row(eight):
    _, uri, rows = eight
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("eight")
    children = {r.data.tags["iterhead.trial_id"]: r for r in client.search_runs([exp.experiment_id])
                if r.data.tags.get("mlflow.parentRunId")}
    assert len(rows) == 8 and len(children) == 8
    for row in rows:
        run = children[row["trial_id"]]
        assert run.info.status == "FINISHED"
        for key in ("compute/flops", "compute/examples"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert len(steps) == len(set(steps)) == row["reports"], (row["trial_id"], key)


def test_divergence_is_an_outcome_not_an_error(eight):
    folder, uri, rows = eight
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("eight")
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mlflow.parentRunId")]
    diverged = [r for r in runs if float(r.data.params["optim.lr"]) >= 1.0e10]
    healthy = [r for r in runs if float(r.data.params["optim.lr"]) < 1.0e10]
    assert len(diverged) == 2 and all(r.data.metrics["diverged"] == 1.0 for r in diverged)
    assert all(r.data.metrics["reached"] == 0.0 for r in diverged)
    penalties = {r.data.metrics["compute_to_target"] for r in diverged}
    reached = [r.data.metrics["compute_to_target"] for r in healthy if r.data.metrics["reached"] == 1.0]
    assert len(penalties) == 1 and max(reached) < penalties.pop() < 1e300  # one finite penalty, above all
    assert all(r.data.metrics["diverged"] == 0.0 and "acc/parity" in r.data.metrics for r in healthy)
    assert all(r["status"] == "TERMINATED" for r in rows)  # no trial errored, no retry spent
    assert sum(r.data.metrics["reached"] for r in healthy) >= 1
    top = folder / "top"
    assert main(["export", "--experiment", "eight", "--tracking-uri", uri, "--top-k", "8", "-o", str(top)]) == 0
    files = list(top.glob("*.yaml"))
    assert files and all(float(yaml.safe_load(f.read_text())["optim"]["lr"]) < 1.0e10 for f in files)
