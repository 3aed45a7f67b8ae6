"""`iterhead search --address` on a two-node Ray cluster started here with `ray start`: trials
run on both nodes, and one starts from a shared prefix that the other node trained.

Slow (a minute): run with `make test-slow` or `pytest -m slow tests/test_cluster.py`.
It stops only the processes it started: each `ray start --block` runs in a process group
of its own, and only those groups are signalled (never `ray stop`, which would end every
Ray on the machine).
"""

from __future__ import annotations

import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from iterhead.trainable import results as r

from support import PARITY_BASE, alive, free_port

pytestmark = pytest.mark.slow


def stop(group: subprocess.Popen) -> None:
    """End one `ray start --block` and its node: TERM, then KILL, to its own group only."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(group.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while alive(group.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not alive(group.pid):
            group.wait(timeout=5)
            return


def test_search_spreads_trials_over_both_nodes(tmp_path):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # `ray start` clusters use token authentication
    port = free_port()
    common = ["--num-cpus", "1", "--block"]
    ray_tmp = tempfile.mkdtemp(prefix="ih-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    head = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--port", str(port),
                             "--include-dashboard=false", "--temp-dir", ray_tmp, *common],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    groups = [head]
    try:
        time.sleep(5)
        assert head.poll() is None, head.stdout.read()[-3000:]
        worker = subprocess.Popen([str(bin_dir / "ray"), "start", "--address", f"127.0.0.1:{port}", *common],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        groups.append(worker)
        (tmp_path / "base.yaml").write_text(yaml.safe_dump(PARITY_BASE))
        (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
            "name": "on-cluster", "base": "base.yaml",
            "space": {"stages.train.epochs": {"grid": [20, 21, 22, 23]}},
            "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent": 2, "scheduler": "none"},
            "resources": {"cpu": 1}}))
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        deadline = time.monotonic() + 60
        while True:  # wait for both nodes
            probe = subprocess.run([str(bin_dir / "python"), "-c",
                                    f"import ray; ray.init(address='127.0.0.1:{port}', log_to_driver=False); "
                                    "print(sum(n['Alive'] for n in ray.nodes()))"],
                                   env=env, capture_output=True, text=True, timeout=60)
            if probe.stdout.strip().endswith("2") or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert probe.stdout.strip().endswith("2"), probe.stdout + probe.stderr
        search = subprocess.run([str(bin_dir / "iterhead"), "search", "spec.yaml", "--address", f"127.0.0.1:{port}",
                                 "--tracking-uri", uri, "--storage-path", str(tmp_path / "results")],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert search.returncode == 0, search.stdout[-3000:] + search.stderr[-3000:]
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("on-cluster")
        children = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mlflow.parentRunId")]
        assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
        assert len({c.data.tags["ray.node_id"] for c in children}) == 2  # trials ran on both nodes
        # Sharing is on: the trials' curricula nest (20 epochs are the start of 21, ...), so the
        # two that start together on the two nodes share, and one starts from a prefix the other
        # node trained (the store is in the storage folder both nodes reach).
        forked = [(c.data.tags[r.PREFIX_TAG], c.data.tags[r.NODE_TAG]) for c in children if r.PREFIX_TAG in c.data.tags]
        assert forked, search.stdout[-2000:]
        assert any(f" on node {node}," not in source for source, node in forked), forked
    finally:
        for group in reversed(groups):
            stop(group)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not any(alive(g.pid) for g in groups)
