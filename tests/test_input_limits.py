"""Input at the edges of what the schema allows: each is exit 2 with one line naming the file
(or flag) and the field, before anything trains or any store is touched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from iterhead.search.cli import main

from support import PARITY_BASE, web_server

MIX = {"name": "b", "seed": 0, **{k: v for k, v in PARITY_BASE.items() if k not in ("name", "seed")},
       "tasks": {"parity": {"kind": "parity"}, "polynomial": {"kind": "polynomial"}, "copy": {"kind": "copy"}},
       "stages": [{"name": "train", "mix": {"parity": 1.0, "polynomial": 1.0, "copy": 1.0}, "epochs": 2}]}


def write(folder: Path, name: str, data: Any) -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def spec(folder: Path, **fields: Any) -> Path:
    write(folder, "base.yaml", MIX)
    return write(folder, "spec.yaml", {"name": "s", "base": "base.yaml", **fields})


def error_of(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The one stderr line of a command that must exit 2."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


CURRICULA = {  # the curriculum's change: what the line must say
    "lr-past-float32": ({"optim": {**PARITY_BASE["optim"], "lr": 1e38}}, "optim.lr: "),
    "weight-decay-past-float32": ({"optim": {**PARITY_BASE["optim"], "weight_decay": 1e300}}, "optim.weight_decay: "),
    "stage-lr-past-float32": ({"stages": [{**PARITY_BASE["stages"][0], "lr": 1e39}]}, "stages[0].lr: "),
    "target-below-the-slack": ({"target": {"task": "parity", "accuracy": 1e-13}}, "target.accuracy: "),
    # validate said ok; train failed in an allocation (a traceback, a FAILED run), or validate hung
    "model-past-any-memory": ({"model": {**PARITY_BASE["model"], "d_model": 10**12}}, "model: its weights"),
    "layers-past-listing": ({"model": {**PARITY_BASE["model"], "d_model": 4, "n_heads": 1, "n_layers": 10**7}},
                            "model.n_layers: "),  # small weights, but 9 module names a layer to list
    "mlp-past-int64": ({"model": {**PARITY_BASE["model"], "mlp_ratio": 10**20}}, "model: its weights"),
    "data-past-any-memory": ({"data": {**PARITY_BASE["data"], "train_per_len": 10**14}}, "data: its tokens"),
    # a line of every module of the model (100 KB): a bounded listing, the nearest name still found
    "module-list-of-1024-layers": ({"model": {**PARITY_BASE["model"], "d_model": 8, "n_layers": 1024},
                                    "stages": [{**PARITY_BASE["stages"][0], "train_modules": ["blocks.1000.mlpp"]}]},
                                   "did you mean 'blocks.1000.mlp'? (modules of this model: blocks, blocks.0, "),
    # validate said ok; train failed in the sampler (numpy's offsets turned float), after the run was made
    "batch-past-int64": ({"optim": {**PARITY_BASE["optim"], "batch_size": 2**63}}, "optim.batch_size: "),
    # validate said ok; a search failed on the planned FLOPs (an int past a float) after Ray started
    "epochs-past-float": ({"stages": [{**PARITY_BASE["stages"][0], "epochs": 10**400}]}, "stages[0].epochs: "),
}


@pytest.mark.parametrize("change, words", CURRICULA.values(), ids=list(CURRICULA))
def test_curricula_that_would_fail_or_mislead_in_training(tmp_path, capsys, change, words):
    path = write(tmp_path, "c.yaml", {**PARITY_BASE, **change})
    err = error_of(capsys, ["validate", str(path)])
    assert words in err and len(err) < 1000, err[:2000]


def test_a_file_of_nested_aliases_is_refused_at_once(tmp_path):
    """A 900-byte file whose aliases nest a billion items: the message shows a bounded piece of
    the value, where the whole repr ran out of memory (a subprocess, so that a regression fails
    here instead of taking the machine)."""
    def nested(i: int) -> str:  # 10^(i + 1) items
        return "&a0 [x, x, x, x, x, x, x, x, x, x]" if i == 0 else f"&a{i} [{nested(i - 1)}" + f", *a{i - 1}" * 9 + "]"

    text = yaml.safe_dump({k: v for k, v in PARITY_BASE.items() if k != "seed"}) + f"seed: {nested(8)}\n"
    path = write(tmp_path, "laugh.yaml", text)
    out = subprocess.run([str(Path(sys.executable).parent / "iterhead"), "validate", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "seed: " in out.stderr, out.stderr[-500:]


SPECS = {  # the spec's fields: what the line must say
    "shares-past-one": ({"space": {"stages.train.mix.parity": {"uniform": [0.0, 1.0]},
                                   "stages.train.mix.polynomial": {"uniform": [0.0, 0.6]}},
                         "search": {"algorithm": "random"}},
                        "can sum to 1.6, past 1"),
    "bool-seed": ({"seeds": [0, True]}, "not the boolean true"),
    "bool-randint": ({"space": {"stages.train.epochs": {"randint": [False, True]}},
                      "search": {"algorithm": "random"}}, "not the boolean false"),
    "randint-past-int64": ({"space": {"stages.train.epochs": {"randint": [0, 10**23]}},
                            "search": {"algorithm": "random"}}, "fit in a 64-bit integer"),
    "asha-rungs-past-counting": ({"search": {"reduction_factor": 1.000000000000001}},  # hung after Ray started
                                 "search.reduction_factor: 1.000000000000001 with grace_fraction 0.111 gives ASHA "),
    # Ray refused shares below its unit with a traceback, after the parent run was made
    "cpu-below-ray-unit": ({"resources": {"cpu": 1e-5}}, "resources.cpu: Input should be greater than or equal to "),
    "gpu-below-ray-unit": ({"resources": {"gpu": 1e-9}}, "resources.gpu: Ray schedules GPU shares of at least 0.0001"),
    # the rule that refuses searching a stage's only task comes first: the value 0 was refused
    # before it, and its message led to a lower end that the rule then refused
    "only-task-share-from-0": ({"base": "only.yaml", "space": {"stages.train.mix.parity": {"uniform": [0.0, 0.4]}},
                                "search": {"algorithm": "random"}}, "trains only parity, which the space searches"),
    # a list of nested aliases in a share's choice: a message of hundreds of MB
    "nested-share-choice": ({"space": {"stages.train.mix.parity": {"choice": yaml.safe_load(
        "[&a [x, x, x, x], &b [*a, *a, *a, *a], &c [*b, *b, *b, *b], &d [*c, *c, *c, *c], 2.0]")}},
        "search": {"algorithm": "random"}}, "a mix share lies in [0, 1] (got [['x', 'x', 'x', 'x'], "),
}


@pytest.mark.parametrize("fields, words", SPECS.values(), ids=list(SPECS))
def test_specs_that_would_search_other_values_than_recorded_or_fail_after_ray(tmp_path, capsys, fields, words):
    write(tmp_path, "only.yaml", PARITY_BASE)
    err = error_of(capsys, ["validate", str(spec(tmp_path, **fields))])
    assert words in err and len(err) < 1000, err[:2000]


@pytest.mark.parametrize("key", [r"x\ny", r"x\ry", r"x\x1b[31my", r"x\u2028y"],
                         ids=["newline", "return", "escape", "line-separator"])
@pytest.mark.parametrize("where", ["top", "mix", "space"])
def test_a_key_that_breaks_lines_is_named_escaped_on_the_one_line(tmp_path, capsys, key, where):
    """The field path is the user's key: it was written raw, and a newline in it split the line."""
    raw = key.encode().decode("unicode_escape")
    if where == "top":
        path = write(tmp_path, "c.yaml", {**PARITY_BASE, raw: 1})
    elif where == "mix":
        path = write(tmp_path, "c.yaml", {**PARITY_BASE, "stages": [{**PARITY_BASE["stages"][0], "mix": {raw: 1.0}}]})
    else:
        path = spec(tmp_path, space={f"optim.lr{raw}": {"uniform": [0.001, 0.01]}}, search={"algorithm": "random"})
    err = error_of(capsys, ["validate", str(path)])
    assert key in err and raw not in err, err


def test_a_choice_of_epochs_written_as_text_and_numbers_validates(tmp_path, capsys):
    """The schema reads "3" as 3, and so does the check that some trial trains."""
    path = spec(tmp_path, space={"stages.train.epochs": {"choice": ["3", 3]}}, search={"algorithm": "random"})
    assert main(["validate", str(path)]) == 0


@pytest.mark.parametrize("base", ["a\0b.yaml", "x" * 5000 + ".yaml"], ids=["nul-byte", "name-too-long"])
def test_a_base_no_file_can_have_is_named(tmp_path, capsys, base):
    path = write(tmp_path, "spec.yaml", {"name": "s", "base": base})
    assert ": base: no curriculum file at " in error_of(capsys, ["validate", str(path)])


def test_a_spec_without_base_is_told_it_needs_one(tmp_path, capsys):
    path = write(tmp_path, "spec.yaml", {"name": "s", "space": {"optim.lr": {"uniform": [0.001, 0.01]}}})
    assert ": base: " in error_of(capsys, ["validate", str(path)])


def test_train_checks_its_experiment_name_and_store_before_building_anything(tmp_path, capsys, monkeypatch):
    path = write(tmp_path, "c.yaml", PARITY_BASE)
    uri = f"sqlite:///{tmp_path}/m.db"
    err = error_of(capsys, ["train", str(path), "--tracking-uri", uri, "--experiment", "x" * 501])
    assert "--experiment: " in err and not (tmp_path / "m.db").exists()
    write(tmp_path, "notes.db", "not a database\n")
    err = error_of(capsys, ["train", str(path), "--tracking-uri", f"sqlite:///{tmp_path}/notes.db"])
    assert "is not a sqlite database" in err and (tmp_path / "notes.db").read_text() == "not a database\n"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path}/mlruns")
    assert error_of(capsys, ["train", str(path)]).startswith("error: MLFLOW_TRACKING_URI: ")


@pytest.mark.parametrize("kind", ["pipe", "device", "huge"])
def test_a_file_that_is_no_regular_file_or_too_big_to_be_a_curriculum_is_refused(tmp_path, kind):
    """A named pipe blocked `validate` forever and /dev/zero filled memory (/dev/null stands in
    for devices here). A subprocess with a timeout, so that a regression fails instead of hanging."""
    import os

    if kind == "pipe":
        path = tmp_path / "c.yaml"
        os.mkfifo(path)
    else:
        path = Path("/dev/null") if kind == "device" else write(tmp_path, "c.yaml", "#" * (17 * 2**20))
    out = subprocess.run([str(Path(sys.executable).parent / "iterhead"), "validate", str(path)], capture_output=True,
                         text=True, timeout=60)
    words = "larger than 16 MiB" if kind == "huge" else "not a regular file"
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and words in out.stderr, out.stderr[-500:]


@pytest.mark.parametrize("command", ["search-storage-path", "ablate", "train-store", "export"])
def test_a_path_with_a_name_past_the_file_system_limit_exits_2(tmp_path, capsys, command):
    """A path component over 255 bytes made `exists()` raise ENAMETOOLONG: tracebacks, exit 1."""
    long = str(tmp_path / ("a" * 300))
    base = write(tmp_path, "c.yaml", PARITY_BASE)
    argv = {"search-storage-path": ["search", str(spec(tmp_path)), "--storage-path", long,
                                    "--tracking-uri", f"sqlite:///{tmp_path}/m.db"],
            "ablate": ["ablate", "--checkpoint", long],
            "train-store": ["train", str(base), "--tracking-uri", f"sqlite:///{long}/m.db"],
            "export": ["export", "--experiment", "s", "-o", f"{long}.yaml",
                       "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]}
    if command == "export":  # a store to export from, with an experiment of that name
        from mlflow import MlflowClient

        MlflowClient(f"sqlite:///{tmp_path}/m.db").create_experiment("s")
    err = error_of(capsys, argv[command])
    assert "too long" in err and "a" * 300 in err, err


def test_a_query_in_a_sqlite_uri_is_no_part_of_the_store_file(tmp_path, capsys, monkeypatch):
    """SQLAlchemy ends a sqlite path at the first '?' and decodes %xx: the checks on the store's file
    look at that file, so a store is found, and a file that is no database is bad input."""
    from mlflow import MlflowClient

    from iterhead.search.folder import absolute_uri
    from iterhead.search.tracking import sqlite_file

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    MlflowClient(f"sqlite:///{tmp_path}/e.db").create_experiment("e")
    capsys.readouterr()  # MLflow's notes on making the store
    uri = f"sqlite:///{tmp_path}/e.db?timeout=20"
    assert "experiment 'e' holds no search" in error_of(capsys, ["export", "--experiment", "e", "--tracking-uri",
                                                                 uri, "-o", "best.yaml"])
    write(tmp_path, "notes.db", "not a database\n")
    err = error_of(capsys, ["train", str(write(tmp_path, "c.yaml", PARITY_BASE)), "--tracking-uri",
                            f"sqlite:///{tmp_path}/notes.db?timeout=20"])
    assert err.startswith("error: --tracking-uri: ") and "notes.db' is not a sqlite database" in err, err
    assert absolute_uri("sqlite:///e.db?timeout=20") == uri
    MlflowClient(f"sqlite:///{tmp_path}/e b.db").create_experiment("e")  # SQLAlchemy decodes %20 as a space
    capsys.readouterr()
    assert "experiment 'e' holds no search" in error_of(capsys, ["export", "--experiment", "e", "--tracking-uri",
                                                                 f"sqlite:///{tmp_path}/e%20b.db", "-o", "b.yaml"])
    for name in ("a%2541.db", "a%3Fb.db", "a%23b.db"):  # made absolute, the URI names the same file again
        assert sqlite_file(absolute_uri(f"sqlite:///{name}?timeout=20")) == sqlite_file(f"sqlite:///{name}").resolve()


@pytest.mark.parametrize("given", ["flag", "env"])
@pytest.mark.parametrize("command", ["train", "search", "export", "report", "reconcile"])
def test_a_sqlite_database_of_other_tables_is_no_store_and_stays_as_it_was(tmp_path, capsys, monkeypatch,
                                                                           command, given):
    """MLflow adds its tables to any database it is given, then fails on a table of the user's that
    shares a name with one of its own: a user's database is bad input, read without a write."""
    import sqlite3
    from contextlib import closing

    from iterhead.search import run
    from iterhead.search.tracking import resolve_uri

    from support import no_ray

    monkeypatch.setattr(run, "start_ray", no_ray)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with closing(sqlite3.connect(tmp_path / "mine.db")) as db:
        db.executescript("CREATE TABLE runs(x text); INSERT INTO runs VALUES ('kept');")
    before = (tmp_path / "mine.db").read_bytes()
    uri = f"sqlite:///{tmp_path}/mine.db"
    args = {"train": [str(write(tmp_path, "c.yaml", PARITY_BASE))], "search": [str(spec(tmp_path))],
            "export": ["--experiment", "s", "-o", "best.yaml"], "report": ["--experiment", "s"], "reconcile": []}
    if given == "env":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    err = error_of(capsys, [command, *args[command], *(["--tracking-uri", uri] if given == "flag" else [])])
    field = "--tracking-uri" if given == "flag" else "MLFLOW_TRACKING_URI"
    assert err.startswith(f"error: {field}: ") and "is a sqlite database of other tables ('runs')" in err, err
    assert (tmp_path / "mine.db").read_bytes() == before and not (tmp_path / "mlruns").exists()
    with closing(sqlite3.connect(tmp_path / "new.db")) as db:  # a database without tables: a new store
        db.executescript("CREATE TABLE t(x); DROP TABLE t;")
    assert resolve_uri(f"sqlite:///{tmp_path}/new.db") == f"sqlite:///{tmp_path}/new.db"


@pytest.mark.parametrize("argv, words", [
    (["--num-cpus", str(10**20)], "--num-cpus: must be from 1 to 1e+14 (Ray's limit)"),
    (["--num-cpus", "2", "--address", "127.0.0.1:1"], "--num-cpus: sets the CPUs of the embedded local Ray, but "
                                                      "--address names a cluster"),
])
def test_a_cpu_count_ray_would_refuse_or_ignore_exits_2(tmp_path, capsys, monkeypatch, argv, words):
    """Ray refused 10^20 CPUs in a ValueError after the folder and the store were made; a cluster
    joined at an address keeps its own CPUs, so --num-cpus was ignored there without a word."""
    from iterhead.search import run

    from support import no_ray

    monkeypatch.setattr(run, "start_ray", no_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    path = spec(tmp_path)
    assert words in error_of(capsys, ["search", str(path), "--tracking-uri", f"sqlite:///{tmp_path}/m.db", *argv])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.yaml", "spec.yaml"]


def test_num_cpus_with_ray_address_set_names_the_way_to_the_embedded_ray(tmp_path, capsys, monkeypatch):
    """With RAY_ADDRESS exported, --num-cpus alone is refused with the way out; --address local
    (or RAY_ADDRESS=local) takes it for the embedded Ray, up to where Ray would start."""
    from iterhead.search import run

    from support import no_ray

    monkeypatch.setattr(run, "start_ray", no_ray)
    monkeypatch.chdir(tmp_path)
    argv = ["search", str(spec(tmp_path)), "--tracking-uri", f"sqlite:///{tmp_path}/m.db", "--num-cpus", "1"]
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert error_of(capsys, argv).endswith("leave --num-cpus out (or pass --address local for the embedded Ray)\n")
    for extra, env in (["--address", "local"], "127.0.0.1:1"), ([], "local"):
        monkeypatch.setenv("RAY_ADDRESS", env)
        with pytest.raises(AssertionError, match="Ray was started"):
            main(argv + extra)


@pytest.mark.parametrize("storage", ["runs/deep", "kept"])
def test_a_search_whose_store_is_no_mlflow_server_exits_2_and_leaves_no_folder(tmp_path, capsys, monkeypatch,
                                                                                 storage):
    """The answer comes after the search's folder is made and Ray started: the folder was removed,
    but not the storage folders made above it (an empty ./ray_results after every such failure).
    A storage folder that was there before stays."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    write(tmp_path, "c.yaml", PARITY_BASE)
    write(tmp_path, "spec.yaml", {"name": "s", "base": "c.yaml"})
    (tmp_path / "kept").mkdir()
    with web_server(404, b"<html>Not Found</html>") as uri:
        code = main(["search", "spec.yaml", "--tracking-uri", uri, "--storage-path", storage, "--num-cpus", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is no MLflow tracking server" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "kept", "spec.yaml"]
    assert not any((tmp_path / "kept").iterdir())
