"""Option values that are empty, or hold bytes that are not UTF-8: exit 2 with one line naming the
option (or the file), before any store, folder or Ray is made.

An empty value was read as the option's default (``x or default``) or as the current folder
(``Path("")``); bytes that are not UTF-8 (which Python reads as lone surrogates) failed in the
tracking store after the run began (exit 1, blaming the store), or in a traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from iterhead.search import run
from iterhead.search.cli import main

from support import PARITY_BASE, no_ray

FF = os.fsdecode(b"\xff")  # how Python reads the byte 0xff in an argument or a file name


@pytest.fixture
def here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder of a curriculum and a search spec over it, as the working directory; no Ray."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run, "start_ray", no_ray)
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(PARITY_BASE))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"name": "s", "base": "c.yaml"}))
    return tmp_path


def error_of(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The one stderr line of a command that must exit 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


# `--precision x` is refused after these checks: without them, the line would name --precision
EMPTY = {
    "train-tracking-uri": (["train", "c.yaml", "--tracking-uri", "", "--precision", "x"],
                           "--tracking-uri: '' is empty"),
    "reconcile-tracking-uri": (["reconcile", "--tracking-uri", " "], "--tracking-uri: ' ' is blank"),
    "search-storage-path": (["search", "spec.yaml", "--storage-path", "", "--precision", "x"],
                            "--storage-path: '' is empty; give a folder, or leave the option out for ./ray_results"),
    "search-address": (["search", "spec.yaml", "--address", "", "--precision", "x"], "--address: '' is empty"),
    "export-out": (["export", "--experiment", "s", "-o", ""], "-o: '' is empty"),
    "report-out": (["report", "--experiment", "s", "-o", "  "], "-o: '  ' is blank"),
    "ablate-checkpoint": (["ablate", "--checkpoint", ""], "--checkpoint: '' is empty"),
    "train-experiment": (["train", "c.yaml", "--experiment", "   ", "--precision", "x"],
                         "--experiment: '   ' is blank; name the experiment, or leave the option out"),
    "export-experiment": (["export", "--experiment", " ", "-o", "best.yaml"], "--experiment: ' ' is blank"),
    "reconcile-experiment": (["reconcile", "--experiment", "s", "--experiment", ""], "--experiment: '' is empty"),
}


@pytest.mark.parametrize("argv, words", EMPTY.values(), ids=list(EMPTY))
def test_an_empty_value_is_no_default(here, capsys, argv, words):
    assert f"error: {words}" in error_of(capsys, argv)
    assert sorted(p.name for p in here.iterdir()) == ["c.yaml", "spec.yaml"]


def test_an_empty_tracking_uri_is_refused_even_where_the_environment_names_one(here, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{here}/m.db")
    assert error_of(capsys, ["train", "c.yaml", "--tracking-uri", "", "--precision", "x"]).startswith(
        "error: --tracking-uri: '' is empty")


NOT_UTF8 = {
    "train-experiment": (["train", "c.yaml", "--experiment", f"e{FF}", "--precision", "x"],
                         "--experiment: 'e\\udcff' holds the byte 0xff, which is not UTF-8 text"),
    "reconcile-experiment": (["reconcile", "--experiment", f"e{FF}"], "--experiment: 'e\\udcff' holds the byte 0xff"),
    "train-sqlite-uri": (["train", "c.yaml", "--tracking-uri", f"sqlite:///m{FF}.db", "--precision", "x"],
                         "--tracking-uri: 'sqlite:///m\\udcff.db' holds the byte 0xff"),
    "train-http-uri": (["train", "c.yaml", "--tracking-uri", f"http://h{FF}:5000"], "--tracking-uri: 'http://h\\udcff"),
    "search-storage-path": (["search", "spec.yaml", "--storage-path", f"s{FF}"], "--storage-path: '"),
}


@pytest.mark.parametrize("argv, words", NOT_UTF8.values(), ids=list(NOT_UTF8))
def test_a_value_that_is_not_utf8_is_refused_before_the_store_fails_on_it(here, capsys, argv, words):
    err = error_of(capsys, argv)
    assert f"error: {words}" in err and "0xff, which is not UTF-8 text" in err, err
    assert sorted(p.name for p in here.iterdir()) == ["c.yaml", "spec.yaml"]


def test_a_curriculum_whose_path_is_not_utf8_is_refused_before_training(here, capsys):
    """Its absolute path is the run's source tag: the store failed on it after the experiment was made."""
    name = f"b{FF}.yaml"
    (here / name).write_text((here / "c.yaml").read_text())
    err = error_of(capsys, ["train", name, "--tracking-uri", f"sqlite:///{here}/m.db", "--precision", "x"])
    assert err.startswith("error: b\\udcff.yaml: its path holds the byte 0xff, which is not UTF-8 text"), err
    assert not (here / "m.db").exists()


def test_a_tracking_host_that_cannot_be_looked_up_is_one_line(here, capsys):
    """The idna codec refuses an empty label before any lookup: a UnicodeError traceback."""
    err = error_of(capsys, ["train", "c.yaml", "--tracking-uri", "http://a..b:5000"])
    assert err.startswith("error: --tracking-uri: 'http://a..b:5000': 'a..b' is not a host name"), err


def test_validate_names_a_file_whose_name_is_not_utf8_on_a_strict_stream(here, capsys):
    """stdout encodes strictly in most UTF-8 locales (capsys does too): the ok line raised after the check."""
    name = f"b{FF}.yaml"
    (here / name).write_text((here / "c.yaml").read_text())
    assert main(["validate", name]) == 0
    assert capsys.readouterr().out.startswith("ok: b\\udcff.yaml: curriculum 'b'")
