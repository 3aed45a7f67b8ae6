"""`iterhead search` on a real local Ray with a real sqlite MLflow store in a temp folder."""

from __future__ import annotations

import io

import pytest
import yaml
from mlflow import MlflowClient

from iterhead.search.run import SearchOptions, run_search
from iterhead.search.spec import load_search

pytestmark = pytest.mark.integration

BASE = {
    "name": "tiny-base", "seed": 0,
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 1, "dropout": 0.0},
    "data": {"min_len": 1, "max_len": 3, "train_per_len": 64, "test_per_len": 32, "cot": True},
    "tasks": {"parity": {"kind": "parity"}, "polynomial": {"kind": "polynomial", "modulus": 5}},
    "optim": {"lr": 3.0e-3, "batch_size": 32},
    "stages": [{"name": "pretrain", "mix": {"polynomial": 1.0}, "epochs": 1},
               {"name": "finetune", "mix": {"parity": 1.0}, "epochs": 4}],
    "target": {"task": "parity", "accuracy": 1.0},
    "eval": {"every_epochs": 1, "probe_per_len": 2},
}


@pytest.fixture(scope="module")
def search(ray_local, tmp_path_factory):
    """A 4-trial ASHA search: a grid over the target accuracy makes two trials reach it at their
    first evaluation and two never (censored), two seeds each; two trials run at once."""
    folder = tmp_path_factory.mktemp("search")
    (folder / "base.yaml").write_text(yaml.safe_dump(BASE))
    (folder / "spec.yaml").write_text(yaml.safe_dump({
        "name": "it-search", "base": "base.yaml",
        "space": {"target.accuracy": {"grid": [0.01, 1.0]}, "stages.pretrain.epochs": {"grid": [1]},
                  "seed": {"choice": [0, 1]}},
        "search": {"algorithm": "random", "num_samples": 2, "max_concurrent": 2, "scheduler": "asha", "seed": 0},
        "budget": {"flops": 1.0e12},
        "resources": {"cpu": 1},
    }))
    uri = f"sqlite:///{folder}/mlflow.db"
    out = io.StringIO()
    rows = run_search(load_search(folder / "spec.yaml"),
                      SearchOptions(uri=uri, storage_path=str(folder / "ray")), out=out)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("it-search")
    runs = client.search_runs([exp.experiment_id])
    return rows, runs, client, out.getvalue()


def test_one_parent_and_one_finished_child_per_trial(search):
    rows, runs, _, _ = search
    parents = [r for r in runs if r.data.tags.get("iterhead.kind") == "search"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(rows) == 4 and len(parents) == 1 and len(children) == 4
    assert parents[0].info.status == "FINISHED"
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    assert all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["iterhead.trial_id"] for c in children} == {r["trial_id"] for r in rows}
    assert all(c.data.tags.get("ray.node_id") for c in children)


def test_children_hold_summary_history_and_curriculum(search):
    rows, runs, client, _ = search
    for child in (r for r in runs if r.data.tags.get("mlflow.parentRunId")):
        m = child.data.metrics
        assert {"compute_to_target", "reached", "acc/parity", "acc/parity/len_3", "compute/flops"} <= set(m)
        assert child.data.params["target.accuracy"] in ("0.01", "1.0")
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"curriculum.yaml", "attention.png", "compute_to_accuracy.png"} <= artifacts


def test_censored_trials_are_counted_not_dropped(search, tmp_path):
    rows, runs, client, out = search
    reached = [r for r in rows if r["reached"] == 1.0]
    censored = [r for r in rows if r["reached"] == 0.0]
    assert len(reached) == 2 and len(censored) == 2
    assert all(r["compute_to_target"] == 2.0e12 for r in censored)  # 2 x the budget, finite
    assert all(r["compute_to_target"] < 1.0e12 for r in reached)
    parent = next(r for r in runs if r.data.tags.get("iterhead.kind") == "search")
    assert parent.data.metrics["trials"] == 4 and parent.data.metrics["trials_reached"] == 2
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "compute_to_target.png", "fraction_reached.png"} <= names
    table = open(client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path))).read().splitlines()
    assert len(table) == 5  # header + every trial, censored included
    assert "2 of 4 trials reached the target" in out


def test_concurrent_trials_lose_no_metric_row(search):
    """Two trials ran at once into one store: every report is one row, none lost or doubled."""
    rows, runs, client, _ = search
    by_trial = {r.data.tags["iterhead.trial_id"]: r for r in runs if r.data.tags.get("mlflow.parentRunId")}
    for row in rows:
        run_id = by_trial[row["trial_id"]].info.run_id
        for key in ("acc/parity", "compute/flops", "loss/train"):
            history = client.get_metric_history(run_id, key)
            steps = [h.step for h in history]
            assert len(steps) == row["reports"] == len(set(steps)), (row["trial_id"], key)


def test_export_best_retrains_to_the_same_compute(search, tmp_path, capsys):
    from iterhead.curricula.io import load_curriculum
    from iterhead.search.cli import main

    rows, runs, client, _ = search
    uri = client.tracking_uri
    best = min((r for r in rows if r["reached"] == 1.0),  # ties: higher target accuracy, then trial id
               key=lambda r: (r["compute_to_target"], -r["target_acc"], r["trial_id"]))
    out = tmp_path / "best.yaml"
    assert main(["export", "--experiment", "it-search", "--tracking-uri", uri, "-o", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# exported by iterhead") and best["trial_id"] in text and "--threads 1" in text
    cur = load_curriculum(out)
    prefix = f"# reproduce exactly on CPU: iterhead train {out} "
    (command,) = [line[len(prefix):].split() for line in text.splitlines() if line.startswith(prefix)]
    assert command[-2:] == ["--budget", "1000000000000.0"]  # the search's: past it a trial stops, censored
    assert main(["train", str(out), *command, "--tracking-uri", f"sqlite:///{tmp_path}/retrain.db",
                 "--experiment", "retrain"]) == 0
    retrain = MlflowClient(f"sqlite:///{tmp_path}/retrain.db")
    (run,) = retrain.search_runs([retrain.get_experiment_by_name("retrain").experiment_id])
    assert run.data.metrics["compute_to_target"] == best["compute_to_target"]  # exactly, on CPU
    assert cur.target.accuracy == 0.01


def test_export_top_k_writes_a_folder_that_round_trips(search, tmp_path):
    from iterhead.curricula.io import dump_curriculum, load_curriculum
    from iterhead.search.cli import main

    rows, runs, client, _ = search
    folder = tmp_path / "top"
    assert main(["export", "--experiment", "it-search", "--tracking-uri", client.tracking_uri,
                 "--top-k", "5", "-o", str(folder)]) == 0
    files = sorted(folder.glob("*.yaml"))
    assert len(files) == 2  # only the trials that reached the target
    for f in files:
        cur = load_curriculum(f)
        assert load_curriculum(f) == cur
        assert main(["validate", str(f)]) == 0
        again = tmp_path / f"again-{f.name}"
        again.write_text(dump_curriculum(cur))
        assert load_curriculum(again) == cur
    export = ["export", "--experiment", "it-search", "--tracking-uri", client.tracking_uri, "--top-k", "5",
              "-o", str(folder)]
    assert main(export) == 0 and sorted(folder.glob("*.yaml")) == files  # the same export replaces its own
    (folder / "07-another.yaml").write_text("kept: 1\n")  # a file of another export: two would claim a rank
    assert main(export) == 2 and (folder / "07-another.yaml").read_text() == "kept: 1\n"


def test_export_refuses_bad_targets(search, tmp_path, capsys):
    from iterhead.search.cli import main

    _, _, client, _ = search
    uri = client.tracking_uri
    assert main(["export", "--experiment", "it-search", "--tracking-uri", uri, "-o", str(tmp_path / "x.txt")]) == 2
    assert main(["export", "--experiment", "it-search", "--tracking-uri", uri,
                 "-o", str(tmp_path / "no" / "such" / "x.yaml")]) == 2
    assert main(["export", "--experiment", "nope", "--tracking-uri", uri, "-o", str(tmp_path / "x.yaml")]) == 2
    assert main(["export", "--experiment", "it-search", "--tracking-uri", uri, "--run", "x' or '1'='1",
                 "-o", str(tmp_path / "x.yaml")]) == 2
    (tmp_path / "folder.yaml").mkdir()
    folder = str(tmp_path / "folder.yaml")
    assert main(["export", "--experiment", "it-search", "--tracking-uri", uri, "-o", folder]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("error: ") for line in err)
    assert [p.name for p in tmp_path.iterdir()] == ["folder.yaml"] and not any((tmp_path / "folder.yaml").iterdir())


def test_report_page_lists_every_trial_and_embeds_the_figures(search, tmp_path):
    from iterhead.search.cli import main

    rows, runs, client, _ = search
    assert main(["report", "--experiment", "it-search", "--tracking-uri", client.tracking_uri,
                 "-o", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "report.html").read_text()
    assert all(r["trial_id"] in page for r in rows)  # censored trials included
    assert page.count("no (censored)") == 2 and page.count('src="data:image/png;base64,') >= 4
    assert "iteration-head probes" in page and "probe/parity/iteration/l1h0" in page
    mark, *medians = (tmp_path / "rep" / "medians.md").read_text().splitlines()
    assert mark.startswith("<!-- written by iterhead report ")  # what a later report replaces
    assert medians[0].startswith("| stages.pretrain.epochs | target.accuracy | trials | reached |")
    body = sorted(line.split(" | ")[:4] for line in medians[2:])
    assert body == [["| 1", "0.01", "2", "2"], ["| 1", "1", "2", "0"]]  # two trials per accuracy
    assert "(censored)" in medians[3] and "(censored)" not in medians[2]
    assert "Median over seeds" in page
    parent = next(r for r in runs if r.data.tags.get("iterhead.kind") == "search")
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/fraction_reached.png", "report/best_accuracy_by_length.png",
            "report/attention.png"} <= names
