"""Checkpoints: the trainer's whole state with its curriculum, written atomically.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then
renamed over the target, so a crash mid-write leaves the previous checkpoint intact. It is
loaded with ``weights_only=True``: tensors and plain containers only, no pickled code; and
only after every record's CRC32 checks out (`verify`): torch.load checks none, so bytes
flipped on disk or in a copy would load as other weights, silently.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
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


class Corrupt(ValueError):
    """A file that is not what torch.save wrote (no whole zip, or a record failing its CRC32): refused,
    never loaded as other numbers."""

    def __init__(self, path: Path, why: str) -> None:
        self.path, self.why = path, why
        super().__init__(f"{path}: {why}")


def verify(path: str | Path) -> None:
    """Raise `Corrupt` unless `path` is a whole zip archive whose records all match their CRC32.

    torch.save writes a zip with a CRC32 per record, but torch.load reads the records without
    checking them. This reads the file once more; checkpoints here are small. I/O errors
    (missing, unreadable) stay OSError.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except OSError:
        raise
    except Exception as err:  # BadZipFile, or whatever a mangled header makes zipfile trip on
        raise Corrupt(path, f"not a whole zip archive as torch.save writes: {type(err).__name__}: {err}") from None
    if bad is not None:
        raise Corrupt(path, f"record {bad} fails its CRC32 check: its bytes changed after it was written")


def read(path: str | Path, device: "torch.device | str" = "cpu") -> Any:
    """What torch.save wrote to `path`, weights only, once `verify` passes: the one way files
    torch.save wrote are read here (checkpoints, prefix-store and population entries)."""
    import torch

    verify(path)
    return torch.load(Path(path), map_location=device, weights_only=True)


def load(folder: str | Path, device: "torch.device | str" = "cpu") -> dict[str, Any]:
    """The state saved by `save` in `folder`."""
    return read(Path(folder) / FILENAME, device)


# a trainer state's parts (`loop.Trainer.state_dict`) and their types, which readers index into
STATE_PARTS: dict[str, type] = {"curriculum": dict, "model": dict, "position": dict, "compute": dict,
                                "outcome": dict, "history": list}


def trainer_states(loaded: Any) -> list[dict[str, Any]]:
    """The per-seed trainer states in a loaded checkpoint (a replicate trial's holds one per seed).

    ValueError saying what is missing, so a foreign or damaged object is refused up front
    rather than tripping the code that reads it (or, with no states, doing nothing).
    """
    if not isinstance(loaded, dict):
        raise ValueError(f"it holds a {type(loaded).__name__}, not a trainer state")
    states = loaded["seeds"] if "seeds" in loaded else [loaded]
    if not isinstance(states, list) or not states:
        raise ValueError("its 'seeds' is not a list of one or more trainer states")
    for i, state in enumerate(states):
        where = f"seeds[{i}]" if "seeds" in loaded else "its state"
        if not isinstance(state, dict):
            raise ValueError(f"{where} is a {type(state).__name__}, not a trainer state")
        for part, kind in STATE_PARTS.items():
            if not isinstance(state.get(part), kind):
                raise ValueError(f"{where} has no {part!r} ({kind.__name__})")
    return states
