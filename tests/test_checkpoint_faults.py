"""Checkpoints survive a kill in the middle of a write and a full disk."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from iterhead.trainable import checkpoint
from iterhead.trainable.loop import Trainer
from iterhead.trainable.population import MemberTrial

from support import damage_a_record, tiny


def without_time(metrics):
    return {k: v for k, v in metrics.items() if "seconds" not in k}


def test_kill_during_a_write_resumes_from_the_previous_checkpoint(tmp_path):
    """A process saves one checkpoint, then is SIGKILLed halfway through writing the next."""
    script = textwrap.dedent(f"""
        import io, os, signal, sys
        import torch
        sys.path.insert(0, {str(os.path.dirname(__file__))!r})
        from support import tiny
        from iterhead.trainable import checkpoint
        from iterhead.trainable.loop import Trainer
        torch.set_num_threads(1)
        trainer = Trainer(tiny())
        events = trainer.run()
        next(events); next(events)
        checkpoint.save(trainer.state_dict(), {str(tmp_path)!r})  # complete: after 2 evaluations
        next(events)
        data = io.BytesIO()
        torch.save(trainer.state_dict(), data)
        def half_then_die(f):
            f.write(data.getvalue()[: len(data.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.write_atomic(checkpoint.Path({str(tmp_path)!r}) / checkpoint.FILENAME, half_then_die)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # the half-written file, beside it
    state = checkpoint.load(tmp_path)
    assert state["outcome"]["evaluations"] == 2
    straight = [ev.metrics for ev in Trainer(tiny()).run()]
    resumed = [ev.metrics for ev in Trainer(tiny(), state=state).run()]
    assert [without_time(m) for m in resumed] == [without_time(m) for m in straight[2:]]


def test_full_disk_during_checkpointing_keeps_the_previous_one(tmp_path, monkeypatch):
    trainer = Trainer(tiny())
    events = trainer.run()
    next(events)
    checkpoint.save(trainer.state_dict(), tmp_path)
    next(events)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save(trainer.state_dict(), tmp_path)
    monkeypatch.undo()
    assert checkpoint.load(tmp_path)["outcome"]["evaluations"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILENAME]


def test_checkpoints_load_weights_only(tmp_path):
    """A checkpoint holding a pickled object (code on load) is refused."""

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": {}, "evil": Payload()}, tmp_path / checkpoint.FILENAME)
    with pytest.raises(Exception, match="Weights only load failed"):
        checkpoint.load(tmp_path)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_written_atomically_get_the_mode_open_would_give(tmp_path, umask):
    """0666 less the umask, as a plain open() gives (mkstemp alone makes 0600, which hid
    exported schedules from the rest of a team); also when replacing a file of another mode."""
    target = tmp_path / "best.yaml"
    target.write_text("old")
    target.chmod(0o600)
    code = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from iterhead.trainable import checkpoint
        os.umask({umask})
        checkpoint.write_atomic(Path({str(target)!r}), lambda f: f.write(b"new"))
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_checkpoint_whose_bytes_changed_is_refused_not_loaded(tmp_path):
    """torch.load does not check the CRC32 torch.save stores per record: a flipped weight loads as
    another number. A Tune restore (`checkpoint.load`) and a PBT member's start refuse it."""
    trainer = Trainer(tiny())
    next(trainer.run())
    file = checkpoint.save(trainer.state_dict(), tmp_path / "trial")
    record = damage_a_record(file)
    with pytest.raises(checkpoint.Corrupt, match=re.escape(f"{file}: record {record} fails its CRC32 check")):
        checkpoint.load(file.parent)

    parent = MemberTrial(tmp_path / "population", 0, 0, "m0-g0", None, None, (0, 1), [])
    child = MemberTrial(tmp_path / "population", 0, 1, "m0-g1", "m0-g0", None, None, [])
    parent.leave(trainer.state_dict())
    assert child.start_state(trainer.cur, torch.device("cpu")) is not None  # intact: it starts there
    record = damage_a_record(parent.path("m0-g0"))
    with pytest.raises(RuntimeError, match=f"cannot be read \\(Corrupt: .*record {record} fails its CRC32"):
        child.start_state(trainer.cur, torch.device("cpu"))
