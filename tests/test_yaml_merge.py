"""YAML anchors and merge keys are plain YAML: a curriculum may build stages from one another."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from iterhead.curricula.errors import ConfigError
from iterhead.curricula.io import load_curriculum

from support import ROOT

EXAMPLE_TEXT = (ROOT / "examples" / "poly_then_parity_small.yaml").read_text()


def test_yaml_merge_keys_are_plain_yaml(tmp_path: Path) -> None:
    """`<<: *anchor` (a merge key, which yaml.safe_load reads) is not a tag the user wrote: a
    stage built from another's anchor validates, its explicit keys winning over the merged
    ones, and a duplicate key next to a merge is still refused."""
    stages = re.search(r"stages:\n(  - .*\n)+", EXAMPLE_TEXT).group(0)
    merged = ("stages:\n  - &first {name: a, mix: {parity: 1.0}, epochs: 2}\n"
              "  - {<<: *first, name: b, epochs: 3}\n")
    path = tmp_path / "merged.yaml"
    path.write_text(EXAMPLE_TEXT.replace(stages, merged))
    cur = load_curriculum(path)
    assert [(s.name, s.epochs, s.mix) for s in cur.stages] == [("a", 2, {"parity": 1.0}), ("b", 3, {"parity": 1.0})]
    path.write_text(EXAMPLE_TEXT.replace(stages, merged.replace("epochs: 3}", "epochs: 3, epochs: 4}")))
    with pytest.raises(ConfigError, match="duplicate key 'epochs'"):
        load_curriculum(path)


def test_numbers_in_exponent_form_are_numbers(tmp_path: Path) -> None:
    """PyYAML reads YAML 1.1, where `1e-3` is a string; the user means 0.001. A PBT choice of
    learning rates so written holds the base's 0.001, and every other YAML 1.1 reading stays."""
    from iterhead.curricula.io import parse_yaml_mapping
    from iterhead.search.spec import load_search

    read = parse_yaml_mapping("a: [1e-3, 1.0e3, 2E5, -1e-3, .5e1, 1.0e-3, 10, 1_000, e5, 1e, 1.5, '1e-3']")["a"]
    assert read == [0.001, 1000.0, 200000.0, -0.001, 5.0, 0.001, 10, 1000, "e5", "1e", 1.5, "1e-3"]
    assert [type(v) for v in read[:6]] == [float] * 6 and type(read[6]) is int
    (tmp_path / "base.yaml").write_text(EXAMPLE_TEXT)
    (tmp_path / "pbt.yaml").write_text("name: p\nbase: base.yaml\nsearch: {scheduler: pbt, num_samples: 2}\n"
                                       "pbt: {interval_epochs: 2, mutate: {lr: {choice: [1e-3, 2e-3]}}}\n")
    assert load_search(tmp_path / "pbt.yaml").spec.pbt.mutate["lr"].args == [0.001, 0.002]


@pytest.mark.parametrize("value, reads", [("1:00", "60"), ("-1:30", "-90"), ("1:30.5", "90.5")])
def test_base_60_numbers_are_refused_with_their_line(value: str, reads: str) -> None:
    """YAML 1.1 reads `1:00` as 60: a batch size so written trained at 60 without a word."""
    from iterhead.curricula.io import parse_yaml_mapping

    with pytest.raises(ConfigError, match=f"line 2, column 13: {value} is a base-60 number in YAML 1.1 \\({reads}\\)"):
        parse_yaml_mapping(f"name: x\nbatch_size: {value}\n")
    assert parse_yaml_mapping("a: '1:00'\nb: 10:00:00 text\n") == {"a": "1:00", "b": "10:00:00 text"}
