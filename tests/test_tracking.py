"""RunWriter against a real sqlite store: ordered writes, and failed writes never vanish."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from iterhead.search.tracking import RunWriter


def test_every_failed_write_is_reported_not_only_the_first(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    writer = RunWriter(uri)
    run = writer.submit(writer.create_run, "w", "ok", {}, {"a": 1}).result()
    writer.submit(writer.log_metrics, run, {"m": 1.0}, 0)
    for _ in range(2):
        writer.submit(writer.log_metrics, "no-such-run", {"m": 1.0}, 0)
    with pytest.raises(Exception) as failed:
        writer.flush()
    assert "no-such-run" in str(failed.value)
    assert any("1 more tracking write(s) failed" in note for note in getattr(failed.value, "__notes__", []))
    writer.submit(writer.log_metrics, run, {"m": 2.0}, 1)  # still usable after the error
    writer.close()
    history = MlflowClient(uri).get_metric_history(run, "m")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 2.0)]


def test_artifacts_go_beside_the_sqlite_file_not_into_the_working_folder(tmp_path, monkeypatch):
    """MLflow's default artifact root is ./mlruns under the process's folder, wherever the store is."""
    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    store.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (elsewhere / "note.txt").write_text("hello\n")
    uri = f"sqlite:///{store}/mlflow.db"
    writer = RunWriter(uri)
    for experiment, folder in (("paper-1", "paper-1"), ("my runs/v2", "my_runs_v2")):  # a free-form name, made safe
        run = writer.submit(writer.create_run, experiment, "r", {}, {}).result()
        writer.submit(writer.log_artifact, run, elsewhere / "note.txt").result()
        saved = list((store / "mlruns" / folder).rglob("note.txt"))
        assert len(saved) == 1 and saved[0].read_text() == "hello\n"
    writer.close()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["note.txt"]
    assert sorted(p.name for p in (store / "mlruns").iterdir()) == ["my_runs_v2", "paper-1"]
