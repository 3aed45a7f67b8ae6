"""Checkpoints: the trainer's whole state with its curriculum, written atomically.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then
renamed over the target, so a crash mid-write leaves the previous checkpoint intact. It is
loaded with ``weights_only=True``: tensors and plain containers only, no pickled code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

FILENAME = "trainer.pt"


def save(state: dict[str, Any], folder: str | Path) -> Path:
    """Write `state` to ``folder/trainer.pt`` atomically; returns the path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / FILENAME
    fd, tmp = tempfile.mkstemp(prefix=".trainer-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load(folder: str | Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The state saved by `save` in `folder`."""
    return torch.load(Path(folder) / FILENAME, map_location=device, weights_only=True)
