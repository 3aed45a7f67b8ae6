"""Export's file handling: names stay inside the output folder, writes are atomic."""

from __future__ import annotations

import errno
import os

import pytest

from iterhead.search.export import Candidate, safe_name, targets
from iterhead.trainable.checkpoint import write_atomic


def test_trial_names_cannot_escape_the_folder(tmp_path):
    evil = [Candidate("r1", "../../etc/passwd", {}, {}), Candidate("r2", "/abs/path", {}, {}),
            Candidate("r3", "..", {}, {})]
    paths = targets(tmp_path / "out", evil)
    assert all(p.parent == (tmp_path / "out").resolve() for p in paths)
    assert safe_name("a/b\\c..d") == "a_b_c..d" and safe_name("..") == "trial"


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "best.yaml"
    path.write_text("old: 1\n")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        write_atomic(path, lambda f: f.write(b"new: 2\n" * 1000))
    assert path.read_text() == "old: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["best.yaml"]  # no temporary left behind
