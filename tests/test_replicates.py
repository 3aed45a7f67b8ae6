"""Seeds as replicates: a search with `seeds:` scores configurations over their seeds.

A real local Ray and a real sqlite MLflow store in a temp folder. Trials train their seeds
in lockstep on the CPU, so each seed's numbers equal a separate single-seed run exactly.
"""

from __future__ import annotations

import io
import signal
import statistics

import pytest
import torch
import yaml
from mlflow import MlflowClient

from iterhead.curricula.io import parse_curriculum
from iterhead.search.run import SearchOptions, run_search
from iterhead.search.spec import load_search
from iterhead.trainable import results as r
from iterhead.trainable.loop import Trainer
from iterhead.trainable.results import over_seeds

from support import PARITY_BASE

pytestmark = pytest.mark.integration

SEEDS = [0, 1, 2]
BASE = {**PARITY_BASE, "stages": [{"name": "train", "mix": {"parity": 1.0}, "epochs": 6}],
        "target": {"task": "parity", "accuracy": 0.6}}


SIGINT_HANDLERS: list = []  # (before, after) the search fixture's run


@pytest.fixture(scope="module")
def search(ray_local, tmp_path_factory):
    """A grid of two configurations, each trained on three seeds; no budget (a censored seed is
    charged the search's penalty: twice its horizon, the base's planned compute)."""
    folder = tmp_path_factory.mktemp("replicates")
    (folder / "base.yaml").write_text(yaml.safe_dump(BASE))
    (folder / "spec.yaml").write_text(yaml.safe_dump({
        "name": "replicates", "base": "base.yaml", "seeds": SEEDS,
        "space": {"optim.lr": {"grid": [1.0e-3, 3.0e-3]}},
        "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent": 2, "scheduler": "none"}}))
    uri = f"sqlite:///{folder}/mlflow.db"
    out = io.StringIO()
    before = signal.getsignal(signal.SIGINT)
    rows = run_search(load_search(folder / "spec.yaml"), SearchOptions(uri=uri, storage_path=str(folder / "ray")),
                      out=out)
    SIGINT_HANDLERS.append((before, signal.getsignal(signal.SIGINT)))
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("replicates").experiment_id])
    return rows, runs, client, out.getvalue()


def test_the_search_gives_back_the_sigint_handler_it_found(search):
    """Tune's fit leaves its own SIGINT handler, which would stop a search that is over (a
    SIGTERM during the summary is passed to it: `signals`)."""
    before, after = SIGINT_HANDLERS[-1]
    assert after is before


def kind(runs, which):
    return [x for x in runs if x.data.tags.get(r.KIND) == which]


def test_one_parent_a_run_per_configuration_and_one_per_seed_under_it(search):
    rows, runs, _, out = search
    (parent,) = kind(runs, r.KIND_SEARCH)
    configurations, seeds = kind(runs, r.KIND_CONFIGURATION), kind(runs, r.KIND_SEED)
    assert len(rows) == 2 and len(configurations) == 2 and len(seeds) == 6 and len(runs) == 9
    assert all(x.info.status == "FINISHED" for x in runs)
    assert all(c.data.tags[r.PARENT_RUN] == parent.info.run_id for c in configurations)
    for c in configurations:
        assert "seed" not in c.data.params and c.data.params["seeds"] == "0,1,2"
        mine = [s for s in seeds if s.data.tags[r.PARENT_RUN] == c.info.run_id]
        assert sorted(int(s.data.tags[r.SEED]) for s in mine) == SEEDS
        assert sorted(s.data.params["seed"] for s in mine) == ["0", "1", "2"]
    assert "of 2 configurations (median over their seeds) reached the target" in out


def test_a_configuration_scores_the_median_of_its_seeds(search):
    """compute_to_target is the median over seeds (censored at the penalty), per the seeds' runs."""
    from iterhead.trainable.summary import planned_flops

    rows, runs, _, _ = search
    seeds = kind(runs, r.KIND_SEED)
    (parent,) = kind(runs, r.KIND_SEARCH)
    penalty = float(parent.data.params[r.PENALTY_PARAM])  # recorded, for export's re-train command
    assert penalty == r.CENSOR_FACTOR * planned_flops(parse_curriculum(BASE))  # the grid's keys plan no more
    for c in kind(runs, r.KIND_CONFIGURATION):
        mine = [s.data.metrics for s in seeds if s.data.tags[r.PARENT_RUN] == c.info.run_id]
        own = [(m[r.REACHED] == 1.0, m[r.COMPUTE_TO_TARGET]) for m in mine]
        expected = statistics.median_low([ctt if ok else penalty for ok, ctt in own])
        assert c.data.metrics[r.COMPUTE_TO_TARGET] == expected
        assert c.data.metrics[r.SEEDS_REACHED] == sum(ok for ok, _ in own)
        assert c.data.metrics[r.REACHED] == float(2 * sum(ok for ok, _ in own) >= len(own))


def test_each_seed_run_is_the_separate_single_seed_run(search):
    """Lockstep on a CPU: every seed's evaluations equal its own Trainer's, bit for bit."""
    _, runs, client, _ = search
    configurations = {c.info.run_id: c for c in kind(runs, r.KIND_CONFIGURATION)}
    torch.set_num_threads(1)  # what each trial used (resources.cpu = 1)
    for s in kind(runs, r.KIND_SEED):
        lr = float(configurations[s.data.tags[r.PARENT_RUN]].data.params["optim.lr"])
        cur = parse_curriculum({**BASE, "seed": int(s.data.tags[r.SEED]), "optim": {**BASE["optim"], "lr": lr}})
        alone = [ev.metrics for ev in Trainer(cur, precision=s.data.tags[r.PRECISION_TAG]).run()]
        for key in ("acc/parity", "loss/train", "compute/flops"):
            history = sorted(client.get_metric_history(s.info.run_id, key), key=lambda h: h.step)
            assert [h.step for h in history] == list(range(len(alone)))
            assert [h.value for h in history] == [m[key] for m in alone], key
        artifacts = {a.path for a in client.list_artifacts(s.info.run_id)}
        assert {"curriculum.yaml", "attention.png", "compute_to_accuracy.png"} <= artifacts


def test_over_seeds_uses_the_lower_median_and_counts_half_as_reached():
    score = over_seeds([(True, 1.0), (False, None), (True, 3.0), (False, None)], [0.5, 0.1, 0.9, 0.2], 10.0)
    assert score.compute_to_target == 3.0 and score.seeds_reached == 2 and score.reached
    score = over_seeds([(True, 1.0), (False, None), (False, None)], [1.0, 0.2, 0.3], 10.0)
    assert score.compute_to_target == 10.0 and not score.reached and score.target_acc == 0.3


def test_a_trial_is_trained_out_when_every_seed_is_not_only_its_first():
    """A restored (or forked) replicate trial decides from its seeds' states whether anything is
    left to train. A seed that reached the target early stands where it reached; the others
    trained on to the end without reaching: nothing is left, whichever seed comes first."""
    from iterhead.trainable.schedule import Position
    from iterhead.trainable.tune import trained_out

    cur = parse_curriculum(BASE, file="test")
    early, late, fresh = (Trainer(cur.model_copy(update={"seed": s})) for s in SEEDS)
    early.outcome.reached, early.position = True, Position(0, 2)
    late.position = Position(1, 0)  # past its only stage
    assert trained_out([early, late]) and trained_out([late, early])
    assert not trained_out([early, late, fresh])


def best_configuration(runs):
    """What export ranks first: the lowest median among reached configurations (ties: higher
    target accuracy, then trial id)."""
    reached = [c for c in kind(runs, r.KIND_CONFIGURATION) if c.data.metrics[r.REACHED] == 1.0]
    assert reached, "no configuration reached the target: nothing to export"
    return min(reached, key=lambda c: (c.data.metrics[r.COMPUTE_TO_TARGET], -c.data.metrics[r.TARGET_ACC],
                                       c.data.tags[r.TRIAL_ID]))


def seeds_of(runs, configuration):
    """Each seed's metrics under one configuration run, by seed."""
    return {int(s.data.tags[r.SEED]): s.data.metrics for s in kind(runs, r.KIND_SEED)
            if s.data.tags[r.PARENT_RUN] == configuration.info.run_id}


def test_export_writes_the_command_that_retrains_every_seed_to_its_result(search, tmp_path):
    """The exported header names `--seeds 0,1,2`; running it gives each seed's search result
    exactly. The search had no budget: the command's is its horizon, where no seed trained
    more, so a censored seed is charged the search's penalty rather than twice its own plan."""
    from iterhead.search.cli import main

    _, runs, client, _ = search
    best = best_configuration(runs)
    mine = seeds_of(runs, best)
    threads = best.data.tags[r.THREADS_TAG]
    out = tmp_path / "best.yaml"
    assert main(["export", "--experiment", "replicates", "--tracking-uri", client.tracking_uri, "-o", str(out)]) == 0
    text = out.read_text()
    assert f"configuration {best.data.tags[r.TRIAL_ID]}, MLflow run {best.info.run_id}" in text
    assert threads == "1"  # resources.cpu = 1
    precision = best.data.tags[r.PRECISION_TAG]  # auto, resolved on this machine: what a re-run here resolves
    prefix = f"# reproduce every seed exactly on CPU: iterhead train {out} "
    (command,) = [line[len(prefix):].split() for line in text.splitlines() if line.startswith(prefix)]
    horizon = float(kind(runs, r.KIND_SEARCH)[0].data.params[r.PENALTY_PARAM]) / r.CENSOR_FACTOR
    assert command == ["--seeds", "0,1,2", "--device", "cpu", "--threads", threads, "--precision", precision,
                       "--budget", repr(horizon)]
    assert not all(m[r.REACHED] == 1.0 for m in mine.values()), "no censored seed: the penalty goes untested"
    by_seed = ", ".join(f"seed {s} " + (f"{m[r.COMPUTE_TO_TARGET]:.6e}" if m[r.REACHED] == 1.0 else "censored")
                        for s, m in sorted(mine.items()))
    assert f"# compute_to_target by seed: {by_seed}\n" in text

    again = f"sqlite:///{tmp_path}/again.db"
    assert main(["train", str(out), *command, "--tracking-uri", again, "--experiment", "again"]) == 0
    store = MlflowClient(again)
    retrained = {int(x.data.params["seed"]): x for x in
                 store.search_runs([store.get_experiment_by_name("again").experiment_id])}
    assert sorted(retrained) == SEEDS
    for seed, m in mine.items():
        assert retrained[seed].info.run_name == f"{BASE['name']}-seed{seed}"
        assert retrained[seed].data.metrics[r.REACHED] == m[r.REACHED], seed
        assert retrained[seed].data.metrics[r.COMPUTE_TO_TARGET] == m[r.COMPUTE_TO_TARGET], seed  # censored too


def test_a_configuration_run_is_no_search_to_export_or_report(search, tmp_path, capsys):
    """--run takes a search's parent run: a configuration run's children are its seeds, which
    export and report would read as trials (and report would log its page into that run)."""
    from iterhead.search.cli import main

    _, runs, client, _ = search
    config = best_configuration(runs)
    common = ["--experiment", "replicates", "--tracking-uri", client.tracking_uri, "--run", config.info.run_id]
    assert main(["export", *common, "-o", str(tmp_path / "x.yaml")]) == 2
    assert main(["report", *common, "-o", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("configuration run, not a search's parent run" in line for line in err), err
    assert list(tmp_path.iterdir()) == [] and not client.list_artifacts(config.info.run_id, "report")


def test_report_has_one_median_row_per_configuration(search, tmp_path):
    """Medians come from the configuration runs; the range from their seed runs."""
    from iterhead.search.cli import main

    _, runs, client, _ = search
    assert main(["report", "--experiment", "replicates", "--tracking-uri", client.tracking_uri,
                 "-o", str(tmp_path / "rep")]) == 0
    mark, *medians = (tmp_path / "rep" / "medians.md").read_text().splitlines()
    assert mark.startswith("<!-- written by iterhead report ")  # what a later report replaces
    assert medians[0] == "| optim.lr | seeds | seeds reached | median compute_to_target | min | max |"
    lines = {float(line.split(" | ")[0][2:]): line.strip("| ").split(" | ") for line in medians[2:]}
    configurations = kind(runs, r.KIND_CONFIGURATION)
    assert len(lines) == len(configurations) == 2
    for c in configurations:
        m, values = c.data.metrics, [s[r.COMPUTE_TO_TARGET] for s in seeds_of(runs, c).values()]
        censored = "" if m[r.REACHED] == 1.0 else " (censored)"
        assert lines[float(c.data.params["optim.lr"])][1:] == [
            "3", f"{m[r.SEEDS_REACHED]:.0f}", f"{m[r.COMPUTE_TO_TARGET]:.3g}{censored}",
            f"{min(values):.3g}", f"{max(values):.3g}"]
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "Every configuration" in page and "seeds)" in page
    assert f"{best_configuration(runs).data.tags[r.TRIAL_ID]} seed" in page  # its median seed's curves


def test_asha_stops_whole_configurations_never_one_of_their_seeds(ray_local, tmp_path):
    """Trials run one at a time, so ASHA's rung comparisons are deterministic: the second
    configuration (an lr too small to learn) falls below the first at a rung and is stopped,
    all its seeds with it; each seed's run ends at the configuration's last report."""
    from iterhead.trainable.summary import planned_flops

    base = {**PARITY_BASE, "stages": [{"name": "train", "mix": {"parity": 1.0}, "epochs": 18}]}
    budget = planned_flops(parse_curriculum(base))  # the whole schedule: ASHA's horizon
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "name": "asha-seeds", "base": "base.yaml", "seeds": [0, 1],
        "space": {"optim.lr": {"grid": [3.0e-3, 1.0e-6]}},
        "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent": 1, "scheduler": "asha"},
        "budget": {"flops": budget * 1.01}}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rows = run_search(load_search(tmp_path / "spec.yaml"),
                      SearchOptions(uri=uri, storage_path=str(tmp_path / "ray")), out=io.StringIO())
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("asha-seeds").experiment_id])
    reports = {row["optim.lr"]: row["reports"] for row in rows}
    assert reports[1.0e-6] < reports[3.0e-3], "ASHA should have stopped the configuration that cannot learn"
    for c in kind(runs, r.KIND_CONFIGURATION):
        steps = len(client.get_metric_history(c.info.run_id, r.COMPUTE_TO_TARGET))
        mine = [s for s in kind(runs, r.KIND_SEED) if s.data.tags[r.PARENT_RUN] == c.info.run_id]
        assert len(mine) == 2 and all(s.info.status == "FINISHED" for s in mine)
        if c.data.params["optim.lr"] == "1e-06":
            assert steps == reports[1.0e-6]
            for s in mine:  # stopped with it, at the same report: no seed ran on alone
                assert len(client.get_metric_history(s.info.run_id, r.FLOPS)) == steps
                # stopped seconds in, long before a timed checkpoint: the one saved at the rung gave its figures
                artifacts = {a.path for a in client.list_artifacts(s.info.run_id)}
                assert {"curriculum.yaml", "attention.png", "compute_to_accuracy.png"} <= artifacts, artifacts
