"""The median table of `iterhead report`: one rule, `trainable.results.over_seeds`, for both kinds of search."""

from __future__ import annotations

import warnings

import pytest

from iterhead.search.report import median_band, medians_text, plot_against_params, plot_medians, seed_medians
from iterhead.trainable import results as r

PENALTY = 1.0e12
KEYS = ["optim.lr", "seed"]


def trial(lr: float, seed: int, compute: float | None) -> dict:
    """A trial row of a search without ``seeds:``; None = censored at the penalty."""
    return {"optim.lr": lr, "seed": seed, r.REACHED: float(compute is not None),
            r.COMPUTE_TO_TARGET: PENALTY if compute is None else compute, r.TARGET_ACC: 0.5}


def test_an_even_number_of_seeds_takes_the_lower_median_and_half_reached_counts():
    """Two of four seeds reached: the median is the larger reached value (not the mean of it and
    the penalty), and it is not censored; one of two is the reached one; none of two is censored."""
    rows = [trial(1e-3, 0, 1e9), trial(1e-3, 1, None), trial(1e-3, 2, 3e9), trial(1e-3, 3, None),
            trial(3e-3, 0, None), trial(3e-3, 1, 5e8),
            trial(1e-2, 0, None), trial(1e-2, 1, None)]
    groups = seed_medians(rows, KEYS)
    assert [(g["optim.lr"], g["count"], g["reached"], g["median"], g["censored"]) for g in groups] == [
        (3e-3, 2, 1, 5e8, False), (1e-3, 4, 2, 3e9, False), (1e-2, 2, 0, PENALTY, True)]
    assert (groups[1]["min"], groups[1]["max"]) == (1e9, PENALTY)
    assert medians_text(groups, KEYS).splitlines() == [
        "| optim.lr | trials | reached | median compute_to_target | min | max |",
        "|---|---|---|---|---|---|",
        "| 0.003 | 2 | 1 | 5e+08 | 5e+08 | 1e+12 |",
        "| 0.001 | 4 | 2 | 3e+09 | 1e+09 | 1e+12 |",
        "| 0.01 | 2 | 0 | 1e+12 (censored) | 1e+12 | 1e+12 |"]


def test_the_plot_draws_the_tables_median():
    """The median line of `plot_medians` is the table's lower median: with one seed reached and
    one censored it is the reached compute, not halfway to the penalty (np.median's 5e11)."""
    rows = [trial(1e-3, 0, 1e9), trial(1e-3, 1, None)]
    (group,) = seed_medians(rows, KEYS)
    assert median_band([1e9, PENALTY]) == (group["median"], group["min"], group["max"]) == (1e9, 1e9, PENALTY)


def test_a_replicate_search_reads_each_configurations_own_score():
    """With ``seeds:``, a row is a configuration run: its median as logged, the range over its seeds."""
    rows = [{"optim.lr": 1e-3, "kind": r.KIND_CONFIGURATION, r.REACHED: 1.0, r.SEEDS_REACHED: 2.0,
             r.COMPUTE_TO_TARGET: 3e9, "seed_outcomes": [(True, 1e9), (True, 3e9), (False, PENALTY)]},
            {"optim.lr": 3e-3, "kind": r.KIND_CONFIGURATION, r.REACHED: 0.0, r.SEEDS_REACHED: 1.0,
             r.COMPUTE_TO_TARGET: PENALTY, "seed_outcomes": [(True, 2e9), (False, PENALTY), (False, PENALTY)]}]
    text = medians_text(seed_medians(rows, ["optim.lr"]), ["optim.lr"], replicates=True).splitlines()
    assert text == ["| optim.lr | seeds | seeds reached | median compute_to_target | min | max |",
                    "|---|---|---|---|---|---|",
                    "| 0.001 | 3 | 2 | 3e+09 | 1e+09 | 1e+12 |",
                    "| 0.003 | 3 | 1 | 1e+12 (censored) | 2e+09 | 1e+12 |"]


def test_a_search_without_reports_plots_without_a_warning(tmp_path):
    """No trial has reported: the figure is drawn empty, with no legend and no warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns about a legend with nothing in it
        path = plot_against_params(tmp_path / "empty.png", [], ["optim.lr"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def store_with(tmp_path, search: bool) -> str:
    """A real sqlite store with one experiment ``e``: a search parent run and one trial run
    under it, or (not `search`) one run as `iterhead train` logs it, with no search."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "mlruns").as_uri())
    if not search:
        client.create_run(exp, run_name="train")
        return uri
    parent = client.create_run(exp, run_name="search:e", tags={r.KIND: r.KIND_SEARCH}).info.run_id
    trial_run = client.create_run(exp, tags={r.PARENT_RUN: parent, r.KIND: r.KIND_TRIAL}).info.run_id
    client.log_metric(trial_run, r.COMPUTE_TO_TARGET, 1e9)
    return uri


@pytest.mark.parametrize("command, out", [("report", "out"), ("export", "best.yaml")])
def test_report_or_export_of_an_experiment_without_a_search_exits_2_naming_run(tmp_path, capsys, command, out):
    """Runs of `iterhead train` alone: one line saying to give --run (bad input, exit 2), not
    a TypeError traceback or exit 1."""
    from iterhead.search.cli import main

    uri = store_with(tmp_path, search=False)
    capsys.readouterr()  # MLflow's notes on making the store above
    assert main([command, "--experiment", "e", "--tracking-uri", uri, "-o", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no search" in err[0] and "--run" in err[0], err
    assert not (tmp_path / out).exists()


@pytest.mark.parametrize("command, out", [("report", "out"), ("export", "best.yaml")])
@pytest.mark.parametrize("case", ["deleted-experiment", "latest-search-without-trials"])
def test_report_or_export_names_what_to_change_where_nothing_can_be_read(tmp_path, capsys, command, out, case):
    """A deleted experiment read as "holds no search, give --run"; the latest search without
    trials yet blamed a --run that was never given."""
    from mlflow import MlflowClient

    from iterhead.search.cli import main

    uri = store_with(tmp_path, search=True)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("e").experiment_id
    if case == "deleted-experiment":
        client.delete_experiment(exp)
        says = f"'e' is deleted; restore it (mlflow experiments restore --experiment-id {exp})"
    else:
        client.create_run(exp, run_name="search:e", tags={r.KIND: r.KIND_SEARCH})  # a newer search, no trial yet
        says = "--experiment: the latest search of 'e' (parent run "
    capsys.readouterr()
    assert main([command, "--experiment", "e", "--tracking-uri", uri, "-o", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not (tmp_path / out).exists()


def test_report_into_a_file_exits_2_and_leaves_it(tmp_path, capsys):
    """-o naming a file: one line naming -o, the file as it was, nothing logged on the search."""
    from mlflow import MlflowClient

    from iterhead.search.cli import main

    uri = store_with(tmp_path, search=True)
    (tmp_path / "afile").write_text("mine\n")
    capsys.readouterr()  # MLflow's notes on making the store above
    assert main(["report", "--experiment", "e", "--tracking-uri", uri, "-o", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: -o:") and "afile is not a folder" in err[0], err
    assert (tmp_path / "afile").read_text() == "mine\n"
    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name("e").experiment_id],
                                   filter_string=f"tags.`{r.KIND}` = '{r.KIND_SEARCH}'")
    assert client.list_artifacts(parent.info.run_id) == []


def page_row(trial: str, status: str, reached: float, c2t: float, min_len: object) -> dict:
    return {"trial_id": trial, "run_id": trial, "kind": r.KIND_TRIAL, "status": status, r.REACHED: reached,
            r.DIVERGED: 0.0, r.COMPUTE_TO_TARGET: c2t, r.TARGET_ACC: 0.5, r.FLOPS: c2t, "forked_from": "",
            "target.min_len": min_len}


def test_only_trials_that_ended_are_scored_and_the_others_are_named(tmp_path):
    """A running, killed or failed trial's last report holds the censoring penalty: the page calls
    them unfinished or failed, not censored, and leaves them out of the medians; the fraction
    reached is over every trial. A key searched over null and numbers plots as categories."""
    from iterhead.search import page
    from iterhead.search.report import plot_fraction_reached

    rows = [page_row("a", "FINISHED", 1.0, 1e9, None), page_row("b", "FINISHED", 0.0, 1e12, 2),
            page_row("c", "RUNNING", 0.0, 1e12, 2), page_row("d", "KILLED", 0.0, 1e12, None),
            page_row("e", "FAILED", 0.0, 1e12, 2)]
    scored = [row for row in rows if page.is_scored(row)]
    assert [row["trial_id"] for row in scored] == ["a", "b"]
    assert [page._outcome(row) for row in rows] == ["yes", "no (censored)", "unfinished", "unfinished", "failed"]
    medians = seed_medians(scored, ["target.min_len"])
    assert {str(g["target.min_len"]): g["count"] for g in medians} == {"2": 1, "None": 1}
    html = page.render("e", "p", ["target.min_len"], rows, [], {}, None, medians)
    assert "5 trials, 1 reached the target, 1\ncensored" in html and ", 1 failed, 2 unfinished." in html
    for rows_drawn in (rows, rows + rows):  # sampled values (a scatter), repeated ones (medians and a band)
        assert plot_medians(tmp_path / "m.png", rows_drawn, "target.min_len").exists()  # TypeError before
    assert plot_against_params(tmp_path / "p.png", rows, ["target.min_len"]).exists()
    plot_fraction_reached(tmp_path / "f.png", scored, len(rows))  # 1 of 5, not 1 of 2
