"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _torch_threads():
    """Same thread count in every test: CPU results are reproducible at a fixed count."""
    import torch

    torch.set_num_threads(1)
    yield
