"""A PBT search end to end: a real local Ray, a real sqlite MLflow store in a temp folder.

Four members of a tiny curriculum (2 epochs of polynomial warm-up, which the first
generation shares as a prefix, then parity) are compared every 2 epochs of the parity stage
on parity accuracy; the worst copies the best and perturbs the polynomial share of its mix
and its lr. The target
(80% parity) lies well past the first comparison, so members copy each other before one
reaches it. CPU training at a fixed thread count is deterministic, so a lineage re-trained
from scratch must give exactly the numbers and weights the search's member ended with
(== is the right comparison), and a search resumed after its driver is SIGKILLed must end
exactly as the uninterrupted one did.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from iterhead.curricula.io import load_curriculum, parse_curriculum
from iterhead.search.cli import main
from iterhead.search.run import SearchOptions, run_search
from iterhead.search.spec import load_search
from iterhead.trainable import results as r
from iterhead.trainable.checkpoint import FILENAME
from iterhead.trainable.loop import Trainer

from support import ROOT, CtrlCAt, tiny

pytestmark = pytest.mark.integration

BASE = tiny(model={"d_model": 32, "n_layers": 2, "n_heads": 1, "dropout": 0.0},
            data={"min_len": 1, "max_len": 4, "train_per_len": 128, "test_per_len": 64, "cot": True},
            stages=[{"name": "warm", "mix": {"polynomial": 1.0}, "epochs": 2},
                    {"name": "train", "mix": {"parity": 1.0}, "epochs": 24}],
            target={"task": "parity", "accuracy": 0.8}).model_dump(mode="json")
SPEC = {"name": "pbt", "base": "base.yaml",
        "search": {"scheduler": "pbt", "num_samples": 4, "max_concurrent": 2, "seed": 0},
        "pbt": {"interval_epochs": 2, "quantile": 0.25,
                "mutate": {"mix.polynomial": {"uniform": [0.0, 0.5]}, "lr": {"loguniform": [3.0e-4, 3.0e-3]}}},
        "budget": {"flops": 1.0e11}, "resources": {"cpu": 1}}
MEMBERS = 4


def write(folder: Path) -> Path:
    (folder / "base.yaml").write_text(yaml.safe_dump(BASE))
    (folder / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    return folder / "spec.yaml"


@pytest.fixture(scope="module")
def search(ray_local, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pbt")
    uri = f"sqlite:///{folder}/mlflow.db"
    out = io.StringIO()
    rows = run_search(load_search(write(folder)), SearchOptions(uri=uri, storage_path=str(folder / "ray")), out=out)
    return rows, MlflowClient(uri), out.getvalue(), folder


def members(client: MlflowClient) -> dict[int, object]:
    exp = client.get_experiment_by_name("pbt").experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`{r.KIND}` = '{r.KIND_MEMBER}'")
    return {int(run.data.tags[r.MEMBER_TAG]): run for run in runs}


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def artifact(client: MlflowClient, run_id: str, name: str, folder: Path) -> Path:
    return Path(client.download_artifacts(run_id, name, str(folder)))


def last_checkpoint(folder: Path, member: int) -> dict:
    """The state the member's last trial (its last generation) ended with."""
    trials = []
    for params in (folder / "ray").glob("pbt-*/*/params.json"):
        config = json.loads(params.read_text())["pbt"]
        if config["member"] == member:
            trials.append((config["generation"], params.parent))
    _, trial = max(trials)
    last = max(trial.glob("checkpoint_*"), key=lambda p: p.name)
    return torch.load(last / FILENAME, weights_only=True)


def test_one_run_per_member_and_members_copy_each_other(search, tmp_path):
    rows, client, out, _ = search
    exp = client.get_experiment_by_name("pbt").experiment_id
    runs = client.search_runs([exp])
    (parent,) = [x for x in runs if x.data.tags.get(r.KIND) == r.KIND_SEARCH]
    by_member = members(client)
    assert sorted(by_member) == list(range(MEMBERS)) and len(runs) == 1 + MEMBERS
    assert all(x.info.status == "FINISHED" for x in runs)
    assert all(x.data.tags[r.PARENT_RUN] == parent.info.run_id for x in by_member.values())
    assert len(rows) == MEMBERS and parent.data.metrics[r.TRIALS] == MEMBERS
    assert all(row["status"] == "TERMINATED" for row in rows)  # the population ended: no member unfinished
    lineages = {m: yaml.safe_load(artifact(client, x.info.run_id, "lineage.yaml", tmp_path / str(m)).read_text())
                for m, x in by_member.items()}
    copied = [m for m, lineage in lineages.items() if len(lineage["segments"]) > 1]
    assert copied, lineages  # exploits happened, and are on the runs
    assert "copies member" in out and sum(row["switches"] for row in rows) >= len(copied)
    # one line per generation, naming the member ranked first: with 4 members and quantile 0.25
    # the one every copy of the next generation starts from
    best = {int(g): m for g, m in re.findall(r"^generation (\d+) trained: best target accuracy [\d.]+% "
                                             r"\(member (\d+)\)$", out, re.M)}
    assert sorted(best) == list(range(max(row["generations"] for row in rows))), out
    copies = re.findall(r"^member \d+ copies member (\d+) at epoch \d+ of stage \w+ \(generation (\d+)\)", out, re.M)
    assert copies and all(donor == best[int(g) - 1] for donor, g in copies), out
    for m in copied:
        segments = lineages[m]["segments"]
        assert segments[-1]["stage"] == f"train-m{m}-e{segments[-1]['from_epoch']}"
        assert [s["from_epoch"] for s in segments] == sorted(s["from_epoch"] for s in segments)
    for m, run in by_member.items():
        steps = sorted(h.step for h in client.get_metric_history(run.info.run_id, r.FLOPS))
        assert steps == list(range(len(steps))) and steps  # every evaluation of the member once
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"curriculum.yaml", "lineage.yaml"} <= names
        if run.data.metrics[r.REACHED] == 1.0:  # its training ended there: the figures are drawn
            assert {"schedule.png", "compute_to_accuracy.png", "attention.png"} <= names
    assert any(row[r.REACHED] == 1.0 for row in rows)


def test_every_lineage_retrains_to_its_members_numbers_and_weights(search, tmp_path):
    """Each member's lineage (its curriculum.yaml), trained from scratch by a plain `Trainer`, ends
    with the member's final weights, and its evaluations since the member's last switch are the
    ones the member's run logged (before that, the run holds the member's own earlier lineage)."""
    _, client, _, folder = search
    for m, run in members(client).items():
        cur = load_curriculum(artifact(client, run.info.run_id, "curriculum.yaml", tmp_path / str(m)))
        state = last_checkpoint(folder, m)
        trainer = Trainer(cur)
        evaluations = []
        for ev in trainer.run():
            evaluations.append(ev)
            if trainer.compute.flops >= state["compute"]["flops"]:
                break
        assert trainer.compute.flops == state["compute"]["flops"]
        for name, weight in state["model"].items():
            assert torch.equal(trainer.model.state_dict()[name], weight), (m, name)
        lineage = yaml.safe_load(artifact(client, run.info.run_id, "lineage.yaml", tmp_path / f"l{m}").read_text())
        since = lineage["segments"][-1]["stage"]  # the segment since its last switch
        assert since == cur.stages[-1].name
        for key in (r.acc("parity"), r.LOSS, r.FLOPS):
            logged = history(client, run.info.run_id, key)
            mine = {ev.step: ev.metrics[key] for ev in evaluations if ev.stage == since}
            assert mine and all(logged[step] == value for step, value in mine.items()), (m, key)
        if len(lineage["segments"]) == 1:  # never copied: its whole run is its lineage's, warm-up included
            assert {ev.step: ev.metrics[r.FLOPS] for ev in evaluations} == history(client, run.info.run_id, r.FLOPS)


def test_the_best_lineage_exports_and_retrains_to_the_same_compute_to_target(search, tmp_path):
    rows, client, _, _ = search
    best = min((row for row in rows if row[r.REACHED] == 1.0),
               key=lambda row: (row[r.COMPUTE_TO_TARGET], -row[r.TARGET_ACC], row["trial_id"]))
    out = tmp_path / "best.yaml"
    assert main(["export", "--experiment", "pbt", "--tracking-uri", client.tracking_uri, "-o", str(out)]) == 0
    header = [line for line in out.read_text().splitlines() if line.startswith("# reproduce")]
    assert best["trial_id"] in out.read_text() and "PBT member" in out.read_text()
    command = header[0].split(": ", 1)[1].split()
    assert command[:3] == ["iterhead", "train", str(out)] and "--budget" in command  # OUT as given
    assert main(["validate", str(out)]) == 0
    assert main(["train", str(out), *command[3:], "--tracking-uri", f"sqlite:///{tmp_path}/retrain.db",
                 "--experiment", "retrain"]) == 0
    retrain = MlflowClient(f"sqlite:///{tmp_path}/retrain.db")
    (run,) = retrain.search_runs([retrain.get_experiment_by_name("retrain").experiment_id])
    assert run.data.metrics[r.REACHED] == 1.0
    assert run.data.metrics[r.COMPUTE_TO_TARGET] == best[r.COMPUTE_TO_TARGET]  # exactly, on CPU


def test_the_search_accounts_for_every_generation_and_the_shared_warm_up_once(search):
    """Every member trains every epoch it stands at, but the warm-up once for all: the first
    generation shares it as a prefix (`trainable.prefix_store`), so the others fork it."""
    from iterhead.trainable.summary import planned_flops

    rows, client, _, _ = search
    exp = client.get_experiment_by_name("pbt").experiment_id
    (parent,) = client.search_runs([exp], filter_string=f"tags.`{r.KIND}` = '{r.KIND_SEARCH}'")
    epoch = planned_flops(parse_curriculum(BASE, file="base")) / 26  # an epoch of any mix costs the same
    lineages = sum(row[r.FLOPS] for row in rows)
    assert parent.data.metrics[r.FLOPS_CURRICULA] == pytest.approx(lineages, rel=1e-12)
    assert parent.data.metrics[r.FLOPS_TRAINED] == pytest.approx(lineages - (MEMBERS - 1) * 2 * epoch, rel=1e-12)


def test_the_parent_run_records_how_the_population_searched(search):
    """The parent's params hold the PBT settings as the search ran them, and none of the
    searcher and ASHA settings that a PBT search does not read."""
    _, client, _, _ = search
    exp = client.get_experiment_by_name("pbt").experiment_id
    parent, = client.search_runs([exp], filter_string=f"tags.`{r.KIND}` = '{r.KIND_SEARCH}'")
    params = parent.data.params
    assert (params["pbt.interval_epochs"], params["pbt.quantile"], params["pbt.stage"]) == ("2", "0.25", "train")
    assert params["pbt.mutate.lr"] == "loguniform (0.0003, 0.003)" and "pbt.mutate.mix.polynomial" in params
    assert params["search.scheduler"] == "pbt" and params["search.num_samples"] == str(MEMBERS)
    assert not {"search.algorithm", "search.grace_fraction", "search.reduction_factor"} & set(params)


def test_report_shows_the_members_and_the_best_lineage(search, tmp_path):
    rows, client, _, _ = search
    assert main(["report", "--experiment", "pbt", "--tracking-uri", client.tracking_uri,
                 "-o", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "report.html").read_text()
    assert all(row["trial_id"] in page for row in rows)
    assert "Population" in page and 'alt="schedule"' in page
    assert 'alt="compute_to_accuracy"' in page  # the lineage's own curves, not the run's spliced history
    assert 'alt="best_accuracy_by_length"' not in page


@pytest.mark.parametrize("sig, at", [(signal.SIGKILL, "copies member"), (signal.SIGTERM, " finished:")],
                         ids=["sigkill-mid-population", "sigterm-at-its-end"])
def test_a_stopped_pbt_search_resumes_to_the_same_population(search, tmp_path, sig, at):
    """SIGKILL (driver and Ray at once) once a generation is decided and the next trains, or
    SIGTERM (a graceful stop) once a member reached the target, when the members that already
    trained their last generation get no trial after the resume; then `--resume`. Before the
    SIGTERM, Tune is made to save its state at every step (``TUNE_GLOBAL_CHECKPOINT_S=0``), so a
    state saved after a trial's last report and before Tune marked it done is certain: the
    resume must still see that trial as ended. Not before the SIGKILL, which would then often
    land while Tune writes its state and cut it short (`folder.check_tune_state` refuses that)."""
    rows, client0, _, _ = search
    write(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    iterhead = str(Path(sys.executable).parent / "iterhead")
    args = [iterhead, "search", "spec.yaml", "--storage-path", "runs", "--tracking-uri", uri, "--num-cpus", "2"]
    env = {**os.environ, **({"TUNE_GLOBAL_CHECKPOINT_S": "0"} if sig == signal.SIGTERM else {})}
    driver = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True, env=env)
    seen = []
    for line in driver.stdout:
        seen.append(line)
        if at in line:
            if sig == signal.SIGKILL:
                os.killpg(driver.pid, signal.SIGKILL)
            else:
                driver.send_signal(sig)
            break
    seen += driver.stdout.readlines()
    driver.wait(timeout=120)
    assert driver.returncode == (-sig if sig == signal.SIGKILL else 128 + sig), "".join(seen)
    resumed = subprocess.run(args + ["--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("pbt").experiment_id])
    by_member = members(client)
    assert len(runs) == 1 + MEMBERS and sorted(by_member) == list(range(MEMBERS))  # no duplicate runs
    # every member FINISHED, also one whose last generation ended before the stop
    assert all(x.info.status == "FINISHED" for x in runs), [(x.info.run_name, x.info.status) for x in runs]
    expected = {int(row["trial_id"].split("-")[1]): (row[r.REACHED], row[r.COMPUTE_TO_TARGET], row[r.FLOPS])
                for row in rows}
    for m, run in by_member.items():
        steps = [h.step for h in client.get_metric_history(run.info.run_id, r.FLOPS)]
        assert sorted(steps) == list(range(len(steps))), (m, sorted(steps))  # each step once
        got = (run.data.metrics[r.REACHED], run.data.metrics[r.COMPUTE_TO_TARGET], run.data.metrics[r.FLOPS])
        assert got == expected[m], m  # the population went on exactly as without the kill
    parent, parent0 = (next(x for x in c.search_runs([c.get_experiment_by_name("pbt").experiment_id])
                            if x.data.tags.get(r.KIND) == r.KIND_SEARCH) for c in (client, client0))
    # what the search trained, and its lineages' worth, as without the stop (a trial re-run from the
    # prefix it stored itself before the stop trained that prefix: `tune.fork_record`)
    for key in (r.FLOPS_TRAINED, r.FLOPS_CURRICULA):
        assert parent.data.metrics[key] == parent0.data.metrics[key], key


def test_a_pbt_search_stopped_between_comparisons_ends_with_every_member_unfinished(ray_local, tmp_path):
    """Ctrl-C as generation 0's last trial ends, before Tune starts generation 1 (no member has
    reached the target there, or no generation would follow): every trial Tune holds has ended,
    and the members' runs were ended FINISHED. Every member has more to train, so the summary
    says unfinished for each, not the censoring penalty of a member that ended, and the search
    is not summarised on its parent run nor marked finished; the members' runs say KILLED alike."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = CtrlCAt("generation 0 trained")
    with pytest.raises(KeyboardInterrupt):
        run_search(load_search(write(tmp_path)), SearchOptions(uri=uri, storage_path=str(tmp_path / "ray")), out=out)
    text = out.getvalue()
    assert out.pressed and "search interrupted" in text, text
    summary = [line for line in text.splitlines() if line.startswith("  member-")]
    assert len(summary) == MEMBERS and all(line.endswith(" | no | unfinished") for line in summary), text
    client = MlflowClient(uri)
    assert {run.info.status for run in members(client).values()} == {"KILLED"}
    (parent,) = client.search_runs([client.get_experiment_by_name("pbt").experiment_id],
                                   filter_string=f"tags.`{r.KIND}` = '{r.KIND_SEARCH}'")
    assert parent.info.status == "KILLED" and r.TRIALS not in parent.data.metrics
    (state,) = (tmp_path / "ray").glob("pbt-*/iterhead-search.json")
    assert json.loads(state.read_text())["state"] != "finished"


SHIPPED = sorted((ROOT / "examples").rglob("*pbt*.yaml"))


@pytest.mark.parametrize("spec", SHIPPED, ids=lambda p: p.stem)
def test_shipped_pbt_searches_run_at_smoke_size_with_exploits(spec, ray_local, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    loaded = load_search(spec)
    out = io.StringIO()
    rows = run_search(loaded, SearchOptions(uri=uri, storage_path=str(tmp_path / "ray"), smoke=True), out=out)
    assert len(rows) == 4 and all(row["status"] == "TERMINATED" for row in rows)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(loaded.spec.name).experiment_id])
    assert [x.data.tags.get(r.KIND) for x in runs].count(r.KIND_MEMBER) == 4
    assert all(x.info.status == "FINISHED" for x in runs)
    assert sum(row["switches"] for row in rows) >= 1 and "copies member" in out.getvalue()
