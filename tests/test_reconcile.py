"""`iterhead reconcile` marks crashed runs KILLED and never touches live ones."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from iterhead.search.cli import main

from support import tiny

pytestmark = pytest.mark.integration


def start_train(tmp_path: Path, name: str, epochs: int, uri: str) -> subprocess.Popen:
    # trained on polynomial only while the target is parity: it runs until killed, never stops early
    cur = tiny(name=name, stages=[{"name": "s", "mix": {"polynomial": 1.0}, "epochs": epochs}])
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cur.model_dump(mode="json")))
    env = {**os.environ, "ITERHEAD_HEARTBEAT_S": "0.5"}
    return subprocess.Popen([str(Path(sys.executable).parent / "iterhead"), "train", str(path),
                             "--tracking-uri", uri, "--threads", "1"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def runs_of(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


def wait_for_running(client: MlflowClient, experiment: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        runs = runs_of(client, experiment)
        if runs and runs[0].info.status == "RUNNING" and runs[0].data.tags.get("iterhead.heartbeat"):
            return
        time.sleep(0.2)
    raise AssertionError(f"no live run of {experiment} appeared")


def test_crashed_train_is_marked_and_a_live_one_is_not(tmp_path, capsys, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    client.search_experiments()  # the store, made once before the two writers start
    crashed = start_train(tmp_path, "crashed", 2000, uri)
    live = start_train(tmp_path, "live", 2000, uri)
    try:
        deadline = time.monotonic() + 120
        wait_for_running(client, "crashed", deadline)
        wait_for_running(client, "live", deadline)
        os.killpg(crashed.pid, signal.SIGKILL)
        crashed.wait()
        time.sleep(4)  # the crashed run's heartbeat goes stale; the live one keeps beating
        monkeypatch.setenv("ITERHEAD_HEARTBEAT_S", "0.5")  # the runs' interval: --stale-after may be 3 s
        assert main(["reconcile", "--tracking-uri", uri, "--stale-after", "3"]) == 0
        assert runs_of(client, "crashed")[0].info.status == "KILLED"
        assert runs_of(client, "live")[0].info.status == "RUNNING"
        assert "1 run(s) marked KILLED" in capsys.readouterr().out
    finally:
        for proc in (crashed, live):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_a_stale_search_takes_its_trial_runs_with_it_a_live_one_keeps_them(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("s")
    now = int(time.time())
    runs = {}
    for name, beat in (("stale", now - 3600), ("live", now)):
        parent = client.create_run(exp, tags={"iterhead.kind": "search", "iterhead.heartbeat": str(beat)})
        child = client.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id, "iterhead.trial_id": name})
        runs[name] = (parent.info.run_id, child.info.run_id)
    other = client.create_run(exp, tags={"not": "ours"}).info.run_id  # another tool's run: never touched
    assert main(["reconcile", "--tracking-uri", uri, "--experiment", "s"]) == 0
    status = {r.info.run_id: r.info.status for r in client.search_runs([exp])}
    assert [status[r] for r in runs["stale"]] == ["KILLED", "KILLED"]
    assert [status[r] for r in runs["live"]] == ["RUNNING", "RUNNING"]
    assert status[other] == "RUNNING"


def test_seed_runs_of_a_live_search_are_kept_and_of_a_dead_one_killed(tmp_path):
    """Seed runs sit two levels below the search run whose heartbeat speaks for them."""
    from iterhead.search.reconcile import reconcile
    from iterhead.search.tracking import HEARTBEAT_TAG

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("nested")
    later = time.time() + 1000  # every run started long before `now`; only the heartbeat is fresh
    search = client.create_run(exp, tags={"iterhead.kind": "search", HEARTBEAT_TAG: str(later)}).info.run_id
    config = client.create_run(exp, tags={"iterhead.kind": "configuration", "iterhead.trial_id": "t",
                                          "mlflow.parentRunId": search}).info.run_id
    seed = client.create_run(exp, tags={"iterhead.kind": "seed", "iterhead.trial_id": "t",
                                        "mlflow.parentRunId": config}).info.run_id
    assert reconcile(client, ["nested"], now=later) == []
    marked = reconcile(client, ["nested"], now=later + 1000)  # the search's heartbeat went stale
    assert {(m.run_id, m.what) for m in marked} == {(search, "search"), (config, "configuration"), (seed, "seed")}
    assert all(client.get_run(x).info.status == "KILLED" for x in (search, config, seed))


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "0", "59"])
def test_a_stale_after_that_is_no_number_of_seconds_exits_2(tmp_path, capsys, value):
    """NaN compares false with everything: it passed `< 0` and would have marked nothing."""
    assert main(["reconcile", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--stale-after", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--stale-after" in err[0]


@pytest.mark.parametrize("command", ["reconcile", "train", "search"])
@pytest.mark.parametrize("value", ["abc", "nan", "inf", "0", "-1"])
def test_a_heartbeat_interval_that_is_no_number_of_seconds_exits_2(tmp_path, capsys, monkeypatch, command, value):
    """Reconcile's staleness bound and each beat's wait come from it: checked before a store or a
    run is made, not a traceback (or a run that beats without pause) once a run exists."""
    from iterhead.search import run

    from support import PARITY_BASE, no_ray

    monkeypatch.setattr(run, "start_ray", no_ray)
    monkeypatch.setenv("ITERHEAD_HEARTBEAT_S", value)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(PARITY_BASE))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"name": "s", "base": "base.yaml"}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    if command == "reconcile":
        MlflowClient(uri).search_experiments()  # a store to reconcile
        capsys.readouterr()
    given = {"reconcile": [], "train": [str(tmp_path / "base.yaml")], "search": [str(tmp_path / "spec.yaml")]}
    assert main([command, *given[command], "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ITERHEAD_HEARTBEAT_S: "), err
    assert (tmp_path / "mlflow.db").exists() == (command == "reconcile")


def test_without_experiment_names_every_experiment_is_read_page_by_page(tmp_path):
    """A store answers one search with a page of experiments (1000 by default); reconcile reads
    all of them, not the first page."""
    from mlflow import MlflowClient

    from iterhead.search.reconcile import all_experiments

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    made = {client.create_experiment(f"e{i}", artifact_location=(tmp_path / "mlruns").as_uri()) for i in range(5)}
    found = {exp.experiment_id for exp in all_experiments(client, page=2)}
    assert made <= found and len(found) == 6  # and the Default experiment


def test_runs_are_read_page_by_page_so_a_live_search_keeps_its_trials(tmp_path, monkeypatch):
    """One MLflow search returns at most `RUNS_PAGE` runs (50,000 in MLflow). Reconcile, export
    and the summary read every page: a live search's parent missing from a first page would
    make its RUNNING trials look orphaned, and reconcile would mark them KILLED."""
    from iterhead.search import export, tracking
    from iterhead.search.reconcile import reconcile
    from iterhead.trainable import results as r

    monkeypatch.setattr(tracking, "RUNS_PAGE", 2)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("e", artifact_location=(tmp_path / "mlruns").as_uri())
    parent = client.create_run(exp, tags={r.KIND: r.KIND_SEARCH, r.HEARTBEAT_TAG: str(time.time())}).info.run_id
    for seed in range(5):
        client.create_run(exp, tags={r.KIND: r.KIND_SEED, r.PARENT_RUN: parent, r.SEED: str(seed)})
    assert len(client.search_runs([exp], max_results=2)) == 2  # one search gives one page
    assert reconcile(client, ["e"]) == []  # every trial's parent is found, alive
    assert len(export.child_runs(client, exp, parent)) == 5
    assert [s.seed for s in export.seed_runs(client, exp, {parent})[parent]] == list(range(5))
