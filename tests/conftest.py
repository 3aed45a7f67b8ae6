"""Shared fixtures."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile

import pytest


@pytest.fixture(autouse=True, scope="session")
def _own_ray_temp_folder():
    """Ray's temp state (sessions, sockets, `ray_current_cluster`) in a folder of the tests' own.

    The machine's /tmp/ray is never read or written: a cluster someone left there (or its
    stale address) cannot leak into a test, and no test leaves state behind. The folder is
    short because Ray's unix socket paths must fit in 107 bytes; subprocesses inherit it.
    Processes started from here (Ray's workers, the commands tests run) also make their temp
    folders inside it (TMPDIR): a trial a test kills mid-checkpoint cannot clean up its own.
    """
    folder = tempfile.mkdtemp(prefix="ih-", dir="/tmp")
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_ADDRESS", "TMPDIR")}
    os.environ["RAY_TMPDIR"] = folder
    os.environ["TMPDIR"] = os.path.join(folder, "tmp")
    os.makedirs(os.environ["TMPDIR"])
    os.environ.pop("RAY_ADDRESS", None)  # tests say which Ray they use
    yield folder
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def _torch_threads():
    """Same thread count in every test: CPU results are reproducible at a fixed count."""
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _sigint_as_found():
    """The SIGINT handler as it was before the test: a `Tuner.fit` outside `signals.tune_loop`
    leaves Tune's installed, and a later test's SIGTERM (`signals.sigterm_as_ctrl_c`) went to it."""
    before = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.fixture
def restore_determinism():
    """torch's deterministic-algorithms setting as it was before the test (it is process-wide)."""
    import torch

    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray of this module's own: 2 CPUs, no dashboard, a small object store."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False, object_store_memory=80 * 1024 * 1024)
    yield ray
    ray.shutdown()


@pytest.fixture
def float64():
    """Tensors made during the test default to float64 (restored after).

    Why: batched and separate runs sum the same products in another order. In float32 that
    rounding (about 1e-7 of a gradient's terms) is above Adam's epsilon (1e-8), so Adam
    normalises it into a full-size step on near-zero gradients, and how the runs then drift
    apart depends on the CPU's kernels. In float64 the rounding (about 1e-16) sits far below
    epsilon, so each step differs by at most lr * 1e-16 / 1e-8 = 1e-11 (lr 1e-3), and a
    comparison can hold on every CPU with a tolerance derived from that.
    """
    import torch

    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(saved)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real `mlflow server` (`mlflow_server/start.sh`) for every test that only logs to it,
    since its start takes about 20 s: (url, port, data folder). Tests that stop a server start
    their own."""
    from support import free_port, running_server

    data = tmp_path_factory.mktemp("server")
    port = free_port()
    with running_server(data, port) as (url, _):
        yield url, port, data
