"""Stages with `epochs: 0` in searches: a draw that trains nothing, and how epochs are read.

A search may turn a stage off by drawing 0 epochs for it; a draw that turns every stage off
trains nothing. Such a trial is censored at the search's penalty (it cannot reach the target),
never a failed trial retried by Tune. A real local Ray and a real sqlite MLflow store.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from iterhead.search.cli import main
from iterhead.curricula.data import vocab_for
from iterhead.search.run import SearchOptions, run_search
from iterhead.search.spec import load_search
from iterhead.trainable import results as r
from iterhead.trainable.compute import count_params, flops
from iterhead.trainable.summary import planned_flops

from support import PARITY_BASE, tiny


@pytest.mark.integration
@pytest.mark.parametrize("seeds", [None, [0, 1]], ids=["one-seed", "replicates"])
def test_a_draw_that_trains_no_stage_is_one_censored_trial(ray_local, tmp_path, seeds):
    base = {**PARITY_BASE, "stages": [{"name": "train", "mix": {"parity": 1.0}, "epochs": 1}]}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"name": "zero", "base": "base.yaml", "space": {"stages.train.epochs": {"grid": [0, 1]}},
            "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent": 1, "scheduler": "none"},
            **({"seeds": seeds} if seeds else {})}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rows = run_search(load_search(tmp_path / "spec.yaml"), SearchOptions(uri=uri, storage_path=str(tmp_path / "ray")),
                      out=io.StringIO())
    by_epochs = {row["stages.train.epochs"]: row for row in rows}
    idle, trained = by_epochs[0], by_epochs[1]
    assert idle["status"] == "TERMINATED" and idle["reports"] == 1, idle  # one report, no retries
    assert idle[r.REACHED] == 0.0 and idle[r.FLOPS] == 0.0
    # the search's one penalty: the same value as the trial that trained and did not reach
    assert trained[r.REACHED] == 0.0 and idle[r.COMPUTE_TO_TARGET] == trained[r.COMPUTE_TO_TARGET] > 0
    client = MlflowClient(uri)
    run = client.get_run(idle["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics[r.COMPUTE_TO_TARGET] == idle[r.COMPUTE_TO_TARGET]


def test_a_choice_of_epochs_in_any_form_the_schema_reads_validates(tmp_path, capsys):
    """The check that some trial trains reads each epochs value as the schema does: "2.0" is 2."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(PARITY_BASE))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "base": "base.yaml",
                                    "space": {"stages.train.epochs": {"choice": [1, "2.0"]}},
                                    "search": {"algorithm": "random"}}))
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err


def test_planned_compute_needs_no_array_of_every_sequence():
    """A search plans its penalty from the base's compute before anything starts; an epoch of
    10^9 sequences a length is counted, not built (which would need tens of gigabytes)."""
    cur = tiny()
    d, m = cur.data, cur.model
    n = count_params(m.d_model, m.n_layers, m.mlp_ratio, vocab_for(cur).size)
    every = np.repeat(np.arange(d.min_len, d.max_len + 1), d.train_per_len)
    assert planned_flops(cur) == flops(every, d.cot, n, m.n_layers, m.d_model) * sum(s.epochs for s in cur.stages)
    huge = tiny(data={**d.model_dump(), "train_per_len": 10**9})  # within the 1 TiB a curriculum may take
    # exact integer token counts, then a few float64 products: within a few ulps of the scaled value
    assert math.isclose(planned_flops(huge), planned_flops(cur) * 10**9 / d.train_per_len, rel_tol=1e-12)


def test_a_curriculum_that_trains_no_epoch_is_censored_above_zero(tmp_path, capsys):
    """`iterhead train` of a curriculum whose stages all have 0 epochs logged the penalty 0
    (twice its planned FLOPs), the value a model that met the target untrained reports:
    it is charged one epoch instead."""
    from iterhead.trainable.summary import epoch_flops

    cur = tiny(stages=[{"name": "s", "mix": {"parity": 1.0}, "epochs": 0}])
    (tmp_path / "zero.yaml").write_text(yaml.safe_dump(cur.model_dump(mode="json")))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["train", str(tmp_path / "zero.yaml"), "--tracking-uri", uri]) == 0, capsys.readouterr().err
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name(cur.name).experiment_id])
    assert run.data.metrics[r.REACHED] == 0.0 and run.data.metrics.get(r.FLOPS, 0.0) == 0.0
    assert run.data.metrics[r.COMPUTE_TO_TARGET] == r.CENSOR_FACTOR * epoch_flops(cur) > 0
