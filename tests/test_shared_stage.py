"""Shared stages (`StageSpec.seed`): trained once, as the run of their seed, for every seed.

The comparisons are exact (==), the stacked engine's finetuning aside: the lead trains with
the same operations on the same tensors as a plain run of the shared seed, and the other
seeds copy its state bit for bit, so nothing here depends on the CPU's rounding.
"""

from __future__ import annotations

import io

import pytest
import torch
import yaml
from mlflow import MlflowClient

from iterhead.curricula.io import parse_curriculum
from iterhead.curricula.schema import Curriculum
from iterhead.search.run import SearchOptions, run_search
from iterhead.search.spec import load_search
from iterhead.trainable import results as r
from iterhead.trainable.loop import Trainer
from iterhead.trainable.prefix import adopt, points
from iterhead.trainable.schedule import Position
from iterhead.trainable.seeds import Seeds
from iterhead.trainable.summary import planned_flops
from iterhead.trainable.tune import trained_flops

from support import tiny

STAGES = [{"name": "pretrain", "mix": {"polynomial": 1.0}, "epochs": 3},
          {"name": "finetune", "mix": {"parity": 1.0}, "epochs": 2}]


def shared(seed: int) -> Curriculum:
    return tiny(stages=[{**STAGES[0], "seed": seed}, STAGES[1]],
                eval={"every_epochs": 2, "probe_per_len": 4})


def unshared(seed: int) -> Curriculum:
    return tiny(seed=seed, stages=STAGES, eval={"every_epochs": 2, "probe_per_len": 4})


def history(runs) -> dict[int, list[dict[str, float]]]:
    out: dict[int, list[dict[str, float]]] = {}
    for evaluations in runs:
        for seed, ev in evaluations:
            out.setdefault(seed, []).append(ev.metrics)
    return out


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def same(metrics: dict[str, float], shared_too: bool = False) -> dict[str, float]:
    """What two runs of equal numbers share: not wall times, and `compute/flops_shared`
    only where both ran the same stages as shared."""
    return {k: v for k, v in metrics.items()
            if not k.endswith("seconds") and (shared_too or k != "compute/flops_shared")}


def test_the_shared_seed_runs_as_it_would_alone() -> None:
    """Seed 0 of a group sharing seed 0's pretraining is seed 0's plain run, every metric."""
    group = Seeds(shared(0), [0, 1], engine="lockstep")
    got = history(group.run())
    alone = Trainer(unshared(0))
    want = [ev.metrics for ev in alone.run()]
    assert [same(m) for m in got[0]] == [same(m) for m in want]
    assert all(torch.equal(a, b) for a, b in zip(weights(group.trainers[0]).values(), weights(alone).values()))


def test_other_seeds_finetune_from_the_shared_pretraining() -> None:
    """Seed 1 reports the pretraining of seed 0, then finetunes on its own draws."""
    cur = shared(0)
    pretrain_only = Trainer(unshared(0).model_copy(update={"stages": unshared(0).stages[:1]}))
    pre = [ev.metrics for ev in pretrain_only.run()]
    group = Seeds(cur, [1, 2], engine="lockstep")
    got, where = {}, []
    for evaluations in group.run():
        got = {s: got.get(s, []) + [ev.metrics for e, ev in evaluations if e == s] for s in (1, 2)}
        where.append({(t.position.stage, t.position.epoch) for t in group.trainers})
    assert where[:3] == [{(0, 2)}, {(0, 3)}, {(1, 2)}]  # the seeds stand where the lead does, as it reports
    for seed in (1, 2):
        assert [same(m) for m in got[seed][:2]] == [same(m) for m in pre]  # epochs 2 and 3 of pretraining
        assert got[seed][1]["compute/flops_shared"] == pre[-1]["compute/flops"]
    assert got[1][2:] != got[2][2:]  # the finetunings are each seed's own
    separate = Trainer(cur.model_copy(update={"seed": 2}))  # alone, with its own lead
    assert [same(ev.metrics, True) for ev in separate.run()] == [same(m, True) for m in got[2]]


def test_a_resumed_group_continues_exactly() -> None:
    """Stopped after the first evaluation inside the shared stage (the lead is not one of the
    seeds, so it comes back from the copy they hold) and resumed: the same numbers."""
    cur = shared(5)
    whole = history(Seeds(cur, [1, 2], engine="lockstep").run())
    first = Seeds(cur, [1, 2], engine="lockstep")
    runs = first.run()
    before = history([next(runs)])
    state = first.state_dict()
    assert state["seeds"][0]["optimizer"] is not None  # the lead's Adam state travels with the seeds
    after = history(Seeds(cur, [1, 2], engine="lockstep", state=state).run())
    for seed in (1, 2):
        assert [same(m, True) for m in before[seed] + after[seed]] == [same(m, True) for m in whole[seed]]


def test_a_group_forked_where_a_shorter_shared_stage_ends_goes_on_as_if_unforked() -> None:
    """A shared pretraining of 2 epochs ends where a 4-epoch one is halfway: both have the same
    prefix key there, so a search forks the longer from the shorter's state. That state must
    hold the lead's Adam state, though the copies stand at their stage's end (where loading a
    state drops the stage's optimiser); a fresh Adam halfway would train other numbers."""
    def cur(epochs: int) -> Curriculum:
        return tiny(stages=[{**STAGES[0], "epochs": epochs, "seed": 0}, STAGES[1]],
                    eval={"every_epochs": 1, "probe_per_len": 4})

    short, long = cur(2), cur(4)
    assert next(p.key for p in points(short) if (p.stage, p.epoch) == (0, 2)) == \
        next(p.key for p in points(long) if (p.stage, p.epoch) == (0, 2))
    whole = history(Seeds(long, [1, 2], engine="lockstep").run())
    producer = Seeds(short, [1, 2], engine="lockstep")
    for _ in producer.run():
        if producer.trainers[0].position == Position(0, 2):
            break
    state = adopt(producer.state_dict(), long, [1, 2])
    assert all(s["optimizer"] is not None for s in state["seeds"])
    forked = history(Seeds(long, [1, 2], engine="lockstep", state=state).run())
    for seed in (1, 2):
        assert [same(m, True) for m in forked[seed]] == [same(m, True) for m in whole[seed][2:]]


def test_the_stacked_engine_starts_from_the_same_copy(float64) -> None:
    """On the stacked engine the shared stage is trained once too, and the seeds' finetunings
    agree with the lockstep engine's up to float64 rounding (test_seeds.py says why not bit for bit)."""
    cur = shared(0)
    lock, stack = Seeds(cur, [1, 2], engine="lockstep"), Seeds(cur, [1, 2], engine="stacked")
    a, b = history(lock.run()), history(stack.run())
    for seed in (1, 2):
        assert [m["compute/flops"] for m in a[seed]] == [m["compute/flops"] for m in b[seed]]
        # the shared stage: one run, copied, on either engine
        assert [same(m, True) for m in a[seed][:2]] == [same(m, True) for m in b[seed][:2]]
        for x, y in zip(a[seed][2:], b[seed][2:]):
            assert abs(x["loss/train"] - y["loss/train"]) < 1e-8  # test_seeds.py's TOL, derived there


def test_a_frozen_shared_stage_hands_over_to_the_stacked_engine(float64) -> None:
    """The shared seed is one of the group and its shared stage freezes all but one module: that
    seed's model comes out of it with parameters that do not require grad while the others'
    do, and the stacked engine still stacks them for the next stage (as on CUDA, where it is
    the default), agreeing with the lockstep engine as above."""
    cur = tiny(stages=[{**STAGES[0], "seed": 0, "train_modules": ["blocks.1.mlp"]}, STAGES[1]],
               eval={"every_epochs": 2, "probe_per_len": 4})
    a = history(Seeds(cur, [0, 1], engine="lockstep").run())
    b = history(Seeds(cur, [0, 1], engine="stacked").run())
    for seed in (0, 1):
        assert [m["compute/flops"] for m in a[seed]] == [m["compute/flops"] for m in b[seed]]
        assert len(a[seed]) == 3  # the pretraining evaluates at epochs 2 and 3, the finetuning at 2
        for x, y in zip(a[seed][2:], b[seed][2:]):
            assert abs(x["loss/train"] - y["loss/train"]) < 1e-8  # test_seeds.py's TOL, derived there


def test_the_shared_stage_counts_once_in_the_flops_trained() -> None:
    group = Seeds(shared(0), [0, 1, 2], engine="lockstep")
    for _ in group.run():
        pass
    one = group.trainers[0].compute
    assert one.flops_shared > 0
    assert trained_flops(group.trainers) == sum(t.compute.flops for t in group.trainers) - 2 * one.flops_shared


def test_prefix_keys_tell_shared_stages_apart() -> None:
    """The seed of a shared stage is part of a prefix's key; an unshared curriculum keeps its keys."""
    keys = {seed: [p.key for p in points(shared(seed))] for seed in (0, 1)}
    plain = [p.key for p in points(unshared(0))]
    assert keys[0] != keys[1] and keys[0] != plain
    assert plain == [p.key for p in points(unshared(3))]  # the curriculum's seed is the environment's


@pytest.mark.integration
def test_a_search_trains_the_shared_stage_once(ray_local, tmp_path) -> None:
    """Two finetuning settings, seeds 1 and 2, sharing seed 0's pretraining (a real local Ray
    and sqlite MLflow): the pretraining is trained once in the whole search (by a lead that is
    neither seed, then forked by the second trial), and every seed run reports it as its own."""
    pretrain, finetune = 2, 2
    base = shared(0).model_copy(update={"stages": [
        shared(0).stages[0].model_copy(update={"epochs": pretrain}),
        shared(0).stages[1].model_copy(update={"epochs": finetune})]}).model_dump(mode="json")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "name": "shared-stage", "base": "base.yaml", "seeds": [1, 2],
        "space": {"stages.finetune.lr": {"grid": [1.0e-3, 3.0e-3]}},
        "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent": 2, "scheduler": "none"}}))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_search(load_search(tmp_path / "spec.yaml"), SearchOptions(uri=uri, storage_path=str(tmp_path / "ray")),
               out=io.StringIO())
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("shared-stage").experiment_id
    per_epoch = planned_flops(parse_curriculum(base, file="base")) / (pretrain + finetune)  # every epoch costs the same
    (parent,) = client.search_runs([exp], filter_string=f"tags.`{r.KIND}` = '{r.KIND_SEARCH}'")
    assert parent.data.metrics[r.FLOPS_TRAINED] == pytest.approx(per_epoch * (pretrain + 2 * 2 * finetune), rel=1e-12)
    seed_runs = client.search_runs([exp], filter_string=f"tags.`{r.KIND}` = '{r.KIND_SEED}'")
    assert len(seed_runs) == 4
    pretraining = set()
    for run in seed_runs:
        m = run.data.metrics
        assert m[r.FLOPS] == pytest.approx(per_epoch * (pretrain + finetune), rel=1e-12)
        assert m["compute/flops_shared"] == pytest.approx(per_epoch * pretrain, rel=1e-12)
        flops = {h.step: h.value for h in client.get_metric_history(run.info.run_id, r.FLOPS)}
        history = client.get_metric_history(run.info.run_id, "acc/polynomial")
        pretraining.add(tuple(sorted((h.step, h.value) for h in history
                                     if flops[h.step] <= per_epoch * pretrain * (1 + 1e-12))))
    assert len(pretraining) == 1 and len(next(iter(pretraining))) == 1  # one pretraining (one evaluation),
    # reported by every seed of both configurations
