"""Export's file handling: names stay inside the output folder, writes are atomic."""

from __future__ import annotations

import errno
import os

import pytest

from iterhead.search.export import Candidate, SeedRun, header, retrain_budget, safe_name, targets
from iterhead.trainable import results as r
from iterhead.trainable.checkpoint import write_atomic


def test_trial_names_cannot_escape_the_folder(tmp_path):
    evil = [Candidate("r1", "../../etc/passwd", {}, {}), Candidate("r2", "/abs/path", {}, {}),
            Candidate("r3", "..", {}, {})]
    paths = targets(tmp_path / "out", evil, 3)
    assert all(p.parent == (tmp_path / "out").resolve() for p in paths)
    assert safe_name("a/b\\c..d") == "a_b_c..d" and safe_name("..") == "trial"


def test_top_k_above_one_writes_a_folder_however_few_trials_reached(tmp_path):
    """The kind of OUT follows --top-k, not how many trials reached the target: the same command
    gives a folder whatever the search it reads."""
    one = [Candidate("r1", "t_00000", {}, {})]
    assert targets(tmp_path / "top3.yaml", one, 3) == [(tmp_path / "top3.yaml" / "01-t_00000.yaml").resolve()]
    assert targets(tmp_path / "best.yaml", one, 1) == [tmp_path / "best.yaml"]


def test_a_folder_of_another_export_is_refused_at_any_rank(tmp_path):
    from iterhead.curricula.errors import ConfigError
    from iterhead.search.export import check_folder

    out = tmp_path / "top"
    out.mkdir()
    mine = targets(out, [Candidate("r1", "t_00000", {}, {})], 200)
    (out / "notes.yaml").write_text("kept: 1\n")  # no export's: no rank
    check_folder(out, mine)
    (out / "100-t_00009.yaml").write_text("rank: 100\n")
    with pytest.raises(ConfigError, match="100-t_00009.yaml"):
        check_folder(out, mine)


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "best.yaml"
    path.write_text("old: 1\n")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError):
        write_atomic(path, lambda f: f.write(b"new: 2\n" * 1000))
    assert path.read_text() == "old: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["best.yaml"]  # no temporary left behind


EARLIER = "# exported by iterhead 0.1.0 on 2024-01-01 00:00:00\nold: 1\n"  # an earlier export's file


def store_with_a_reached_trial(tmp_path) -> str:
    """A real sqlite store holding a search whose one trial (t1) reached the target; its URI."""
    from mlflow import MlflowClient

    from iterhead.curricula.io import dump_curriculum

    from support import tiny

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "mlruns").as_uri())
    parent = client.create_run(exp, tags={"iterhead.kind": "search"}).info.run_id
    child = client.create_run(exp, tags={"mlflow.parentRunId": parent, "iterhead.trial_id": "t1"}).info.run_id
    client.log_metric(child, "reached", 1.0)
    client.log_metric(child, "compute_to_target", 1.0e9)
    client.log_text(child, dump_curriculum(tiny()), "curriculum.yaml")
    return uri


def test_export_on_a_full_disk_fails_cleanly_and_keeps_the_old_file(tmp_path, monkeypatch, capsys):
    """Through the CLI, from a real store: exit 1, one line, the earlier export untouched."""
    from iterhead.search.cli import main

    uri = store_with_a_reached_trial(tmp_path)
    out = tmp_path / "best.yaml"
    out.write_text(EARLIER)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    code = main(["export", "--experiment", "e", "--tracking-uri", uri, "-o", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 1 and len(err) == 1 and "No space left on device" in err[0]
    assert out.read_text() == EARLIER
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    monkeypatch.undo()
    assert main(["export", "--experiment", "e", "--tracking-uri", uri, "-o", str(out)]) == 0
    assert "trial t1" in out.read_text()


def test_export_over_a_file_that_is_no_export_exits_2_and_keeps_it(tmp_path, capsys):
    """-o naming the user's own curriculum (or the search's base file) replaced it, exit 0."""
    from iterhead.curricula.io import dump_curriculum
    from iterhead.search.cli import main

    from support import tiny

    uri = store_with_a_reached_trial(tmp_path)
    mine = tmp_path / "mine.yaml"
    mine.write_text("# my schedule, tuned by hand\n" + dump_curriculum(tiny(name="mine")))
    before = mine.read_bytes()
    capsys.readouterr()  # MLflow's notes on making the store
    assert main(["export", "--experiment", "e", "--tracking-uri", uri, "-o", str(mine)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: -o: {mine} exists and is not an earlier iterhead export"), err
    assert mine.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary either


def test_export_replaces_an_earlier_export(tmp_path, capsys):
    """Re-exporting to the same file is how an export is brought up to date: it is replaced."""
    from iterhead.search.cli import main

    uri = store_with_a_reached_trial(tmp_path)
    out = tmp_path / "best.yaml"
    out.write_text(EARLIER)
    assert main(["export", "--experiment", "e", "--tracking-uri", uri, "-o", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# exported by iterhead ") and "trial t1" in text and "old: 1" not in text
    assert main(["export", "--experiment", "e", "--tracking-uri", uri, "-o", str(out)]) == 0  # its own, again
    assert "trial t1" in out.read_text()


@pytest.mark.parametrize("device, kind, where", [("cpu", "cpu", "on CPU"), ("cuda:1", "cuda", "on a GPU of the model")])
def test_the_reproduce_command_pins_the_device_kind_it_trained_on(device, kind, where):
    """`iterhead train` takes a GPU wherever one is (`--device auto`); a result repeats on its
    own device kind only, so the command names it."""
    c = Candidate("r1", "t1", {r.COMPUTE_TO_TARGET: 1e9}, {r.DEVICE_TAG: device, r.THREADS_TAG: "2",
                                                            r.PRECISION_TAG: "bf16"})
    (line,) = [x for x in header(c, "e", "p", 1, "best.yaml").splitlines() if x.startswith("# reproduce")]
    assert where in line
    assert line.endswith(f"iterhead train best.yaml --device {kind} --threads 2 --precision bf16")


def test_the_retrain_budget_is_the_searchs_or_else_its_horizon_where_no_seed_passed_it():
    """A re-train charges a censored seed twice its budget: the search's budget where it had one;
    without one, its horizon (half its recorded penalty) for a configuration whose seeds all
    trained within it. Nothing where a seed trained past it (the budget would stop it sooner),
    for a single trial (exported only if it reached, so nothing of it is censored), or for a
    search from before the penalty was recorded."""
    def configuration(*flops: float) -> Candidate:
        seeds = [SeedRun(i, f"s{i}", i == 0, 1e9 if i == 0 else 6e9, f) for i, f in enumerate(flops)]
        return Candidate("r1", "t1", {}, {r.KIND: r.KIND_CONFIGURATION}, seeds)

    within, past = configuration(1e9, 3e9), configuration(1e9, 3e9 + 1)
    assert retrain_budget({"budget.flops": "1e+12", r.PENALTY_PARAM: "2e+12"}, past) == "1e+12"
    assert retrain_budget({"budget.flops": "None", r.PENALTY_PARAM: "6000000000.0"}, within) == "3000000000.0"
    assert retrain_budget({"budget.flops": "None", r.PENALTY_PARAM: "6000000000.0"}, past) is None
    trial = Candidate("r", "t", {}, {})
    assert retrain_budget({"budget.flops": "None", r.PENALTY_PARAM: "6000000000.0"}, trial) is None
    assert retrain_budget({"budget.flops": "None"}, within) is None


@pytest.mark.parametrize("tables", [False, True], ids=["empty-file", "no-tables"])
@pytest.mark.parametrize("command", [["export", "-o", "x.yaml"], ["report", "-o", "rep"], ["reconcile"]])
def test_commands_that_read_a_store_leave_an_empty_file_empty(tmp_path, capsys, monkeypatch, command, tables):
    """An empty file, or a database without tables, is no store: exit 2, and the file stays as it
    was (MLflow would make its tables in it, turning a mistyped path into a store)."""
    import sqlite3
    from contextlib import closing

    from iterhead.search.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.db").touch()
    if tables:
        with closing(sqlite3.connect(tmp_path / "empty.db")) as db:
            db.executescript("CREATE TABLE t(x); DROP TABLE t;")
    before = (tmp_path / "empty.db").read_bytes()
    assert main([*command, "--experiment", "e", "--tracking-uri", "sqlite:///empty.db"]) == 2
    words = "a database without tables" if tables else "an empty file"
    assert f"empty.db is {words}, not a tracking store" in capsys.readouterr().err
    assert (tmp_path / "empty.db").read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["empty.db"]


def listing(folder) -> dict[str, str]:
    """What each entry of `folder` is: a link's target, a file's text, or a folder."""
    return {p.name: f"-> {p.readlink()}" if p.is_symlink() else p.read_text() if p.is_file() else "folder"
            for p in folder.iterdir()}


@pytest.mark.parametrize("name, kind", [("report.html", "file"), ("medians.md", "file"), ("report.html", "folder"),
                                        ("medians.md", "folder"), ("medians.md", "both"), ("report.html", "link")])
def test_report_over_files_it_did_not_write_exits_2_and_writes_nothing(tmp_path, capsys, name, kind):
    """The user's own report.html and medians.md were replaced, exit 0; a folder in their place
    was a traceback, after report.html had been written. All are checked before any is written."""
    from mlflow import MlflowClient

    from iterhead.search.cli import main

    uri = store_with_a_reached_trial(tmp_path)
    rep = tmp_path / "rep"
    rep.mkdir()
    if kind == "both":
        (rep / "report.html").write_text("<p>my page</p>\n")
    if kind == "folder":
        (rep / name).mkdir()
    elif kind == "link":  # a dangling link of the user's: renaming over it would lose it
        (rep / name).symlink_to(tmp_path / "not-yet")
    else:
        (rep / name).write_text("my notes\n")
    before = listing(rep)
    capsys.readouterr()
    assert main(["report", "--experiment", "e", "--tracking-uri", uri, "-o", str(rep)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: -o: {rep}/"), err
    assert ("is not one that iterhead report wrote" if kind in ("file", "both") else "is not a file") in err[0], err
    assert listing(rep) == before
    client = MlflowClient(uri)
    parent = client.search_runs([client.get_experiment_by_name("e").experiment_id], "tags.`iterhead.kind` = 'search'")
    assert client.list_artifacts(parent[0].info.run_id, "report") == []


def test_report_replaces_the_files_an_earlier_report_wrote(tmp_path, capsys):
    """Re-running a report is how it is brought up to date: its own files are replaced, those of a
    report written before files were marked too, and the line that marks them is not part of the
    table the terminal shows."""
    from iterhead.search.cli import main
    from iterhead.search.page import UNMARKED_PAGE

    uri = store_with_a_reached_trial(tmp_path)
    rep = tmp_path / "rep"
    rep.mkdir()
    (rep / "report.html").write_text(UNMARKED_PAGE + "e</title></head><body></body></html>\n")
    (rep / "medians.md").write_text("| trials | reached |\n|---|---|\n")
    for _ in range(2):
        assert main(["report", "--experiment", "e", "--tracking-uri", uri, "-o", str(rep)]) == 0
        for name in ("report.html", "medians.md"):
            assert (rep / name).read_text().startswith("<!-- written by iterhead report ")
        assert capsys.readouterr().out.startswith("| trials | reached |")


def test_a_missing_store_is_named_from_where_its_uri_came(tmp_path, capsys, monkeypatch):
    from iterhead.search.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///missing.db")
    assert main(["export", "--experiment", "e", "-o", "x.yaml"]) == 2
    assert capsys.readouterr().err.startswith("error: MLFLOW_TRACKING_URI: no tracking store at sqlite:///missing.db")
    assert list(tmp_path.iterdir()) == []


def test_report_into_a_store_whose_artifact_folder_is_gone_exits_1_in_one_line(tmp_path, capsys):
    """A store copied without its artifact folder (or one shared read-only) keeps the page, but
    logging its figures on the parent run failed with a PermissionError traceback."""
    import shutil

    from iterhead.search.cli import main

    uri = store_with_a_reached_trial(tmp_path)
    shutil.rmtree(tmp_path / "mlruns")
    (tmp_path / "mlruns").write_text("not the artifact folder\n")  # no folder can be made there, even by root
    capsys.readouterr()
    assert main(["report", "--experiment", "e", "--tracking-uri", uri, "-o", str(tmp_path / "rep")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: wrote {tmp_path / 'rep' / 'report.html'}, but "), err
    assert "parent run" in err[0] and str(tmp_path / "mlruns") in err[0], err
    assert (tmp_path / "rep" / "report.html").read_text().startswith("<!-- written by iterhead report")


@pytest.mark.parametrize("top_k, name", [(1, b"best\xff.yaml"), (2, b"top\xff")])
def test_export_to_a_path_that_is_not_utf8_exits_2_and_makes_nothing(tmp_path, capsys, top_k, name):
    """The header quotes -o in its reproduce line: a byte that is not UTF-8 was a UnicodeEncodeError
    traceback once the store was read, with --top-k 2's folder already made (and left empty)."""
    from iterhead.search.cli import main

    uri = store_with_a_reached_trial(tmp_path)
    out = os.fsdecode(bytes(tmp_path) + b"/" + name)
    capsys.readouterr()
    assert main(["export", "--experiment", "e", "--tracking-uri", uri, "-o", out, "--top-k", str(top_k)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: -o: ") and "0xff" in err[0], err
    assert not os.path.lexists(out)


def test_report_on_a_full_disk_fails_in_one_line_and_keeps_the_earlier_page(tmp_path, monkeypatch, capsys):
    """As export does: exit 1, one line, the earlier report's files as they were (a traceback before)."""
    from iterhead.search.cli import main

    uri = store_with_a_reached_trial(tmp_path)
    rep = tmp_path / "rep"
    assert main(["report", "--experiment", "e", "--tracking-uri", uri, "-o", str(rep)]) == 0
    before = listing(rep)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    capsys.readouterr()
    assert main(["report", "--experiment", "e", "--tracking-uri", uri, "-o", str(rep)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"error: cannot write {rep}: No space left on device", err
    assert listing(rep) == before


def test_export_from_a_store_without_its_artifacts_names_the_folder_it_looked_in(tmp_path, capsys):
    """A store copied without its artifact folder (or moved: it keeps the folder's absolute path)
    said only 'Failed to download artifacts from path curriculum.yaml', blaming --tracking-uri."""
    import shutil

    from iterhead.search.cli import main

    uri = store_with_a_reached_trial(tmp_path)
    shutil.rmtree(tmp_path / "mlruns")
    capsys.readouterr()
    assert main(["export", "--experiment", "e", "--tracking-uri", uri, "-o", str(tmp_path / "best.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trial t1" in err[0] and (tmp_path / "mlruns").as_uri() in err[0], err
    assert not (tmp_path / "best.yaml").exists()


def test_an_error_reading_what_a_report_needs_is_not_said_as_writing_its_folder(tmp_path):
    """report and export said every OSError as `cannot write OUT`, an artifact they could not read too."""
    from iterhead.search.folder import not_written

    out = str(tmp_path / "rep")
    assert not_written(out, OSError(errno.ENOSPC, "No space left on device")) == \
        f"error: cannot write {out}: No space left on device"
    assert not_written(out, OSError(errno.EACCES, "Permission denied", f"{out}/.report.html.tmp")) == \
        f"error: cannot write {out}: Permission denied"
    assert not_written(out, OSError(errno.EACCES, "Permission denied", "/store/artifacts/a.png")) == \
        "error: cannot use /store/artifacts/a.png: Permission denied"
    best = str(tmp_path / "best.yaml")  # export's -o is a file: its temporary sits beside it
    assert not_written(best, OSError(errno.EACCES, "Permission denied", str(tmp_path / ".best.yaml.x1.tmp"))) == \
        f"error: cannot write {best}: Permission denied"


def test_a_sigterm_mid_report_exits_143_and_leaves_no_temporary_folder(tmp_path):
    """SIGTERM killed report by default: its figures' temporary folder stayed behind in TMPDIR."""
    import signal
    import subprocess
    import sys
    import time

    uri = store_with_a_reached_trial(tmp_path)
    temp = tmp_path / "temp"
    temp.mkdir()
    report = subprocess.Popen([sys.executable, "-m", "iterhead.search.cli", "report", "--experiment", "e",
                               "--tracking-uri", uri, "-o", str(tmp_path / "rep")], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "TMPDIR": str(temp)})
    try:
        deadline = time.monotonic() + 120  # the import of MLflow and matplotlib alone take seconds
        while not list(temp.glob("iterhead-report-*")) and report.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert list(temp.glob("iterhead-report-*")), "the report never made its folder"
        report.send_signal(signal.SIGTERM)
        out, err = report.communicate(timeout=120)
    finally:
        if report.poll() is None:
            report.kill()
            report.wait()
    assert report.returncode == 128 + signal.SIGTERM and err.splitlines()[-1] == "terminated", err
    assert list(temp.glob("iterhead-report-*")) == []
