"""Bad input to `iterhead validate FILE...`: every bad file gives exit code 2 and exactly one
`error:` line on stderr naming the file, the field (or YAML line) and the reason; no tracebacks.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from iterhead.search.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "poly_then_parity_small.yaml"
EXAMPLE_TEXT = EXAMPLE.read_text()
MARKER = "tag_was_executed"  # a Python tag in a payload would create this file in tmp_path

Make = Callable[[Path], Path]  # writes the bad input under tmp_path, returns the path to validate


def text(body: str) -> Make:
    """A file holding `body`."""
    def make(tmp: Path) -> Path:
        path = tmp / "bad.yaml"
        path.write_text(body, encoding="utf-8")
        return path
    return make


def raw(body: bytes) -> Make:
    """A file holding `body` byte for byte."""
    def make(tmp: Path) -> Path:
        path = tmp / "bad.yaml"
        path.write_bytes(body)
        return path
    return make


def sub(old: str, new: str) -> Make:
    """The example's text with `old` (which must occur once) replaced by `new`."""
    assert EXAMPLE_TEXT.count(old) == 1, old
    return text(EXAMPLE_TEXT.replace(old, new))


def edit(*changes: tuple[str, Any]) -> Make:
    """The example as data with each (dotted path, value) set; value DROP deletes the key."""
    data = yaml.safe_load(EXAMPLE_TEXT)
    for dotted, value in changes:
        *parents, last = [int(p) if p.isdigit() else p for p in dotted.split(".")]
        node = data
        for part in parents:
            node = node[part]
        if value is DROP:
            del node[last]
        else:
            node[last] = copy.deepcopy(value)
    return text(yaml.safe_dump(data, sort_keys=False))


DROP = object()


def no_file(tmp: Path) -> Path:
    return tmp / "does_not_exist.yaml"


def directory(tmp: Path) -> Path:
    path = tmp / "a_directory.yaml"
    path.mkdir()
    return path


def python_tag(tmp: Path) -> Path:
    """A tag that, under an unsafe loader, would run a shell command creating MARKER."""
    return text(f'name: !!python/object/apply:os.system ["touch {tmp / MARKER}"]\n')(tmp)


@dataclass(frozen=True)
class Line:
    """The error must point at this 1-based YAML line."""

    n: int


@dataclass(frozen=True)
class Case:
    id: str
    make: Make
    where: str | Line | None  # the field path the message must lead with, a YAML line, or none
    reason: str  # a key word of the reason, matched case-insensitively
    also: tuple[str, ...] = ()  # more text the message must contain


CASES = [
    # not a mapping at all
    Case("empty-file", text(""), None, "empty"),
    Case("whitespace-and-comments-only", text("# only a comment\n\n   \n# another\n"), None, "empty"),
    Case("top-level-list", text("- name: x\n- name: y\n"), None, "mapping", also=("list",)),
    Case("top-level-scalar", text("just a string\n"), None, "mapping", also=("str",)),
    Case("top-level-number", text("42\n"), None, "mapping", also=("int",)),
    Case("multiple-documents", text("name: a\n---\nname: b\n"), Line(2), "document",
         also=("single document",)),
    # YAML that does not parse
    Case("yaml-syntax-error", text("name: x\nseed: 0\n  model: 1\n"), Line(3), "not allowed"),
    Case("yaml-unclosed-flow-mapping", sub("eval: {every_epochs: 2}", "eval: {every_epochs: 2"),
         Line(18), "expected"),
    Case("yaml-undefined-alias", text("name: *nowhere\n"), Line(1), "alias"),
    Case("python-object-apply-tag", python_tag, Line(1), "not allowed", also=("python/object",)),
    Case("python-name-tag", text("name: !!python/name:os.system\n"), Line(1), "not allowed",
         also=("python/name",)),
    Case("binary-all-bytes", raw(bytes(range(256))), None, "UTF-8", also=("0x80",)),
    Case("binary-png-header", raw(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"), None, "UTF-8",
         also=("0x89",)),
    Case("nul-character", text("name: a\x00b\n"), None, "unacceptable character"),
    Case("duplicate-top-level-key", sub("seed: 0\n", "seed: 0\nseed: 1\n"), Line(7), "duplicate",
         also=("'seed'",)),
    Case("duplicate-nested-key", sub("{d_model: 64,", "{d_model: 64, d_model: 32,"), Line(7),
         "duplicate", also=("'d_model'",)),
    Case("unhashable-mapping-key", text("? [a, b]\n: 1\n"), Line(1), "unhashable"),
    Case("self-referencing-alias", sub("model: {d_model: 64,", "model: &m {d_model: *m,"),
         Line(7), "recursive"),
    Case("nesting-too-deep", text("name: " + "[" * 5000 + "]" * 5000 + "\n"), None, "deep"),
    # unknown or missing fields
    Case("unknown-top-level-key", edit(("colour", "blue")), "colour", "unknown field",
         also=("stages", "target")),
    Case("unknown-nested-key", edit(("model.d_modle", 64)), "model.d_modle", "unknown field",
         also=("allowed", "d_model", "n_heads", "positional")),
    Case("unknown-stage-key", edit(("stages.1.mix_weights", 1)), "stages[1].mix_weights",
         "unknown field", also=("epochs", "train_modules")),
    Case("unknown-task-key", edit(("tasks.polynomial.modulo", 7)), "tasks.polynomial.modulo",
         "unknown field", also=("kind", "modulus")),
    Case("missing-name", edit(("name", DROP)), "name", "missing"),
    Case("missing-tasks", edit(("tasks", DROP)), "tasks", "missing"),
    Case("missing-stages", edit(("stages", DROP)), "stages", "missing"),
    Case("missing-target", edit(("target", DROP)), "target", "missing"),
    Case("missing-task-kind", edit(("tasks.parity", {})), "tasks.parity", "kind"),
    Case("no-tasks", edit(("tasks", {})), "tasks", "at least one"),
    Case("no-stages", edit(("stages", [])), "stages", "at least one"),
    # numbers out of range or of the wrong type
    Case("lr-negative", edit(("optim.lr", -1e-3)), "optim.lr", "greater than 0"),
    Case("lr-zero", edit(("optim.lr", 0.0)), "optim.lr", "greater than 0"),
    Case("lr-nan", sub("lr: 1.0e-3", "lr: .nan"), "optim.lr", "finite number"),
    Case("lr-inf", sub("lr: 1.0e-3", "lr: .inf"), "optim.lr", "finite number"),
    Case("stage-lr-negative-inf", edit(("stages.1.lr", float("-inf"))), "stages[1].lr", "finite number"),
    Case("batch-size-zero", edit(("optim.batch_size", 0)), "optim.batch_size", "greater than 0"),
    Case("min-len-zero", edit(("data.min_len", 0)), "data.min_len", "greater than 0"),
    Case("max-len-below-min-len", edit(("data.min_len", 5), ("data.max_len", 4)), "data.max_len",
         "min_len"),
    Case("epochs-negative", edit(("stages.0.epochs", -1)), "stages[0].epochs", "greater than or equal"),
    Case("epochs-float", edit(("stages.0.epochs", 1.5)), "stages[0].epochs", "integer",
         also=("fractional",)),
    Case("string-for-number", edit(("model.d_model", "sixty-four")), "model.d_model", "integer",
         also=("'sixty-four'",)),
    Case("list-for-number", edit(("optim.lr", [1e-3])), "optim.lr", "valid number"),
    Case("modulus-one", edit(("tasks.polynomial.modulus", 1)), "tasks.polynomial.modulus",
         "greater than or equal to 2"),
    Case("target-accuracy-zero", edit(("target.accuracy", 0.0)), "target.accuracy", "greater than 0"),
    Case("target-accuracy-above-one", edit(("target.accuracy", 1.5)), "target.accuracy",
         "less than or equal to 1"),
    # stages and cross-field checks
    Case("mix-weight-negative", edit(("stages.1.mix.parity", -0.5)), "stages[1].mix.parity",
         "greater than or equal to 0"),
    Case("mix-undefined-task", edit(("stages.1.mix.foo", 1.0)), "stages[1].mix.foo", "not defined",
         also=("parity", "polynomial")),
    Case("mix-key-not-a-string", sub("mix: {parity: 1.0}", "mix: {1: 1.0}"), "stages[1].mix.1",
         "valid string"),
    Case("mix-weights-all-zero", edit(("stages.0.mix.polynomial", 0.0)), "stages[0].mix",
         "positive sum"),
    Case("duplicate-stage-names", edit(("stages.1.name", "pretrain")), "stages[1].name", "unique"),
    Case("stage-name-with-space", edit(("stages.0.name", "pre train")), "stages[0].name", "pattern"),
    Case("d-model-not-divisible-by-heads", edit(("model.n_heads", 3)), "model.d_model", "divisible"),
    Case("rotary-odd-head-size", edit(("model.positional", "rotary"), ("model.d_model", 6),
                                      ("model.n_heads", 2)), "model.positional", "even"),
    Case("batch-order-unknown", edit(("optim.batch_order", "random")), "optim.batch_order", "seeded",
         also=("shared",)),
    Case("target-task-undefined", edit(("target.task", "copy")), "target.task", "not defined"),
    Case("train-module-nonexistent", edit(("stages.0.train_modules", ["head", "blocks.5.mlp"])),
         "stages[0].train_modules[1]", "not a module", also=("'blocks.5.mlp'", "blocks.1.mlp")),
    Case("train-modules-not-a-list", edit(("stages.0.train_modules", "head")),
         "stages[0].train_modules", "valid list"),
    Case("unknown-task-kind", edit(("tasks.parity.kind", "sorting")), "tasks.parity",
         "unknown task kind", also=("polynomial", "copy")),
    # not a readable file
    Case("file-does-not-exist", no_file, None, "cannot read", also=("No such file",)),
    Case("path-is-a-directory", directory, None, "cannot read", also=("directory",)),
]


def run_validate(capsys: pytest.CaptureFixture[str], *files: Path) -> tuple[int, str, str]:
    """`iterhead validate FILES` in-process: (exit code, stdout, stderr)."""
    code = main(["validate", *map(str, files)])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(err: str, path: Path) -> str:
    """The single stderr line for `path`, checked; returns what follows ``error: PATH: ``."""
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {err!r}"
    prefix = f"error: {path}: "
    assert lines[0].startswith(prefix), lines[0]
    assert err == lines[0] + "\n"
    return lines[0][len(prefix):]


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 24


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = case.make(tmp_path)
    code, out, err = run_validate(capsys, path)
    assert "Traceback" not in out + err
    assert code == 2, (code, out, err)
    assert out == ""
    message = assert_one_error(err, path)
    if isinstance(case.where, Line):
        assert f"line {case.where.n}," in message, message
    elif case.where is not None:
        assert message.startswith(f"{case.where}: "), message
    assert case.reason.lower() in message.lower(), message
    for fragment in case.also:
        assert fragment in message, (fragment, message)
    assert not (tmp_path / MARKER).exists(), "a YAML tag ran code"


def test_python_tag_payload_would_have_created_the_marker(tmp_path: Path) -> None:
    """The payload above is live: the test for 'not executed' would notice if it ran."""
    body = python_tag(tmp_path).read_text()
    command = yaml.safe_load(body.replace("!!python/object/apply:os.system ", ""))["name"][0]
    assert command == f"touch {tmp_path / MARKER}"
    yaml.load(body, Loader=yaml.UnsafeLoader)  # noqa: S506 - what the validator must never do
    assert (tmp_path / MARKER).exists()


def test_valid_file_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "good.yaml"
    shutil.copy(EXAMPLE, path)
    code, out, err = run_validate(capsys, path)
    assert (code, err) == (0, "")
    assert out.startswith(f"ok: {path}: ") and out.count("\n") == 1


def test_good_and_bad_reports_only_the_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    shutil.copy(EXAMPLE, good)
    bad = edit(("optim.lr", -1.0))(tmp_path)
    code, out, err = run_validate(capsys, good, bad)
    assert code == 2
    assert out.startswith(f"ok: {good}: ") and out.count("\n") == 1
    assert assert_one_error(err, bad).startswith("optim.lr: ")
    assert str(good) not in err


def test_console_script_on_bad_file(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "iterhead"
    if not script.exists():
        script = Path(shutil.which("iterhead") or "iterhead")
    bad = edit(("model.d_modle", 64))(tmp_path)
    proc = subprocess.run([str(script), "validate", str(bad)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert assert_one_error(proc.stderr, bad).startswith("model.d_modle: unknown field")


def test_shipped_examples_validate(capsys: pytest.CaptureFixture[str]) -> None:
    curricula = [p for p in sorted((ROOT / "examples").glob("*.yaml"))
                 if "stages" in (yaml.safe_load(p.read_text()) or {})]
    assert curricula, "no curriculum examples found"
    code, out, err = run_validate(capsys, *curricula)
    assert (code, err) == (0, "")
    assert [line.split(": ")[1] for line in out.splitlines()] == [str(p) for p in curricula]
