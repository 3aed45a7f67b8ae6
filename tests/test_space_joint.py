"""Space values valid alone but not together: refused before anything starts where validation can
see them (every combination of the domains' ends and choices), and where it cannot (an interior
value of a range), one failed trial with its reason while the rest of the search goes on."""

from __future__ import annotations

import io
import json
import logging

import pytest
import yaml
from mlflow import MlflowClient

from iterhead.search.cli import main
from iterhead.search.run import STATE_FILE, SearchOptions, run_search
from iterhead.search.spec import Domain, load_search
from iterhead.search.spec_checks import joint_probes
from iterhead.trainable import results

BASE = {
    "name": "joint-base", "seed": 0,
    "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "dropout": 0.0},
    "data": {"min_len": 1, "max_len": 3, "train_per_len": 32, "test_per_len": 16, "cot": True},
    "tasks": {"parity": {"kind": "parity"}, "polynomial": {"kind": "polynomial", "modulus": 5}},
    "optim": {"lr": 3.0e-3, "batch_size": 32},
    "stages": [{"name": "pretrain", "mix": {"polynomial": 1.0}, "epochs": 1},
               {"name": "finetune", "mix": {"parity": 1.0}, "epochs": 2}],
    "target": {"task": "parity", "accuracy": 1.0},
    "eval": {"every_epochs": 1, "probe_per_len": 2},
}


def write(tmp_path, space: dict, base: dict = BASE, **spec):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "joint", "base": "base.yaml", "space": space,
                                    "search": {"algorithm": "random"}, **spec}, sort_keys=False))
    return path


LONG = {**BASE, "data": {**BASE["data"], "max_len": 8}}  # lengths 1..8: min_len 4 and max_len 2 are each fine
MIXED = {**BASE, "stages": [BASE["stages"][0], {**BASE["stages"][1], "mix": {"parity": 0.5, "polynomial": 0.5}}]}

# (space, base, field, words): each value is valid alone, the space is not
BAD = {
    "choices-clash": ({"data.min_len": {"choice": [3]}, "data.max_len": {"choice": [2]}}, BASE, "space.data.max_len",
                      "data.min_len = 3 with data.max_len = 2 make the curriculum invalid (data.max_len: max_len (2) "
                      "must be >= min_len (3)), though each is valid alone; narrow these domains"),
    "ranges-clash": ({"data.min_len": {"randint": [1, 4]}, "data.max_len": {"randint": [2, 8]}}, LONG,
                     "space.data.max_len", "data.min_len = 4 with data.max_len = 2 make the curriculum invalid"),
    "clash-named-without-bystanders": (  # the other keys take part in no clash, so the message leaves them out
        {"optim.lr": {"uniform": [1.0e-3, 2.0e-3]}, "data.min_len": {"randint": [1, 3]},
         "stages.pretrain.epochs": {"randint": [0, 3]}, "data.max_len": {"grid": [8, 2]}}, LONG,
        "space.data.max_len", ": data.min_len = 3 with data.max_len = 2 make"),
    # both could be 0 together; searching every task of a mix is refused before that (the shares
    # would be rescaled behind the values recorded), and with one task left out they cannot be
    "mix-shares-sum-to-nothing": (
        {"stages.finetune.mix.parity": {"choice": [0.0, 0.5]}, "stages.finetune.mix.polynomial": {"choice": [0.0, 0.5]}},
        MIXED, "space.stages.finetune.mix.parity",
        "stage 'finetune' of the base trains only parity, polynomial, which the space searches"),
    "stage-renamed": ({"stages.pretrain.name": {"choice": ["warmup"]}, "stages.pretrain.epochs": {"choice": [1]}}, BASE,
                      "space.stages.pretrain.name", "a search cannot rename stage 'pretrain'"),
    "stage-renamed-alone": ({"stages.finetune.name": {"choice": ["finetune", "tune"]}}, BASE,
                            "space.stages.finetune.name", "a search cannot rename stage 'finetune'"),
    "mix-share-above-one": ({"stages.finetune.mix.polynomial": {"uniform": [0.5, 3.0]}}, BASE,
                            "space.stages.finetune.mix.polynomial",
                            "a mix share lies in [0, 1] (got [0.5, 3.0]): it is the task's fraction of the stage's "
                            "examples, and every share from 1 up trains the same mix"),
    "mix-share-choice-above-one": ({"stages.pretrain.mix.parity": {"choice": [0.2, 1.5]}}, BASE,
                                   "space.stages.pretrain.mix.parity", "a mix share lies in [0, 1] (got [0.2, 1.5])"),
}


@pytest.mark.parametrize("space, base, field, words", BAD.values(), ids=BAD.keys())
def test_space_that_clashes_exits_2_with_one_line(tmp_path, capsys, space, base, field, words):
    path = write(tmp_path, space, base)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {path}: {field}: ") and words in err[0], err


def test_search_of_a_clashing_space_starts_nothing(tmp_path, capsys):
    """The reviewer's case: exit 2 from `iterhead search`, no store, no search folder, no Ray."""
    import ray

    path = write(tmp_path, {"data.min_len": {"choice": [3]}, "data.max_len": {"choice": [2]}})
    assert main(["search", str(path), "--num-cpus", "2", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
                 "--storage-path", str(tmp_path / "runs")]) == 2
    assert "space.data.max_len" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()
    assert not ray.is_initialized()


def test_shares_within_zero_and_one_and_spaces_that_fit_together_pass(tmp_path):
    path = write(tmp_path, {"stages.finetune.mix.polynomial": {"uniform": [0.0, 1.0]},
                            "stages.pretrain.mix.parity": {"choice": [0, 0.5, 1]},
                            "data.min_len": {"randint": [1, 2]}, "data.max_len": {"randint": [2, 8]}}, LONG)
    assert load_search(path).spec.space


def test_joint_probes_are_every_combination_up_to_the_limit_then_a_fixed_sample():
    space = {k: Domain(choice=[0, 1, 2]) for k in "abcd"}  # 81 combinations
    every = joint_probes(space, limit=81)
    assert len(every) == 81 and len({tuple(c.values()) for c in every}) == 81
    sample = joint_probes(space, limit=20)
    assert len(sample) == 20 and sample == joint_probes(space, limit=20)  # the same spec validates the same way
    assert all(set(c) == set("abcd") and set(c.values()) <= {0, 1, 2} for c in sample)


# -- at run time: a trial whose interior value is invalid fails alone --------------------------


@pytest.fixture(scope="module", params=[None, [0, 1]], ids=["one-seed", "replicates"])
def odd_search(request, ray_local, tmp_path_factory):
    """d_model drawn from 30..32 with two heads: the ends validate, 31 does not divide. Random
    search seed 0 draws 32 then 31 (checked below), so one trial trains and one cannot."""
    folder = tmp_path_factory.mktemp("odd")
    extra = {"seeds": request.param} if request.param else {}
    path = write(folder, {"model.d_model": {"randint": [30, 32]}},
                 search={"algorithm": "random", "num_samples": 2, "max_concurrent": 2, "scheduler": "none",
                         "seed": 0, "max_failures": 2},
                 resources={"cpu": 1}, **extra)
    uri = f"sqlite:///{folder}/mlflow.db"
    out = io.StringIO()
    tune_log, shown = logging.getLogger("ray.tune.execution.tune_controller"), _Kept()
    tune_log.addHandler(shown)  # gets what passes the logger's filters, as the terminal's handler does
    try:
        rows = run_search(load_search(path), SearchOptions(uri=uri, storage_path=str(folder / "runs")), out=out)
    finally:
        tune_log.removeHandler(shown)
    return rows, MlflowClient(uri), folder, out.getvalue() + "".join(shown.lines), request.param


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(logging.Formatter().format(record) + "\n")


def test_invalid_trial_fails_alone_and_the_search_finishes(odd_search):
    rows, _, folder, out, _ = odd_search
    by_value = {row["model.d_model"]: row for row in rows}
    assert sorted(by_value) == [31, 32], "the sampler no longer draws one odd and one even d_model; change its seed"
    assert by_value[31]["status"] == "ERROR" and by_value[32]["status"] == "TERMINATED"
    assert (f"trial {by_value[31]['trial_id']} FAILED (its sampled values make an invalid curriculum: "
            "model.d_model: d_model (31) must be divisible by n_heads (2))") in out
    assert "Trial task failed" not in out and "Traceback" not in out  # the one line above says it all
    summary = out[out.index("reached the target"):]
    assert any(line.split(" | ")[0].strip() == by_value[31]["trial_id"] and line.endswith("| failed")
               for line in summary.splitlines())  # not a NaN passed off as a censored compute
    (state,) = folder.glob(f"runs/*/{STATE_FILE}")
    assert json.loads(state.read_text())["state"] == "finished"
    (error,) = folder.glob("runs/*/*d_model=31*/error.txt")
    text = error.read_text()
    assert "must be divisible by n_heads" in text
    assert text.count("Failure #") == 1  # not retried: it would fail the same way again


def test_invalid_trial_run_is_failed_with_its_values_and_reason(odd_search):
    rows, client, _, _, seeds = odd_search
    exp = client.get_experiment_by_name("joint")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("iterhead.kind") == "search"]
    assert parent.info.status == "FINISHED"
    assert all(r.info.status != "RUNNING" for r in runs)
    bad = next(row for row in rows if row["model.d_model"] == 31)
    (run,) = [r for r in runs if r.data.tags.get("iterhead.trial_id") == bad["trial_id"]]
    assert run.info.status == "FAILED" and run.data.params == {"model.d_model": "31"}
    assert run.data.tags[results.INVALID_TAG] == "model.d_model: d_model (31) must be divisible by n_heads (2)"
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert not client.list_artifacts(run.info.run_id)  # no curriculum to show: there is none
    good = next(row for row in rows if row["model.d_model"] == 32)
    trained = [r for r in runs if r.data.tags.get("iterhead.trial_id") == good["trial_id"]]
    assert len(trained) == 1 + len(seeds or []) and all(r.info.status == "FINISHED" for r in trained)


def test_only_a_refused_trial_curriculum_loses_tunes_traceback():
    """The filter hides Tune's traceback of the error a trial's worker raised for the curriculum the
    callback already named as invalid; any other failure, a ConfigError included, keeps it."""
    from ray.exceptions import RayTaskError

    from iterhead.curricula.errors import ConfigError
    from iterhead.search.quiet import _not_invalid_trial_traceback as shown

    def record(cause: Exception, message: str = "Trial task failed for trial train_trial_1") -> logging.LogRecord:
        error = RayTaskError("train", "Traceback (most recent call last): ...", cause).as_instanceof_cause()
        return logging.LogRecord("ray.tune.execution.tune_controller", logging.ERROR, __file__, 1, message, None,
                                 (type(error), error, None))

    assert not shown(record(ConfigError("d_model (31) must be divisible by n_heads (2)", file="trial")))
    assert shown(record(ConfigError("no such file", file="base.yaml")))
    assert shown(record(ValueError("a bug")))
    assert shown(record(ConfigError("x", file="trial"), message="something else"))
