"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _torch_threads():
    """Same thread count in every test: CPU results are reproducible at a fixed count."""
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray for one test module: 2 CPUs, no dashboard, a small object store."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=80 * 1024 * 1024)
    yield ray
    ray.shutdown()
