"""A trial worker SIGKILLed mid-training is retried from its last checkpoint, exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from iterhead.curricula.io import parse_curriculum
from iterhead.trainable import checkpoint
from iterhead.trainable.loop import Trainer

from support import PARITY_BASE

pytestmark = pytest.mark.integration

BASE = {**PARITY_BASE, "stages": [{"name": "train", "mix": {"parity": 1.0}, "epochs": 12}]}  # 3 checkpoints
# before the kill, the rest after it; every epoch is a checkpoint and a store write, so keep it short


def trial_workers(session: int) -> list[int]:
    """Ray processes running a trial of our function trainable, in the driver's session only:
    the Ray that the test's driver started, never another Ray's trials on this machine."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                own = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3]) == session
                if own and (entry / "cmdline").read_bytes().startswith(b"ray::ImplicitFunc.train"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def kill_mid_training(tmp_path, spec: dict) -> tuple[str, list[int], str]:
    """Run the search, SIGKILL its trial worker once checkpoints exist, let Tune retry it."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "name": "fault", "base": "base.yaml", **spec,
        "search": {"algorithm": "random", "num_samples": 1, "max_concurrent": 1, "scheduler": "none",
                   "checkpoint_every_s": 0, "max_failures": 2},
        "resources": {"cpu": 1}}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    driver = subprocess.Popen([str(Path(sys.executable).parent / "iterhead"), "search", "spec.yaml",
                               "--storage-path", "runs", "--tracking-uri", uri, "--num-cpus", "1"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    killed = []
    try:
        deadline = time.monotonic() + 300
        while not killed and time.monotonic() < deadline and driver.poll() is None:
            saved = [int(p.name.split("_")[-1]) for p in tmp_path.glob("runs/*/*/checkpoint_*")]
            if max(saved, default=-1) >= 3:  # mid-training, checkpoints behind (Tune keeps the last 2)
                killed = trial_workers(driver.pid)  # its own session (start_new_session)
                for pid in killed:
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        out, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert killed, "the trial ended before it could be killed"
    assert driver.returncode == 0, out[-3000:]
    assert list(tmp_path.glob("runs/*/*/error.txt"))  # Tune saw the failure and retried
    return uri, killed, out


def assert_same_run(client: MlflowClient, run, straight: Trainer, keys: tuple[str, ...]) -> None:
    """The run's logged history is the uninterrupted trainer's, each step once, exactly."""
    history = [ev.metrics for ev in straight.run()]
    assert run.info.status == "FINISHED"
    for key in keys:
        logged = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in logged] == list(range(len(history)))  # each step once, none missing
        assert [m.value for m in logged] == [h[key] for h in history]  # the same numbers, exactly


def test_killed_trial_resumes_to_the_uninterrupted_result(tmp_path):
    uri, _, _ = kill_mid_training(tmp_path, {})
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("fault")
    (run,) = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mlflow.parentRunId")]
    straight = Trainer(parse_curriculum(BASE), precision=run.data.tags["iterhead.precision"])
    assert_same_run(client, run, straight, ("acc/parity", "loss/train", "compute/flops",
                                            "probe/parity/iteration/l1h0"))
    final = sorted(tmp_path.glob("runs/*/*/checkpoint_*"))[-1]
    weights = checkpoint.load(final)["model"]
    for name, value in straight.model.state_dict().items():
        assert torch.equal(weights[name], value), name


def test_killed_replicate_trial_resumes_every_seed_exactly(tmp_path):
    """A trial of two seeds killed mid-way: both seeds' runs and weights are the uninterrupted ones."""
    seeds = [0, 1]
    uri, _, _ = kill_mid_training(tmp_path, {"seeds": seeds})
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("fault")
    runs = client.search_runs([exp.experiment_id])
    by_seed = {int(r.data.tags["iterhead.seed"]): r for r in runs if r.data.tags.get("iterhead.kind") == "seed"}
    assert sorted(by_seed) == seeds
    final = checkpoint.load(sorted(tmp_path.glob("runs/*/*/checkpoint_*"))[-1])
    for i, seed in enumerate(seeds):
        precision = by_seed[seed].data.tags["iterhead.precision"]
        straight = Trainer(parse_curriculum({**BASE, "seed": seed}), precision=precision)
        assert_same_run(client, by_seed[seed], straight, ("acc/parity", "loss/train", "compute/flops"))
        for name, value in straight.model.state_dict().items():
            assert torch.equal(final["seeds"][i]["model"][name], value), (seed, name)
