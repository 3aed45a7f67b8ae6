"""Checkpoints: the trainer's whole state with its curriculum, written atomically.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then
renamed over the target, so a crash mid-write leaves the previous checkpoint intact. It is
loaded with ``weights_only=True``: tensors and plain containers only, no pickled code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

if TYPE_CHECKING:
    import torch

FILENAME = "trainer.pt"


def _umask() -> int:
    """The process's file-creation mask: from /proc where Linux shows it (reading it there
    changes nothing), else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write` on a temporary file beside `path`, sync it, then rename it over `path`.

    Readers see the old file or the whole new one, never half of one; on any error the
    temporary file is removed and `path` is untouched. The file gets the mode a plain
    ``open(path, "w")`` would give it (0666 less the umask): `mkstemp` makes it 0600, which
    left exported schedules and shared stores unreadable to the rest of a team.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save(state: dict[str, Any], folder: str | Path) -> Path:
    """Write `state` to ``folder/trainer.pt`` atomically; returns the path."""
    import torch  # here, not at import: write_atomic serves light commands too

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return write_atomic(folder / FILENAME, lambda f: torch.save(state, f))


def load(folder: str | Path, device: "torch.device | str" = "cpu") -> dict[str, Any]:
    """The state saved by `save` in `folder`."""
    import torch

    return torch.load(Path(folder) / FILENAME, map_location=device, weights_only=True)
