"""Several seeds in one schedule are the same trials as K separate runs.

With the lockstep engine (each seed's own model) the numbers are exactly those of separate
runs, in float32, on any CPU: the same operations on the same tensors. Stacked (batched)
and separate runs sum the same products in another order, so their numbers agree
up to rounding, not bit for bit. The comparisons run in float64 (the `float64` fixture says
why float32 cannot promise a CPU-independent bound after Adam steps): there each Adam step
differs by at most about lr * 1e-16 / eps = 1e-11, so after the tests' few dozen steps
parameters and losses agree far inside `TOL`, on any CPU, while any real difference (a
wrong row, mask or dropout draw) moves them by orders of magnitude more.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from iterhead.curricula.sampler import EpochPlan
from iterhead.trainable.loop import Trainer
from iterhead.trainable.seeds import Seeds, choose_engine, epoch_steps

from support import tiny

# 40 rows a length in batches of 32: batches straddle lengths and sizes differ, so the seeds'
# batches at one step differ in length and size and the padding path is exercised.
DATA = {"min_len": 1, "max_len": 4, "train_per_len": 40, "test_per_len": 32, "cot": True}
TOL = 1e-8  # 1000x the float64 bound above; a wrong row or mask moves losses by > 1e-3


def single_runs(cur, seeds):
    out = {}
    for s in seeds:
        trainer = Trainer(cur.model_copy(update={"seed": s}))
        out[s] = ([ev.metrics for ev in trainer.run()], trainer)
    return out


def batched_runs(batch: Seeds):
    out = {s: [] for s in batch.seeds}
    for evaluations in batch.run():
        for seed, ev in evaluations:
            out[seed].append(ev.metrics)
    return out


def test_batched_seeds_match_separate_runs(float64):
    """Dropout, two stages and a frozen-module stage: same compute, accuracies and losses."""
    cur = tiny(data=DATA, stages=[
        {"name": "pretrain", "mix": {"polynomial": 1.0}, "epochs": 2},
        {"name": "finetune", "mix": {"parity": 0.7, "polynomial": 0.3}, "epochs": 3,
         "train_modules": ["blocks.1.mlp"]}])
    seeds = [0, 1, 2]
    single = single_runs(cur, seeds)
    batch = Seeds(cur, seeds, engine="stacked")
    batched = batched_runs(batch)
    for s in seeds:
        alone, together = single[s][0], batched[s]
        assert len(alone) == len(together) == 5
        for a, b in zip(alone, together):
            for key in a:
                if key.startswith(("compute/flops", "compute/examples", "compute/tokens")):
                    assert a[key] == b[key], key
                elif key.startswith(("acc/", "loss/")):
                    assert b[key] == pytest.approx(a[key], abs=TOL), key
        for p, q in zip(single[s][1].model.parameters(), batch.trainers[seeds.index(s)].model.parameters()):
            assert p.dtype == torch.float64
            torch.testing.assert_close(p, q, rtol=0, atol=TOL)
    frozen = [n for n, p in batch.engine.params.items() if not p.requires_grad]
    assert frozen and not any(n.startswith("blocks.1.mlp.") for n in frozen)


def test_shared_batch_order_needs_no_padding_and_still_matches_separate_runs(float64):
    cur = tiny(data=DATA, optim={"lr": 1e-3, "batch_size": 32, "batch_order": "shared"})
    seeds = [0, 1, 2]
    batch = Seeds(cur, seeds, engine="stacked")
    stage = cur.stages[0]
    plans = [t.epoch_plan(stage, 0)[0] for t in batch.trainers]
    def shapes(plans):
        steps, _, valid = epoch_steps(plans)
        return valid.all(), [{(hi - lo, short, long) for lo, hi, short, long in step} for step in steps]

    unpadded, shared = shapes(plans)
    assert unpadded and all(len(step) == 1 for step in shared)
    assert not all(np.array_equal(plans[0].rows, p.rows) for p in plans[1:])  # rows stay per seed
    _, seeded = shapes([t.epoch_plan(stage, 0)[0] for t in Seeds(tiny(data=DATA), seeds, engine="stacked").trainers])
    assert any(len(step) > 1 for step in seeded)  # the default order pads: the other tests' path
    single = single_runs(cur, seeds)
    batched = batched_runs(batch)
    for s in seeds:
        assert [m["compute/flops"] for m in batched[s]] == [m["compute/flops"] for m in single[s][0]]
        assert [m["loss/train"] for m in batched[s]] == pytest.approx(
            [m["loss/train"] for m in single[s][0]], abs=TOL)


def test_a_seed_that_reaches_the_target_leaves_the_batch(float64):
    cur = tiny(data=DATA, target={"task": "parity", "accuracy": 0.55},
               stages=[{"name": "train", "mix": {"parity": 1.0}, "epochs": 30}],
               optim={"lr": 3e-3, "batch_size": 32})
    seeds = [0, 1, 2]
    single = single_runs(cur, seeds)
    batch = Seeds(cur, seeds, engine="stacked")
    sizes = []
    for evaluations in batch.run():
        sizes.append(len(evaluations))
    outcomes = {s: single[s][1].outcome for s in seeds}
    assert any(o.reached for o in outcomes.values())
    assert len(set(o.compute_to_target for o in outcomes.values())) > 1, "seeds should finish apart"
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < len(seeds)
    assert batch.finished
    for s, trainer in zip(seeds, batch.trainers):
        assert trainer.outcome.reached == outcomes[s].reached
        assert trainer.outcome.compute_to_target == outcomes[s].compute_to_target
        assert trainer.outcome.evaluations == outcomes[s].evaluations


def test_a_diverging_seed_leaves_the_others_untouched(float64):
    cur = tiny(data=DATA)
    single = single_runs(cur, [0])
    batch = Seeds(cur, [0, 1], engine="stacked")
    with torch.no_grad():
        batch.trainers[1].model.head.weight.fill_(float("nan"))  # stacked from the models at the start
    batched = batched_runs(batch)
    assert batched[1][-1]["diverged"] == 1.0 and len(batched[1]) == 1
    assert batch.trainers[1].outcome.diverged
    assert [m["loss/train"] for m in batched[0]] == pytest.approx(
        [m["loss/train"] for m in single[0][0]], abs=TOL)


def test_seeds_must_be_distinct():
    with pytest.raises(ValueError, match="distinct"):
        Seeds(tiny(), [1, 1])
    with pytest.raises(ValueError, match="distinct"):
        Seeds(tiny(), [])


def test_epoch_steps_pad_short_batches_and_mark_the_padding():
    def plan(sizes):
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        n = int(bounds[-1])
        return EpochPlan(np.arange(100, 100 + n), np.ones(n, dtype=np.int64), bounds)

    steps, picks, valid = epoch_steps([plan([3, 1]), plan([1, 3])])
    assert len(steps) == 2 and picks.shape == valid.shape == (2, 2, 3)
    assert picks[0].tolist() == [[0, 1, 2], [0, 0, 0]]
    assert valid[0].tolist() == [[True, True, True], [True, False, False]]
    assert picks[1].tolist() == [[3, 3, 3], [1, 2, 3]]
    with pytest.raises(ValueError, match="same number of batches"):
        epoch_steps([plan([2, 2]), plan([4])])


def without_time(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "seconds" not in k}


def test_lockstep_seeds_equal_separate_runs_exactly():
    """Each seed's own model, stepped in turn: bit for bit the separate runs, in float32,
    including a seed that reaches the target early and leaves while the others go on."""
    cur = tiny(data=DATA, target={"task": "parity", "accuracy": 0.55},
               stages=[{"name": "pretrain", "mix": {"polynomial": 1.0}, "epochs": 1, "train_modules": ["blocks.1"]},
                       {"name": "train", "mix": {"parity": 1.0}, "epochs": 30}],
               optim={"lr": 3e-3, "batch_size": 32})
    seeds = [0, 1, 2]
    single = single_runs(cur, seeds)
    together = Seeds(cur, seeds, engine="lockstep")
    batched = batched_runs(together)
    assert len({single[s][1].outcome.evaluations for s in seeds}) > 1, "seeds should finish apart"
    for s, trainer in zip(seeds, together.trainers):
        assert [without_time(m) for m in batched[s]] == [without_time(m) for m in single[s][0]]
        for p, q in zip(single[s][1].model.parameters(), trainer.model.parameters()):
            assert torch.equal(p, q)


@pytest.mark.parametrize("engine", ["lockstep", "stacked"])
def test_seeds_resume_exactly_from_a_checkpoint_inside_a_stage(engine):
    """A checkpoint taken at an evaluation in the middle of a stage, loaded into new
    trainers, continues every seed exactly as the uninterrupted run (same engine)."""
    cur = tiny(data=DATA, stages=[{"name": "pretrain", "mix": {"polynomial": 1.0}, "epochs": 2},
                                  {"name": "finetune", "mix": {"parity": 0.7, "polynomial": 0.3}, "epochs": 4}])
    seeds = [0, 1, 2]
    straight = batched_runs(Seeds(cur, seeds, engine=engine))
    first = Seeds(cur, seeds, engine=engine)
    head = {s: [] for s in seeds}
    for evaluations in first.run():
        for seed, ev in evaluations:
            head[seed].append(ev.metrics)
        if evaluations[0][1].stage == "finetune" and evaluations[0][1].epoch == 2:
            state = first.state_dict()
            break
    resumed = Seeds(cur, seeds, engine=engine, state=state)
    tail = batched_runs(resumed)
    for s, trainer in zip(seeds, resumed.trainers):
        assert [without_time(m) for m in head[s] + tail[s]] == [without_time(m) for m in straight[s]]
    with pytest.raises(ValueError, match="other seeds"):
        Seeds(cur, [0, 1, 5], engine=engine, state=state)


def test_engine_choice_follows_the_device():
    assert choose_engine("auto", torch.device("cpu"), 4) == "lockstep"  # measured faster on CPUs
    assert choose_engine("auto", torch.device("cuda"), 4) == "stacked"
    assert choose_engine("auto", torch.device("cuda"), 1) == "lockstep"
    assert choose_engine("stacked", torch.device("cpu"), 2) == "stacked"
    with pytest.raises(ValueError, match="engine"):
        choose_engine("vmap", torch.device("cpu"), 2)


def test_checkpoints_are_taken_only_where_every_seed_resumes_exactly():
    """A seed whose loss goes non-finite between evaluations ends there, in a round of its own,
    while the others are mid-way between evaluations: their running training loss is in no
    state, so `tune.resumable` keeps the trial from checkpointing there. At every round it
    allows, a checkpoint continues every seed exactly."""
    from iterhead.trainable.tune import resumable

    cur = tiny(data=DATA, eval={"every_epochs": 2, "probe_per_len": 4},
               stages=[{"name": "train", "mix": {"parity": 1.0}, "epochs": 6}])

    def poisoned() -> Seeds:
        group = Seeds(cur, [0, 1], engine="lockstep")
        with torch.no_grad():
            group.trainers[1].model.head.weight.fill_(float("nan"))  # diverges in its first epoch
        return group

    straight = batched_runs(poisoned())
    first, flags, states = poisoned(), [], []
    for evaluations in first.run():
        flags.append(resumable(evaluations, first.trainers))
        states.append(copy.deepcopy(first.state_dict()) if flags[-1] else None)  # the live tensors move on
    assert flags == [False, True, True, True]  # seed 1 alone at epoch 1, then seed 0 at 2, 4, 6
    for i, state in enumerate(states[:-1]):
        if state is None:
            continue
        resumed = batched_runs(Seeds(cur, [0, 1], engine="lockstep", state=state))
        assert [without_time(m) for m in resumed[0]] == [without_time(m) for m in straight[0][i:]]
