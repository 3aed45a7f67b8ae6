"""Attention interventions rewrite exactly the entries they name, and the command reports them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from iterhead.search.cli import main
from iterhead.trainable import checkpoint
from iterhead.trainable.ablation import accuracy_under, ideal, interventions, zero_eoi, zero_iteration
from iterhead.trainable.loop import Trainer
from iterhead.trainable.seeds import Seeds

from support import damage_a_record, tiny

L = 3  # inputs [task, x1 x2 x3, EoI, s1 s2]: 7 positions, EoI at 4


def uniform(tq: int = 7, t: int = 7) -> torch.Tensor:
    return torch.full((1, 1, tq, t), 1.0 / t)


def test_zero_eoi_clears_cot_to_eoi_only():
    out = zero_eoi(uniform())[0, 0]
    assert out[5:, 4].eq(0).all() and out[:5, 4].gt(0).all()  # queries s1, s2 -> EoI cleared
    assert out[:, :4].eq(1 / 7).all()


def test_zero_iteration_clears_the_diagonal_in_a_query_window():
    window = zero_iteration(uniform(tq=3))[0, 0]  # queries 4, 5, 6 (the last layer's window)
    assert [window[i, i + 1].item() for i in range(3)] == [0.0, 0.0, 0.0]  # L+t -> x_t
    assert window.sum() > 0


def test_ideal_maps_are_one_hot_rows():
    for layer in (0, 1):
        p = ideal(layer)(uniform())[0, 0]
        torch.testing.assert_close(p.sum(-1), torch.ones(7))
    assert ideal(0)(uniform())[0, 0][6, 4] == 1.0 and ideal(1)(uniform())[0, 0][5, 2] == 1.0


def test_each_pattern_is_zeroed_in_every_layer_the_model_has():
    """Zeroed only where the paper's circuit puts it (x_t in layer 1), a model whose x_t head sits
    in layer 0 read as having none: each layer gets its own row."""
    three = interventions(3)
    for layer in range(3):
        assert three[f"zero_eoi_l{layer}"] == {layer: zero_eoi}
        assert three[f"zero_iteration_l{layer}"] == {layer: zero_iteration}
    assert [sorted(three[name]) for name in ("ideal_l0", "ideal_l1", "ideal_both")] == [[0], [1], [0, 1]]
    assert len(three) == 9 and "ideal_l1" not in interventions(1)


def test_ablate_command_reports_every_intervention(tmp_path, capsys):
    trainer = Trainer(tiny())
    for _ in trainer.run():
        pass
    checkpoint.save(trainer.state_dict(), tmp_path)
    assert main(["ablate", "--checkpoint", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines()[2:]]
    assert rows == ["none", "zero_eoi_l0", "zero_eoi_l1", "zero_iteration_l0", "zero_iteration_l1",
                    "ideal_l0", "ideal_l1", "ideal_both"]
    assert main(["ablate", "--checkpoint", str(tmp_path / "nothing")]) == 2


def test_a_one_layer_model_is_not_reported_under_layer_1_interventions(tmp_path, capsys):
    """A 1-layer model has no layer 1: its rows would repeat the model's own accuracy as if
    an intervention had run, so they are left out and named as not run."""
    trainer = Trainer(tiny(model={"d_model": 16, "n_layers": 1, "n_heads": 1, "dropout": 0.0}))
    for _ in trainer.run():
        pass
    with pytest.raises(ValueError, match="no layer 1"):
        accuracy_under(trainer, {1: zero_iteration})
    checkpoint.save(trainer.state_dict(), tmp_path)
    assert main(["ablate", "--checkpoint", str(tmp_path)]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["none", "zero_eoi_l0", "zero_iteration_l0", "ideal_l0", "not"]  # "not run: ..."


def test_ablate_reads_each_seed_of_a_replicate_checkpoint(tmp_path, capsys):
    """A replicate trial's checkpoint holds every seed's state: each is ablated (or the one asked
    for), with the numbers a single run of that seed gives."""
    seeds = Seeds(tiny(), [0, 1])
    for _ in seeds.run():
        pass
    checkpoint.save(seeds.state_dict(), tmp_path / "both")
    checkpoint.save(seeds.trainers[1].state_dict(), tmp_path / "one")
    assert main(["ablate", "--checkpoint", str(tmp_path / "both")]) == 0
    both = capsys.readouterr().out
    assert both.count("seed 0\n") == 1 and both.count("seed 1\n") == 1
    assert main(["ablate", "--checkpoint", str(tmp_path / "both"), "--seed", "1"]) == 0
    picked = capsys.readouterr().out
    assert main(["ablate", "--checkpoint", str(tmp_path / "one")]) == 0
    assert picked == capsys.readouterr().out == both[both.index("seed 1\n"):]
    assert main(["ablate", "--checkpoint", str(tmp_path / "both"), "--seed", "7"]) == 2
    assert "--seed" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real checkpoint folder of a trained tiny curriculum (read-only to the tests: they copy it)."""
    trainer = Trainer(tiny())
    for _ in trainer.run():
        pass
    return checkpoint.save(trainer.state_dict(), tmp_path_factory.mktemp("trained")).parent


def refused(args: list[str], capsys) -> str:
    """`iterhead ablate` exits 2 with one line on stderr naming --checkpoint, and prints no table."""
    assert main(["ablate", "--device", "cpu", *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "--checkpoint" in err[0] and "not a readable checkpoint" in err[0], err
    assert captured.out == ""
    return err[0]


def test_a_checkpoint_whose_bytes_changed_is_refused_naming_the_record(trained, tmp_path, capsys):
    """torch.load reads a flipped weight record as other numbers; ablate printed their table, exit 0."""
    shutil.copytree(trained, tmp_path / "copy")
    file = tmp_path / "copy" / checkpoint.FILENAME
    record = damage_a_record(file)
    line = refused(["--checkpoint", str(file.parent)], capsys)
    assert str(file) in line and f"record {record} fails its CRC32 check" in line
    assert main(["ablate", "--device", "cpu", "--checkpoint", str(trained)]) == 0  # the intact one still reads
    assert "seed 0" in capsys.readouterr().out


def _drop(part: str) -> Callable[[dict[str, Any]], Any]:
    return lambda state: {k: v for k, v in state.items() if k != part}


WRONG_SHAPES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "seeds-a-string": lambda state: {"seeds": "abc"},
    "seeds-empty": lambda state: {"seeds": []},  # printed nothing and exited 0
    "seeds-not-states": lambda state: {"seeds": [state, 5]},
    "a-list": lambda state: [state],
    "no-model": _drop("model"),
    "no-position": _drop("position"),
    "no-optimizer": _drop("optimizer"),
    "position-with-foreign-fields": lambda state: {**state, "position": {"stage": 0, "epoch": 1, "step": 3}},
    "weights-of-another-model": lambda state: {**state, "model": Trainer(tiny(model={
        "d_model": 16, "n_layers": 2, "n_heads": 2, "dropout": 0.1})).model.state_dict()},
}


@pytest.mark.parametrize("reshape", WRONG_SHAPES.values(), ids=WRONG_SHAPES.keys())
def test_a_checkpoint_of_the_wrong_shape_exits_2_with_one_line(trained, tmp_path, capsys, reshape):
    """A loadable file whose object is not trainer states: one line, not a TypeError or KeyError traceback."""
    state = checkpoint.load(trained)
    checkpoint.save(reshape(state), tmp_path)
    refused(["--checkpoint", str(tmp_path)], capsys)


def test_a_state_whose_curriculum_is_not_one_exits_2_naming_the_file(trained, tmp_path, capsys):
    """The seed was read from it before it was parsed: a KeyError traceback."""
    checkpoint.save({**checkpoint.load(trained), "curriculum": {"name": "x"}}, tmp_path)
    assert main(["ablate", "--device", "cpu", "--checkpoint", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path / checkpoint.FILENAME}: tasks: required field is missing" in err[0], err
