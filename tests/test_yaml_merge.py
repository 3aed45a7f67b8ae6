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
