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


@pytest.mark.parametrize("value, words", [
    ("010", "010 is the octal number 8 in YAML 1.1 (and 10 in YAML 1.2); write the number without the leading "
            "zero, or quote it for text"),
    ("-0_10", "-0_10 is the octal number -8 in YAML 1.1 (and -10 in YAML 1.2)"),
    ("!!int '010'", "010 is the octal number 8 in YAML 1.1 (and 10 in YAML 1.2); write the number without the "
                    "leading zero"),
])
def test_an_integer_with_a_leading_zero_is_refused_where_the_yaml_versions_disagree(value: str, words: str) -> None:
    """`seed: 010` is 8 to YAML 1.1 (PyYAML) and 10 to YAML 1.2: a run seeded otherwise than written,
    without a word. 07, 00 and 08 (no octal) read the same either way and pass."""
    from iterhead.curricula.io import parse_yaml_mapping

    with pytest.raises(ConfigError) as err:
        parse_yaml_mapping(f"name: x\nseed: {value}\n")
    assert f"line 2, column 7: {words}" in str(err.value), str(err.value)
    assert parse_yaml_mapping("a: 07\nb: 00\nc: 08\nd: '010'\ne: 0x10\n") == {"a": 7, "b": 0, "c": "08", "d": "010",
                                                                               "e": 16}


@pytest.mark.parametrize("value, shown, reads", [('!!int "1:30"', "!!int '1:30'", "90"),
                                                 ("!!int 1:30", "!!int '1:30'", "90"),
                                                 ("!!float '1:30.5'", "!!float '1:30.5'", "90.5")])
def test_a_tagged_base_60_number_is_refused_without_a_hint_to_quote_it(value: str, shown: str, reads: str) -> None:
    """`!!int "1:30"` is 90 to YAML 1.1 (quotes do not change what a tag reads) and no int to YAML 1.2:
    it is refused as the plain `1:30` is, but the message told the user to quote what was quoted."""
    from iterhead.curricula.io import parse_yaml_mapping

    with pytest.raises(ConfigError) as err:
        parse_yaml_mapping(f"name: x\nbatch_size: {value}\n")
    assert (f"line 2, column 13: {shown} is a base-60 number in YAML 1.1 ({reads}) and no number in YAML 1.2; "
            "write the number itself, without the tag") in str(err.value)
    assert "quote" not in str(err.value)


@pytest.mark.parametrize("value, words", [
    ('!!int "abc"', "!!int 'abc' is not a value of its tag; give one it reads, or drop the tag and quote it for text"),
    ('!!int ""', "!!int '' is not a value of its tag"), ("!!int 0b", "!!int '0b' is not a value of its tag"),
    ('!!float "0x1"', "!!float '0x1' is not a value of its tag"), ("!!bool maybe", "!!bool 'maybe' is not"),
    ("!!timestamp 2020-13-01", "(month must be in 1..12); give one it reads, or drop the tag and quote it for text"),
    ("!!map [1]", "a sequence tagged !!map does not read as one"),
    ("2020-13-45", "'2020-13-45' reads as a date in YAML 1.1 but is none (month must be in 1..12); quote it"),
    ("0x_", "'0x_' reads as an integer in YAML 1.1 but is none; quote it for text"),
])
def test_a_value_its_tag_cannot_read_is_one_line_with_its_line(tmp_path: Path, capsys, value: str, words: str) -> None:
    """PyYAML let these escape as ValueError, KeyError, IndexError or AttributeError: a traceback from
    `validate`, where a `name: 2020-13-45` (a date to YAML 1.1) is an easy thing to write."""
    from iterhead.search.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(EXAMPLE_TEXT.replace("seed: 0\n", f"seed: {value}\n"))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: YAML error at line ") and words in err, err
