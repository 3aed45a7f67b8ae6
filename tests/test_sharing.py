"""A search with shared prefixes is the same search as with `--no-share`, trained once per prefix.

A real local Ray and real sqlite MLflow stores in a temp folder. One grid, run both ways:
pretraining for 2 or 4 epochs x two finetuning learning rates, two seeds per configuration.
With sharing, the second 2-epoch trial starts from the first's state at the end of its
pretraining (a stage boundary), a 4-epoch trial starts from it 2 epochs into its own
pretraining (inside a stage), and the second 4-epoch trial from the first's end of
pretraining. Every logged metric at every step (wall-clock seconds aside) and every final
weight must equal the unshared run's exactly: CPU training is deterministic at a fixed
thread count, so == is the right comparison.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from iterhead.curricula.io import parse_curriculum
from iterhead.search.run import SearchOptions, run_search
from iterhead.search.spec import load_search
from iterhead.trainable import results as r
from iterhead.trainable.checkpoint import FILENAME
from iterhead.trainable.summary import planned_flops

from support import tiny

pytestmark = pytest.mark.integration

SEEDS = [0, 1]
PRETRAIN, FINETUNE = [2, 4], 3
BASE = tiny(stages=[{"name": "pretrain", "mix": {"polynomial": 1.0}, "epochs": 2},
                    {"name": "finetune", "mix": {"parity": 1.0}, "epochs": FINETUNE}]).model_dump(mode="json")


def run(folder: Path, share: bool):
    (folder / "base.yaml").write_text(yaml.safe_dump(BASE))
    (folder / "spec.yaml").write_text(yaml.safe_dump({
        "name": "sharing", "base": "base.yaml", "seeds": SEEDS,
        "space": {"stages.pretrain.epochs": {"grid": PRETRAIN}, "stages.finetune.lr": {"grid": [1.0e-3, 3.0e-3]}},
        "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent": 2, "scheduler": "none"}}))
    uri = f"sqlite:///{folder}/mlflow.db"
    out = io.StringIO()
    rows = run_search(load_search(folder / "spec.yaml"),
                      SearchOptions(uri=uri, storage_path=str(folder / "ray"), share=share), out=out)
    return rows, MlflowClient(uri), out.getvalue(), folder


@pytest.fixture(scope="module")
def both(ray_local, tmp_path_factory):
    return run(tmp_path_factory.mktemp("shared"), True), run(tmp_path_factory.mktemp("unshared"), False)


def configuration(params: dict[str, str]) -> tuple[str, str]:
    return params["stages.pretrain.epochs"], params["stages.finetune.lr"]


def histories(client: MlflowClient) -> dict[tuple[str, str, str], dict[str, list[tuple[int, float]]]]:
    """Every seed run's metric histories, by (pretraining epochs, finetuning lr, seed)."""
    exp = client.get_experiment_by_name("sharing").experiment_id
    out = {}
    for run in client.search_runs([exp], filter_string=f"tags.`{r.KIND}` = '{r.KIND_SEED}'"):
        keys = [k for k in run.data.metrics if "seconds" not in k]
        out[(*configuration(run.data.params), run.data.tags[r.SEED])] = {
            k: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)) for k in keys}
    return out


def final_weights(folder: Path) -> dict[tuple[str, str], list[dict[str, torch.Tensor]]]:
    """Each trial's last checkpoint: the model weights of every seed, by configuration."""
    out = {}
    for params in (folder / "ray").glob("sharing-*/*/params.json"):
        config = json.loads(params.read_text())
        last = max(params.parent.glob("checkpoint_*"), key=lambda p: p.name)
        state = torch.load(last / FILENAME, weights_only=True)
        out[(str(config["stages.pretrain.epochs"]), str(config["stages.finetune.lr"]))] = [
            s["model"] for s in state["seeds"]]
    return out


def parent_metrics(client: MlflowClient) -> dict[str, float]:
    exp = client.get_experiment_by_name("sharing").experiment_id
    (parent,) = client.search_runs([exp], filter_string=f"tags.`{r.KIND}` = '{r.KIND_SEARCH}'")
    return parent.data.metrics


def test_every_logged_metric_at_every_step_equals_the_unshared_search(both):
    (_, shared, _, _), (_, unshared, _, _) = both
    a, b = histories(shared), histories(unshared)
    assert len(a) == len(PRETRAIN) * 2 * len(SEEDS) and a.keys() == b.keys()
    for key in a:
        assert a[key].keys() == b[key].keys(), key
        for metric in a[key]:
            assert a[key][metric] == b[key][metric], (key, metric)
        assert len(a[key][r.FLOPS]) == int(key[0]) + FINETUNE  # an evaluation every epoch, prefix included


def test_final_weights_equal_the_unshared_search(both):
    (_, _, _, shared), (_, _, _, unshared) = both
    a, b = final_weights(shared), final_weights(unshared)
    assert len(a) == 4 and a.keys() == b.keys()
    for config in a:
        for x, y in zip(a[config], b[config]):
            for name in x:
                assert torch.equal(x[name], y[name]), (config, name)


def test_forks_happen_inside_a_stage_and_at_a_boundary_and_are_tagged(both):
    (rows, client, out, _), (plain_rows, plain, _, _) = both
    exp = client.get_experiment_by_name("sharing").experiment_id
    configs = client.search_runs([exp], filter_string=f"tags.`{r.KIND}` = '{r.KIND_CONFIGURATION}'")
    sources = {configuration(c.data.params): c.data.tags.get(r.PREFIX_TAG, "") for c in configs}
    points = {k: v.rsplit(", ", 1)[-1] for k, v in sources.items() if v}
    assert len(points) == 3, sources  # every configuration but the first started from a prefix
    assert "stage pretrain epoch 2" in points.values()  # a 2-epoch pretraining's end (a boundary), or
    assert points.get(("4", "0.001")) == "stage pretrain epoch 2" or points.get(("4", "0.003")) == \
        "stage pretrain epoch 2"  # 2 epochs into a 4-epoch pretraining (inside the stage)
    assert "stage pretrain epoch 4" in points.values()
    plain_configs = plain.search_runs([plain.get_experiment_by_name("sharing").experiment_id])
    assert not any(c.data.tags.get(r.PREFIX_TAG) for c in plain_configs)
    assert "3 trial(s) starting from a shared prefix" in out
    assert not list((both[0][3] / "ray").glob("sharing-*/prefixes"))  # a finished search deletes its store
    assert list((both[0][3] / "ray").glob("sharing-*/iterhead-search.json"))


def test_the_search_accounts_what_it_trained_against_the_ideal(both):
    (_, shared, _, _), (_, unshared, _, _) = both
    a, b = parent_metrics(shared), parent_metrics(unshared)
    per_epoch = planned_flops(parse_curriculum(BASE, file="base")) / (2 + FINETUNE)  # every epoch costs the same
    curricula = per_epoch * len(SEEDS) * sum(2 * (p + FINETUNE) for p in PRETRAIN)
    ideal = per_epoch * len(SEEDS) * (max(PRETRAIN) + 2 * len(PRETRAIN) * FINETUNE)  # 4 pretraining epochs once
    assert a[r.FLOPS_CURRICULA] == pytest.approx(curricula, rel=1e-12)
    assert b[r.FLOPS_CURRICULA] == pytest.approx(curricula, rel=1e-12)
    assert b[r.FLOPS_TRAINED] == pytest.approx(curricula, rel=1e-12)
    assert a[r.FLOPS_TRAINED] == pytest.approx(ideal, rel=1e-12)


def test_iterhead_report_says_what_sharing_saved(both, tmp_path):
    from iterhead.search import page

    (_, client, _, _), _ = both
    text = page.build(client, "sharing", tmp_path).read_text()
    assert "Shared prefixes: trained" in text and "by 3 trial(s) starting from a shared prefix" in text
