"""Which Ray a search runs on: the embedded default is always its own, whatever Ray left behind.

A `ray start` cluster killed by SIGKILL (a crash, a reboot) leaves its address in Ray's temp
folder (`ray_current_cluster`); a bare `ray.init()` then tries to join that dead cluster. The
tests recreate that in a temp folder of their own (`RAY_TMPDIR`), never the machine's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from support import PARITY_BASE, free_port

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


@pytest.fixture
def stale_ray_tmp():
    """A Ray temp folder whose `ray_current_cluster` names an address where nothing listens."""
    folder = tempfile.mkdtemp(prefix="ih-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    (Path(folder) / "ray").mkdir()
    (Path(folder) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_bare_ray_init_is_misled_by_the_stale_address(stale_ray_tmp):
    """The situation is real: what iterhead used to do fails there."""
    env = {**os.environ, "RAY_TMPDIR": stale_ray_tmp}
    bare = subprocess.run([str(BIN / "python"), "-c", "import ray; ray.init(num_cpus=1, include_dashboard=False)"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert bare.returncode != 0
    assert "num_cpus and num_gpus must not be provided" in bare.stderr


def test_the_embedded_default_starts_its_own_ray_despite_a_stale_address(stale_ray_tmp, tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**PARITY_BASE, "stages": [
        {"name": "train", "mix": {"parity": 1.0}, "epochs": 2}]}))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "name": "stale", "base": "base.yaml", "space": {"optim.lr": {"loguniform": [1.0e-3, 2.0e-3]}},
        "search": {"algorithm": "optuna", "num_samples": 2, "max_concurrent": 2, "scheduler": "asha"}}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "RAY_TMPDIR": stale_ray_tmp}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([str(BIN / "iterhead"), "search", "spec.yaml", "--num-cpus", "2", "--tracking-uri", uri],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    said = run.stdout + run.stderr  # the terminal is iterhead's: no library boilerplate
    for noise in ("TensorBoard", "Configuration for experiment", "study created", "View detailed results",
                  "Token authentication is enabled", "Creating initial MLflow database"):
        assert noise not in said, noise
    assert "of 2 trials reached the target" in said
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("stale").experiment_id])
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)  # the parent and two trials
    # the embedded Ray wrote its session into the temp folder it was given, and is gone again
    assert list((Path(stale_ray_tmp) / "ray").glob("session_*"))
