"""RunWriter against a real sqlite store: ordered writes, and failed writes never vanish."""

from __future__ import annotations

import json
import os
import time

import pytest
from mlflow import MlflowClient

from iterhead.search.tracking import RunWriter

from support import no_ray


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


def test_an_evaluation_is_stamped_when_it_is_logged_not_when_the_writer_gets_to_it(tmp_path):
    """The writer is a background thread; a store busy for a second must not move the
    evaluation's wall time on MLflow's time axis by that second."""
    import threading

    from iterhead.search.train import LoggedRun
    from iterhead.trainable.loop import Evaluation

    from support import tiny

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    writer = RunWriter(uri)
    logged = LoggedRun(writer, tiny(), "w", {}, "r")
    busy = threading.Event()
    writer.submit(busy.wait, 60)  # the store is busy until the evaluation below is logged
    before_ms = time.time() * 1000
    logged.log(Evaluation(0, "pretrain", 1, {"m": 1.0}))
    after_ms = time.time() * 1000
    time.sleep(0.5)  # the writer gets to it half a second later, at the earliest
    busy.set()
    logged.status = "FINISHED"
    logged.end()
    writer.close()
    [metric] = MlflowClient(uri).get_metric_history(logged.run.result(), "m")
    assert before_ms - 1 <= metric.timestamp <= after_ms  # milliseconds, truncated


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


def interrupted_search(started, uri: str):
    """A search's saved state in ``started/runs`` (as an interrupted search leaves it), tracked in
    `uri` with its parent run in the store ``started/mlflow.db``; its spec file and its state."""
    import json

    import yaml

    from support import PARITY_BASE

    client = MlflowClient(f"sqlite:///{started}/mlflow.db")
    exp = client.create_experiment("moved", artifact_location=(started / "mlruns").as_uri())
    parent = client.create_run(exp, run_name="search:moved", tags={"iterhead.kind": "search"}).info.run_id
    folder = started / "runs" / "moved-20250101-000000"
    folder.mkdir(parents=True)
    state = {"parent_run_id": parent, "uri": uri, "state": "running", "base": PARITY_BASE, "budget": None,
             "smoke": False, "penalty": 1e12}  # as a search saves it (`run.run_search`)
    (folder / "iterhead-search.json").write_text(json.dumps(state))
    (started / "base.yaml").write_text(yaml.safe_dump(PARITY_BASE))
    (started / "spec.yaml").write_text(yaml.safe_dump({
        "name": "moved", "base": "base.yaml", "space": {"stages.train.epochs": {"grid": [1]}},
        "search": {"algorithm": "grid", "num_samples": 1, "scheduler": "none"}, "resources": {"cpu": 1}}))
    return str(started / "spec.yaml"), state


@pytest.mark.parametrize("relative", [True, False], ids=["relative-uri", "absolute-uri"])
def test_resume_from_another_folder_exits_2_before_ray_and_makes_no_store(tmp_path, capsys, monkeypatch,
                                                                          relative):
    """The default ``sqlite:///mlflow.db`` names another store in another folder: one line saying
    what to do, not MLflow's "Run ... not found" after Ray started, and no empty mlflow.db there."""
    from iterhead.search import run
    from iterhead.search.cli import main

    started, elsewhere = tmp_path / "started", tmp_path / "elsewhere"
    started.mkdir(), elsewhere.mkdir()
    uri = "sqlite:///mlflow.db" if relative else f"sqlite:///{started}/mlflow.db"  # the latter: as saved now
    spec, state = interrupted_search(started, uri)
    monkeypatch.setattr(run, "start_ray", no_ray)  # a tripwire: the check must come first
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()  # MLflow's notes on making the store above
    assert main(["search", spec, "--resume", "--storage-path", str(started / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tracking-uri" in err[0], err
    assert ("run --resume from that folder" if relative else "resume it with that --tracking-uri") in err[0], err
    assert list(elsewhere.iterdir()) == []
    monkeypatch.chdir(started)  # where the store is: the parent run is found
    run.check_parent_run(run.absolute_uri("sqlite:///mlflow.db"), state)


@pytest.mark.parametrize("saved", [None, "", '{"trial_data": ['], ids=["none", "empty", "cut-short"])
def test_a_resume_without_a_readable_tune_state_exits_2_before_ray(tmp_path, capsys, monkeypatch, saved):
    """Tune restores from its newest experiment_state file; one that a SIGKILL left empty made
    Tune start afresh inside the old search. One line naming --resume instead, before Ray."""
    from iterhead.search import run
    from iterhead.search.cli import main

    spec, _ = interrupted_search(tmp_path, f"sqlite:///{tmp_path}/mlflow.db")
    folder = tmp_path / "runs" / "moved-20250101-000000"
    (folder / "experiment_state-2025-01-01_00-00-00.json").write_text('{"trial_data": []}')  # an older one reads
    if saved is not None:
        (folder / "experiment_state-2025-01-01_00-00-09.json").write_text(saved)
    else:
        (folder / "experiment_state-2025-01-01_00-00-00.json").unlink()
    monkeypatch.setattr(run, "start_ray", no_ray)  # a tripwire: the check must come first
    capsys.readouterr()  # MLflow's notes on making the store above
    assert main(["search", spec, "--resume", "--storage-path", str(tmp_path / "runs"),
                 "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume" in err[0], err
    assert ("saved no state" if saved is None else "empty or cut short") in err[0], err
    if saved is not None:  # the older state reads: the line says how to resume from it
        assert "remove it to resume from the one before (experiment_state-2025-01-01_00-00-00.json)" in err[0]


def test_a_resumed_search_whose_parent_run_is_gone_exits_2(tmp_path):
    from iterhead.curricula.errors import ConfigError
    from iterhead.search import run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).create_experiment("other", artifact_location=(tmp_path / "mlruns").as_uri())
    with pytest.raises(ConfigError, match="not in .*restore the store"):
        run.check_parent_run(uri, {"parent_run_id": "0" * 32, "uri": uri})


HOLD = """
import sys, time
from pathlib import Path
from iterhead.search.folder import hold_folder
hold_folder(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(600)
"""


def test_a_resume_while_the_search_still_runs_exits_2_before_ray(tmp_path, capsys, monkeypatch):
    """Its driver holds the folder's lock: a second driver resuming it wrote the same Tune state
    and MLflow runs (configurations trained twice, steps logged twice). A driver killed hard
    leaves no lock behind, so a crashed search resumes at once."""
    import signal
    import subprocess
    import sys

    from iterhead.search import run
    from iterhead.search.cli import main

    spec, _ = interrupted_search(tmp_path, f"sqlite:///{tmp_path}/mlflow.db")
    folder = tmp_path / "runs" / "moved-20250101-000000"
    (folder / "experiment_state-2025-01-01_00-00-00.json").write_text('{"trial_data": []}')
    driver = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout.readline() == "held\n"
        monkeypatch.setattr(run, "start_ray", no_ray)  # a tripwire: the check must come first
        capsys.readouterr()  # MLflow's notes on making the store above
        assert main(["search", spec, "--resume", "--storage-path", str(tmp_path / "runs"),
                     "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--resume: the search in" in err[0] and "is still running" in err[0], err
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    os.close(run.hold_folder(folder))  # released with the process that held it


def test_searches_started_in_one_second_get_a_folder_each(tmp_path, monkeypatch):
    """The name is the start time; it was checked free but made later, after Ray had started, so
    the second of two searches started together failed with FileExistsError."""
    from iterhead.search import folder, run
    from iterhead.search.spec import load_search

    spec, _ = interrupted_search(tmp_path, f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setattr(folder.time, "strftime", lambda fmt: "20260101-000000")
    opts = run.SearchOptions(uri=f"sqlite:///{tmp_path}/mlflow.db", storage_path=str(tmp_path / "new"))
    first, _ = run.search_folder(load_search(spec), opts)
    second, _ = run.search_folder(load_search(spec), opts)
    assert (first.name, second.name) == ("moved-20260101-000000", "moved-20260101-000000x")
    assert first.is_dir() and second.is_dir()


@pytest.mark.parametrize("flags, words", [
    (["--precision", "bf16"], "--precision: the search began with --precision fp32"),
    (["--smoke"], "--smoke: the search began without it"),
    (["--no-share"], "--no-share: the search began without it"),
])
def test_a_resume_with_a_flag_the_search_did_not_start_with_exits_2(tmp_path, capsys, monkeypatch, flags, words):
    """The saved state wins on a resume, so the flag was ignored without a word."""
    from iterhead.search import run
    from iterhead.search.cli import main

    spec, state = interrupted_search(tmp_path, f"sqlite:///{tmp_path}/mlflow.db")
    saved = tmp_path / "runs" / "moved-20250101-000000" / "iterhead-search.json"
    saved.write_text(json.dumps({**state, "precision": "fp32", "smoke": False, "share": True}))
    monkeypatch.setattr(run, "start_ray", no_ray)  # a tripwire: the check must come first
    capsys.readouterr()
    assert main(["search", spec, "--resume", "--storage-path", str(tmp_path / "runs"),
                 "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0] and "leave" in err[0], err


def test_a_resume_skips_a_newer_search_stopped_before_tune_saved_anything(tmp_path):
    """A search stopped right after it began leaves a folder with no Tune state, which no resume
    can use: the older search of that name that Tune did save is the one resumed."""
    import json

    from iterhead.search.folder import search_folder
    from iterhead.search.run import SearchOptions
    from iterhead.search.spec import load_search

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec, state = interrupted_search(tmp_path, uri)
    older = tmp_path / "runs" / "moved-20250101-000000"
    (older / "experiment_state-2025-01-01_00-00-00.json").write_text('{"trial_data": []}')
    newer = tmp_path / "runs" / "moved-20250102-000000"
    newer.mkdir()
    (newer / "iterhead-search.json").write_text(json.dumps(state))  # written after the older one: newer mtime
    folder, found = search_folder(load_search(spec), SearchOptions(uri=uri, storage_path=str(tmp_path / "runs"),
                                                                   resume=True))
    assert folder == older and found == state


def test_a_second_sigterm_does_not_cut_the_stop_the_first_began():
    """Schedulers repeat SIGTERM; the first starts the graceful stop, the others do nothing."""
    import os
    import signal as sig

    from iterhead.search.signals import sigterm_as_ctrl_c

    calls = []
    previous = sig.signal(sig.SIGINT, lambda signum, frame: calls.append(signum))  # as Tune's handler
    try:
        with sigterm_as_ctrl_c() as seen:
            os.kill(os.getpid(), sig.SIGTERM)
            os.kill(os.getpid(), sig.SIGTERM)
        assert seen.is_set() and calls == [sig.SIGINT]
    finally:
        sig.signal(sig.SIGINT, previous)


def test_a_sigterm_passed_on_as_a_plain_keyboardinterrupt_still_exits_as_sigterm():
    """Ray's waits turn an exception a signal handler raised into a plain KeyboardInterrupt; once a
    SIGTERM came, what leaves the block is `Terminated` (exit 143, not Ctrl-C's 130)."""
    import os
    import signal as sig

    from iterhead.search.signals import Terminated, sigterm_as_ctrl_c

    def interrupt(signum, frame):  # as Tune's handler reached through Ray's wait
        raise KeyboardInterrupt()

    previous = sig.signal(sig.SIGINT, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt) as caught:
            with sigterm_as_ctrl_c():
                os.kill(os.getpid(), sig.SIGTERM)
        assert isinstance(caught.value, Terminated)
    finally:
        sig.signal(sig.SIGINT, previous)


def test_a_resume_names_the_edits_it_will_not_train(tmp_path):
    """A resume trains what the search began with: edits to the spec or its base were dropped
    without a word. The one field a resume reads again is not named."""
    import yaml

    from iterhead.search.folder import spec_edits
    from iterhead.search.spec import load_search

    spec, _ = interrupted_search(tmp_path, f"sqlite:///{tmp_path}/mlflow.db")
    began = load_search(spec)
    state = {"base": began.base.model_dump(mode="json"), "search_spec": began.spec.model_dump(mode="json")}
    assert spec_edits(began, state) == {}
    data = yaml.safe_load((tmp_path / "spec.yaml").read_text())
    data["space"]["stages.train.epochs"] = {"grid": [1, 2]}
    data["search"]["checkpoint_every_s"] = 5.0
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["optim"]["lr"] = 0.5
    base["stages"][0]["epochs"] += 1
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    edits = spec_edits(load_search(spec), state)
    name = base["stages"][0]["name"]
    assert edits == {str(tmp_path / "base.yaml"): ["optim.lr", f"stages.{name}.epochs"],
                     spec: ["space.stages.train.epochs.grid"]}, edits
    assert list(spec_edits(load_search(spec), {"base": state["base"]})) == [str(tmp_path / "base.yaml")]


@pytest.mark.parametrize("saved", ["{garbage", "[]", "{}", '{"parent_run_id": "p"}', None, "base", "resources"],
                         ids=["not-json", "list", "empty", "no-uri", "folder", "no-base", "resources-of-text"])
def test_a_resume_whose_saved_state_does_not_read_exits_2_before_ray(tmp_path, capsys, monkeypatch, saved):
    """A damaged iterhead-search.json was a traceback (JSONDecodeError, AttributeError, KeyError,
    IsADirectoryError, pydantic's ValidationError): one line naming the file and what to do
    instead, before Ray."""
    import json

    from iterhead.search import run
    from iterhead.search.cli import main

    spec, state = interrupted_search(tmp_path, f"sqlite:///{tmp_path}/mlflow.db")
    file = tmp_path / "runs" / "moved-20250101-000000" / "iterhead-search.json"
    if saved is None:
        file.unlink()
        file.mkdir()
    elif saved in ("base", "resources"):  # a state that reads, less one field a resume uses, or with it wrong
        edited = {k: v for k, v in state.items() if k != "base"} if saved == "base" else {**state, "resources": {
            "cpu": "one"}}
        file.write_text(json.dumps(edited))
    else:
        file.write_text(saved)
    monkeypatch.setattr(run, "start_ray", no_ray)  # a tripwire: the check must come first
    capsys.readouterr()
    assert main(["search", spec, "--resume", "--storage-path", str(tmp_path / "runs"),
                 "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --resume: {file} does not read as a search's saved state"), err
    assert "move its folder out of" in err[0], err


def test_a_damaged_state_blocks_a_resume_only_where_its_search_could_be_the_one(tmp_path):
    """An older search's damaged state would not be picked even if it read, so the newer search
    resumes; a newer one's might be the search to resume, and picking the older in its place
    would resume the wrong one."""
    from iterhead.curricula.errors import ConfigError
    from iterhead.search.folder import search_folder
    from iterhead.search.run import SearchOptions
    from iterhead.search.spec import load_search

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec, state = interrupted_search(tmp_path, uri)
    good = tmp_path / "runs" / "moved-20250101-000000"
    (good / "experiment_state-2025-01-01_00-00-00.json").write_text('{"trial_data": []}')
    damaged = tmp_path / "runs" / "moved-20240101-000000" / "iterhead-search.json"
    damaged.parent.mkdir()
    (damaged.parent / "experiment_state-2024-01-01_00-00-00.json").write_text('{"trial_data": []}')
    damaged.write_text("{garbage")
    opts = SearchOptions(uri=uri, storage_path=str(tmp_path / "runs"), resume=True)
    then = (good / "iterhead-search.json").stat().st_mtime
    os.utime(damaged, (then - 60, then - 60))  # saved before the good one: a finished older search
    assert search_folder(load_search(spec), opts) == (good, state)
    os.utime(damaged, (then + 60, then + 60))  # saved after it: it may be the search to resume
    with pytest.raises(ConfigError, match=f"{damaged} does not read"):
        search_folder(load_search(spec), opts)
