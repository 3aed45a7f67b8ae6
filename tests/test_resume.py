"""A search whose driver is SIGKILLed or SIGTERMed resumes with `--resume` into the same MLflow runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from iterhead.trainable.results import THREADS_TAG, TRIAL_ENDS

from support import PARITY_BASE, alive

pytestmark = pytest.mark.integration

EPOCHS = [3, 30, 40, 50]


def iterhead(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "iterhead"), *args]


def forget_ends(folder: Path) -> int:
    """Drop Tune's `done` and the trials' own end mark from the last results of the TERMINATED
    trials in Tune's newest saved state, as a state saved by an earlier version in the race
    `outcome.ended` describes holds them; how many trials it changed."""
    path = sorted(folder.glob("*/experiment_state-*.json"))[-1]
    state = json.loads(path.read_text())
    changed = 0
    for pair in state["trial_data"]:
        meta = json.loads(pair[1])
        if json.loads(pair[0])["status"] == "TERMINATED":
            meta["last_result"] = {k: v for k, v in meta["last_result"].items() if k not in ("done", TRIAL_ENDS)}
            pair[1], changed = json.dumps(meta), changed + 1
    path.write_text(json.dumps(state))
    return changed


SLOW = pytest.mark.slow  # about 40 s each: `make test-slow`; the default tier's two cover a SIGKILL and a SIGTERM


@pytest.mark.parametrize("seeds, sig, older", [pytest.param(None, signal.SIGKILL, False, marks=SLOW),
                                               ([0, 1], signal.SIGKILL, False), (None, signal.SIGTERM, False),
                                               pytest.param(None, signal.SIGTERM, True, marks=SLOW)],
                         ids=["one-seed-trials", "replicates", "sigterm", "sigterm-state-of-an-earlier-version"])
def test_stopped_search_resumes_into_the_same_runs(tmp_path, seeds, sig, older):
    """SIGKILL (the driver and its Ray at once) or SIGTERM (a batch scheduler's stop, to the
    driver alone: a graceful stop, as Ctrl-C gives), then `--resume`; also from a saved state
    whose finished trials say neither `done` nor their end (`folder.ended_before`)."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(PARITY_BASE))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "name": "resumable", "base": "base.yaml", **({"seeds": seeds} if seeds else {}),
        "space": {"stages.train.epochs": {"grid": EPOCHS}},
        "search": {"algorithm": "grid", "num_samples": 1, "scheduler": "none",
                   # SIGTERM: a third trial waits for a CPU, pending, and is still waiting at the stop
                   "max_concurrent": 3 if sig == signal.SIGTERM else 2},
        "resources": {"cpu": 1}}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["search", "spec.yaml", "--storage-path", "runs", "--tracking-uri", uri, "--num-cpus", "2"]
    driver = subprocess.Popen(iterhead(*args), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    seen = []
    for line in driver.stdout:
        seen.append(line)
        if " finished:" in line:  # the first trial is done; the others are mid-training
            if sig == signal.SIGKILL:
                os.killpg(driver.pid, signal.SIGKILL)
            else:
                driver.send_signal(sig)
            break
    seen += driver.stdout.readlines()
    driver.wait(timeout=120)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("resumable")
    before = client.search_runs([exp.experiment_id])
    if sig == signal.SIGKILL:
        assert driver.returncode == -signal.SIGKILL, "".join(seen)
        assert any(r.info.status == "RUNNING" for r in before)  # what a killed driver leaves behind
        assert list(tmp_path.glob("runs/*/artifacts/iterhead-artifacts-*/*/curriculum.yaml"))  # the finished
        # trial's copied artifacts wait in the search's own folder, not in the machine's temp folder
    else:
        assert driver.returncode == 128 + signal.SIGTERM, "".join(seen)
        assert "--resume" in "".join(seen) and not alive(driver.pid)  # Ray went with the driver
        assert "Tuner.restore" not in "".join(seen)  # Tune's own hint would resume outside iterhead's runs
        status = {r.info.status for r in before if r.data.tags.get("iterhead.kind") != "search"}
        assert status == {"FINISHED", "KILLED"}, status  # the finished trial, and those it stopped
        assert [r.info.status for r in before if r.data.tags.get("iterhead.kind") == "search"] == ["KILLED"]
        text = "".join(seen)
        table = [row for row in text[text.index("by compute_to_target:"):].splitlines()[2:] if row.startswith("  ")]
        # every trial's searched value, also of the one waiting for a CPU at the stop (it never reported)
        assert len(table) >= 3 and all(int(row.split(" | ")[1]) in EPOCHS for row in table), text[-3000:]

        if older:
            assert forget_ends(tmp_path / "runs") >= 1
        # a resume trains as the search began, whatever the spec says now: one torch thread a trial
        spec = yaml.safe_load((tmp_path / "spec.yaml").read_text())
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump({**spec, "resources": {"cpu": 4}}))  # > --num-cpus

    resumed = subprocess.run(iterhead(*args, "--resume"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    notes = [line for line in resumed.stdout.splitlines() if line.startswith("note:")]  # the edit it did not train
    edited = ["note: spec.yaml changed since the search began (resources.cpu); a resume trains what it began "
              "with: run the search without --resume to train the change"]
    assert notes == ([] if sig == signal.SIGKILL else edited), notes

    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("iterhead.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == len(EPOCHS) and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags.get(THREADS_TAG) for r in children} == {"1"}
    if not seeds:
        for child in children:
            epochs = int(child.data.params["stages.train.epochs"])
            for key in ("compute/flops", "acc/parity", "loss/train"):
                steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
                assert sorted(steps) == list(range(epochs)), (key, epochs, sorted(steps))  # each step once
    else:  # a configuration run per trial, a run per seed under each: each step once at both levels
        seed_runs = [r for r in runs if r.data.tags.get("iterhead.kind") == "seed"]
        assert len(seed_runs) == len(EPOCHS) * len(seeds) and len(runs) == 1 + len(children) + len(seed_runs)
        for run in children + seed_runs:
            for key in ("compute/flops", "reached") + (("acc/parity",) if run in seed_runs else ()):
                steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
                assert steps == list(range(len(steps))) and steps, (key, steps)
    parent = parents[0]
    assert parent.data.metrics["trials"] == len(EPOCHS)
    assert list(tmp_path.glob("runs/*/iterhead-search.json")) and not list(tmp_path.glob("runs/*/artifacts"))
    again = subprocess.run(iterhead(*args, "--resume"), cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 2 and "no unfinished search" in again.stderr


@pytest.mark.slow  # a stop and a resume of a 4-trial search, about 40 s: `make test-slow`
def test_resumed_optuna_search_says_nothing_alarming(tmp_path):
    """A search stopped with trials mid-training and trials not started stops and resumes without Tune's
    "Failed to fetch metrics" (the ones not started have no result files yet) or Optuna's "step
    is already reported" (a stopped trial trains again from its start and reports its steps
    again), both harmless (`search.quiet`); and the resumed search's results are whole."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(PARITY_BASE))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "name": "quietly", "base": "base.yaml", "space": {"stages.train.epochs": {"choice": [3, 40]}},
        # 2 CPUs for 4 trials: two wait, pending, at the stop; no checkpoint before a trial's end
        "search": {"algorithm": "optuna", "num_samples": 4, "scheduler": "none", "max_concurrent": 4,
                   "checkpoint_every_s": 600},
        "resources": {"cpu": 1}}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["search", "spec.yaml", "--storage-path", "runs", "--tracking-uri", uri, "--num-cpus", "2"]
    driver = subprocess.Popen(iterhead(*args), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    seen = []
    for line in driver.stdout:
        seen.append(line)
        if " finished:" in line:
            break
    # Optuna's seeded draws give the second trial 3 epochs, so it ends first; the stop waits for a
    # running trial's first metrics in the store (a slow start could leave it none to report again)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("quietly")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(
            "acc/parity" in r.data.metrics and r.data.tags.get("iterhead.kind") != "search"
            for r in client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")):
        time.sleep(0.2)
    driver.send_signal(signal.SIGTERM)
    seen += driver.stdout.readlines()
    assert driver.wait(timeout=120) == 128 + signal.SIGTERM, "".join(seen)
    assert "Failed to fetch metrics" not in "".join(seen)  # Tune's table at the stop, of the same trials
    # what makes both warnings: a trial stopped after it reported (Optuna holds its steps) ...
    stopped = [r for r in client.search_runs([exp.experiment_id]) if r.info.status == "KILLED"
               and r.data.tags.get("iterhead.kind") != "search" and "acc/parity" in r.data.metrics]
    assert stopped, "".join(seen)
    # ... and one Tune had not started when it saved its state (no result files)
    state = sorted(tmp_path.glob("runs/*/experiment_state-*.json"))[-1]
    logged = list(tmp_path.glob("runs/*/train_trial_*/result.json"))
    assert len(json.loads(state.read_text())["trial_data"]) > len(logged), logged

    resumed = subprocess.run(iterhead(*args, "--resume"), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    said = resumed.stdout + resumed.stderr
    assert "Failed to fetch metrics" not in said and "is already reported" not in said, resumed.stderr[-3000:]
    runs = client.search_runs([exp.experiment_id])
    parent, = [r for r in runs if r.data.tags.get("iterhead.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert parent.data.metrics["trials"] == 4
    for child in children:
        epochs = int(child.data.params["stages.train.epochs"])
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "acc/parity")]
        assert sorted(steps) == list(range(epochs)), (epochs, sorted(steps))  # each step once, all of them
