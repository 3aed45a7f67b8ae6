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
from typing import Any, Callable, Literal, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from iterhead.curricula.errors import closest, shown, suggest, unknown
from iterhead.curricula.schema import Curriculum
from iterhead.curricula.tasks import KINDS
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
    never: tuple[str, ...] = ()  # text the message must not contain


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
    Case("unknown-top-level-key", edit(("colour", "blue")), "colour", "unknown field 'colour'",
         also=("; allowed here: data, eval, model, name, optim, seed, stages, target, tasks",),
         never=("did you mean",)),
    Case("misspelt-top-level-key", edit(("taks", {})), "taks", "unknown field 'taks'",
         also=("did you mean 'tasks'?", "(allowed here: ")),
    Case("unknown-nested-key", edit(("model.d_modle", 64)), "model.d_modle", "unknown field 'd_modle'",
         also=("did you mean 'd_model'?", "allowed", "n_heads", "positional")),
    Case("unknown-optim-key", edit(("optim.lrr", 0.1)), "optim.lrr", "unknown field 'lrr'",
         also=("did you mean 'lr'? (allowed here: batch_order, batch_size, lr, weight_decay)",)),
    Case("unknown-stage-key", edit(("stages.1.mix_weights", 1)), "stages[1].mix_weights",
         "unknown field 'mix_weights'", also=("epochs", "train_modules"), never=("did you mean",)),
    Case("misspelt-stage-key", edit(("stages.1.epoch", 1)), "stages[1].epoch", "unknown field 'epoch'",
         also=("did you mean 'epochs'?",)),
    Case("unknown-task-key", edit(("tasks.polynomial.modulo", 7)), "tasks.polynomial.modulo",
         "unknown field 'modulo'", also=("did you mean 'modulus'? (allowed here: kind, modulus)",)),
    Case("missing-name", edit(("name", DROP)), "name", "missing"),
    Case("missing-tasks", edit(("tasks", DROP)), "tasks", "missing"),
    Case("missing-stages", edit(("stages", DROP)), "stages", "missing"),
    Case("missing-target", edit(("target", DROP)), "target", "missing"),
    Case("missing-task-kind", edit(("tasks.parity", {})), "tasks.parity.kind", "missing",
         also=("choose one of parity, polynomial, copy",)),
    Case("task-not-a-mapping", edit(("tasks.parity", "parity")), "tasks.parity", "dictionary",
         also=("(got 'parity')",)),
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
    Case("train-scored-above-train-set", edit(("data.train_per_len", 64), ("eval.train_per_len", 65)),
         "eval.train_per_len", "at most data.train_per_len (64)"),
    Case("target-min-len-past-max-len", edit(("target.min_len", 9)), "target.min_len",
         "must be a test length, from data.min_len (1) to data.max_len (4) (got 9)"),
    Case("epochs-negative", edit(("stages.0.epochs", -1)), "stages[0].epochs", "greater than or equal"),
    Case("epochs-float", edit(("stages.0.epochs", 1.5)), "stages[0].epochs", "integer",
         also=("fractional",)),
    Case("string-for-number", edit(("model.d_model", "sixty-four")), "model.d_model", "integer",
         also=("'sixty-four'",)),
    Case("list-for-number", edit(("optim.lr", [1e-3])), "optim.lr", "valid number",
         also=("(got [0.001])",)),
    Case("modulus-one", edit(("tasks.polynomial.modulus", 1)), "tasks.polynomial.modulus",
         "greater than or equal to 2"),
    Case("target-accuracy-zero", edit(("target.accuracy", 0.0)), "target.accuracy", "greater than or equal to"),
    Case("target-accuracy-above-one", edit(("target.accuracy", 1.5)), "target.accuracy",
         "less than or equal to 1"),
    # stages and cross-field checks
    Case("mix-weight-negative", edit(("stages.1.mix.parity", -0.5)), "stages[1].mix.parity",
         "greater than or equal to 0"),
    Case("mix-undefined-task", edit(("stages.1.mix.foo", 1.0)), "stages[1].mix.foo", "unknown task 'foo'",
         also=("; defined tasks: parity, polynomial",), never=("did you mean",)),
    Case("mix-misspelt-task", edit(("stages.1.mix.paritty", 1.0)), "stages[1].mix.paritty",
         "unknown task 'paritty'", also=("did you mean 'parity'? (defined tasks: parity, polynomial)",)),
    Case("mix-key-not-a-string", sub("mix: {parity: 1.0}", "mix: {1: 1.0}"), "stages[1].mix.1",
         "valid string"),
    Case("mix-weights-all-zero", edit(("stages.0.mix.polynomial", 0.0)), "stages[0].mix",
         "positive sum", also=("{'polynomial': 0.0}",)),
    Case("duplicate-stage-names", edit(("stages.1.name", "pretrain")), "stages[1].name", "unique"),
    Case("stage-name-with-space", edit(("stages.0.name", "pre train")), "stages[0].name", "pattern"),
    Case("shared-stage-not-leading", edit(("stages.1.seed", 0)), "stages[1].seed", "only the first stages",
         also=("before 'finetune'",)),
    Case("shared-stages-two-seeds", edit(("stages.0.seed", 0), ("stages.1.seed", 1)), "stages[1].seed",
         "one seed", also=("use 0",)),
    Case("shared-stage-seed-negative", edit(("stages.0.seed", -1)), "stages[0].seed", "greater than or equal"),
    Case("d-model-not-divisible-by-heads", edit(("model.n_heads", 3)), "model.d_model", "divisible"),
    Case("rotary-odd-head-size", edit(("model.positional", "rotary"), ("model.d_model", 6),
                                      ("model.n_heads", 2)), "model.positional", "even",
         also=("= 3",)),
    Case("batch-order-unknown", edit(("optim.batch_order", "random")), "optim.batch_order",
         "unknown batch_order 'random'", also=("; choose one of seeded, shared",), never=("did you mean",)),
    Case("batch-order-misspelt", edit(("optim.batch_order", "shraed")), "optim.batch_order",
         "unknown batch_order 'shraed'", also=("did you mean 'shared'? (choose one of seeded, shared)",)),
    Case("positional-misspelt", edit(("model.positional", "rotory")), "model.positional",
         "unknown positional 'rotory'", also=("did you mean 'rotary'? (choose one of learned, rotary)",)),
    Case("positional-wrong-case", edit(("model.positional", "Learned")), "model.positional",
         "unknown positional 'Learned'", also=("did you mean 'learned'?",)),
    Case("positional-not-a-string", edit(("model.positional", 5)), "model.positional",
         "unknown positional 5", also=("; choose one of learned, rotary",), never=("did you mean",)),
    Case("split-misspelt", edit(("data.split", "disjiont")), "data.split", "unknown split 'disjiont'",
         also=("did you mean 'disjoint'? (choose one of iid, disjoint)",)),
    Case("split-unknown", edit(("data.split", "random")), "data.split", "unknown split 'random'",
         also=("; choose one of iid, disjoint",), never=("did you mean",)),
    Case("target-task-undefined", edit(("target.task", "copy")), "target.task", "unknown task 'copy'",
         also=("; defined tasks: parity, polynomial",), never=("did you mean",)),
    Case("target-task-misspelt", edit(("target.task", "polynomal")), "target.task",
         "unknown task 'polynomal'", also=("did you mean 'polynomial'? (defined tasks: parity, polynomial)",)),
    Case("train-module-nonexistent", edit(("stages.0.train_modules", ["head", "blocks.5.mlp"])),
         "stages[0].train_modules[1]", "unknown module 'blocks.5.mlp'",
         also=("did you mean 'blocks.1.mlp'? (modules of this model: blocks, ", "tok_emb)")),
    Case("train-module-far-off", edit(("stages.0.train_modules", ["attention"])),
         "stages[0].train_modules[0]", "unknown module 'attention'",
         also=("; modules of this model: blocks, ",), never=("did you mean",)),
    Case("mix-weight-huge", edit(("stages.0.mix.polynomial", 1.0e308)), "stages[0].mix.polynomial",
         "less than or equal to"),
    Case("train-modules-empty", edit(("stages.0.train_modules", [])),
         "stages[0].train_modules", "an empty list trains nothing", also=("leave the field out",)),
    Case("train-modules-not-a-list", edit(("stages.0.train_modules", "head")),
         "stages[0].train_modules", "valid list"),
    Case("unknown-task-kind", edit(("tasks.parity.kind", "sorting")), "tasks.parity.kind",
         "unknown task kind 'sorting'", also=("; choose one of parity, polynomial, copy",),
         never=("did you mean",)),
    Case("misspelt-task-kind", edit(("tasks.parity.kind", "parityy")), "tasks.parity.kind",
         "unknown task kind 'parityy'", also=("did you mean 'parity'? (choose one of parity, polynomial, copy)",)),
    Case("task-kind-not-a-string", edit(("tasks.polynomial.kind", 3)), "tasks.polynomial.kind",
         "unknown task kind 3", also=("choose one of",), never=("did you mean",)),
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
    for fragment in case.never:
        assert fragment not in message, (fragment, message)
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


@pytest.mark.parametrize("change, expected", [
    (("model.d_modle", 64), "model.d_modle: unknown field 'd_modle'; did you mean 'd_model'? (allowed here: "
                            "d_model, dropout, mlp_ratio, n_heads, n_layers, positional)"),
    (("tasks.parity.kind", "parityy"), "tasks.parity.kind: unknown task kind 'parityy'; did you mean "
                                       "'parity'? (choose one of parity, polynomial, copy)"),
], ids=["unknown-key", "task-kind"])
def test_console_script_on_bad_file(tmp_path: Path, change: tuple[str, Any], expected: str) -> None:
    script = Path(sys.executable).parent / "iterhead"
    if not script.exists():
        script = Path(shutil.which("iterhead") or "iterhead")
    bad = edit(change)(tmp_path)
    proc = subprocess.run([str(script), "validate", str(bad)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert assert_one_error(proc.stderr, bad) == expected


def _literal_fields(model: type[BaseModel], prefix: str = "") -> dict[str, tuple[str, ...]]:
    """Dotted path -> choices of every ``Literal`` field reachable through nested models."""
    out: dict[str, tuple[str, ...]] = {}
    for name, field in model.model_fields.items():
        tp = field.annotation
        if get_origin(tp) is Literal:
            out[prefix + name] = get_args(tp)
        elif isinstance(tp, type) and issubclass(tp, BaseModel):
            out.update(_literal_fields(tp, f"{prefix}{name}."))
    return out


CURRICULUM_CHOICES = _literal_fields(Curriculum)


def test_every_curriculum_choice_field_is_covered() -> None:
    """Adding a choice field to the schema adds it to the parametrised test below."""
    assert set(CURRICULUM_CHOICES) == {"model.positional", "data.split", "optim.batch_order", "eval.precision"}


@pytest.mark.parametrize("path", sorted(CURRICULUM_CHOICES))
@pytest.mark.parametrize("how", ["typo", "far-off"])
def test_choice_field_names_the_value_and_the_nearest_choice(
        path: str, how: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    choices = CURRICULUM_CHOICES[path]
    given = choices[-1][:-1] + "x" + choices[-1][-1] if how == "typo" else "zzzz"
    bad = edit((path, given))(tmp_path)
    code, out, err = run_validate(capsys, bad)
    assert code == 2 and out == ""
    message = assert_one_error(err, bad)
    listed = f"choose one of {', '.join(choices)}"
    head = f"{path}: unknown {path.rsplit('.', 1)[-1]} {given!r}; "
    if how == "typo":
        assert message == f"{head}did you mean {choices[-1]!r}? ({listed})"
    else:
        assert message == head + listed


def test_suggest_wording() -> None:
    assert closest("parityy", KINDS) == "parity"
    assert closest("ASHA", ["asha", "none"]) == "asha"
    assert closest("sorting", KINDS) is None
    assert closest(3, KINDS) is None
    assert suggest("lrr", ["lr", "batch_size"], listing="allowed here:") == \
        "did you mean 'lr'? (allowed here: lr, batch_size)"
    assert suggest("zzz", ["lr", "batch_size"]) == "choose one of lr, batch_size"
    assert suggest("x", []) == ""
    assert unknown("task kind", "parityy", KINDS) == \
        "unknown task kind 'parityy'; did you mean 'parity'? (choose one of parity, polynomial, copy)"
    assert unknown("field", "x", []) == "unknown field 'x'"
    assert shown("a" * 100).endswith("...") and len(shown("a" * 100)) == 60


def test_shipped_examples_validate(capsys: pytest.CaptureFixture[str]) -> None:
    curricula = [p for p in sorted((ROOT / "examples").glob("*.yaml"))
                 if "stages" in (yaml.safe_load(p.read_text()) or {})]
    assert curricula, "no curriculum examples found"
    code, out, err = run_validate(capsys, *curricula)
    assert (code, err) == (0, "")
    assert [line.split(": ")[1] for line in out.splitlines()] == [str(p) for p in curricula]
