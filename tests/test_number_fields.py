"""YAML's true and false where a number belongs: pydantic's lax numbers read them as 1 and 0
(``epochs: yes`` trained one epoch), so every spec refuses them, naming the field."""

from __future__ import annotations

import pytest
import yaml

from iterhead.search.cli import main

from support import ROOT

EXAMPLE = ROOT / "examples" / "poly_then_parity_small.yaml"


def set_field(data: dict, dotted: str, value) -> None:
    *parents, last = [int(p) if p.isdigit() else p for p in dotted.split(".")]
    for part in parents:
        data = data[part]
    data[last] = value


@pytest.mark.parametrize("dotted, value, field", [
    ("stages.0.epochs", True, "stages[0].epochs"),
    ("seed", True, "seed"),
    ("optim.lr", False, "optim.lr"),
    ("stages.1.mix.parity", True, "stages[1].mix.parity"),
    ("tasks.polynomial.modulus", True, "tasks.polynomial.modulus"),
    ("target.accuracy", True, "target.accuracy"),
])
def test_a_boolean_for_a_number_exits_2_naming_the_field(tmp_path, capsys, dotted, value, field):
    data = yaml.safe_load(EXAMPLE.read_text())
    set_field(data, dotted, value)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    words = f"{path}: {field}: a number is needed here, not the boolean {str(value).lower()}"
    assert len(err) == 1 and words in err[0], err


def test_yes_is_a_boolean_to_yaml_and_so_no_number(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(EXAMPLE.read_text().replace("epochs: 60}", "epochs: yes}"))
    assert main(["validate", str(path)]) == 2
    assert "stages[0].epochs: a number is needed here, not the boolean true (YAML reads true, yes and on so)" \
        in capsys.readouterr().err
