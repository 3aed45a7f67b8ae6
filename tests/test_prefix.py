"""Prefix keys name exactly the states that are equal, and a forked run is the unshared run.

No Ray here: the fork is what the trainable does (load another curriculum's state at a
shared point through `prefix.adopt`, keep its reports, train on), on plain `Trainer`s and
`Seeds`. Equality is exact (same operations on the same tensors in one process), so the
comparisons use ==, not a tolerance; only wall-clock seconds are left out.
"""

from __future__ import annotations

from typing import Any

import torch

from iterhead.trainable.loop import Trainer
from iterhead.trainable.prefix import adopt, describe, points, worth_storing
from iterhead.trainable.seeds import Seeds

from support import tiny

STAGES = [{"name": "pretrain", "mix": {"polynomial": 1.0}, "epochs": 4},
          {"name": "finetune", "mix": {"parity": 1.0}, "epochs": 3, "lr": 3.0e-3}]


def cur_with(pretrain: int = 4, finetune: dict[str, Any] | None = None, **overrides: Any):
    stages = [{**STAGES[0], "epochs": pretrain}, {**STAGES[1], **(finetune or {})}]
    return tiny(stages=stages, **overrides)


def key_at(cur, stage: int, epoch: int) -> str:
    return next(p.key for p in points(cur) if (p.stage, p.epoch) == (stage, epoch))


def timeless(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if "seconds" not in k}


def test_a_shorter_stage_is_a_prefix_of_a_longer_one_and_what_follows_does_not_matter():
    long, short = cur_with(pretrain=4), cur_with(pretrain=2, finetune={"lr": 1.0e-3})
    assert key_at(long, 0, 2) == key_at(short, 0, 2)  # 2 of 4 pretraining epochs = a 2-epoch pretraining
    assert key_at(long, 1, 1) != key_at(short, 1, 1)  # after 4 and after 2 epochs of pretraining


def test_anything_that_changes_the_state_changes_the_key():
    base = key_at(cur_with(), 0, 2)
    changed = [
        cur_with(optim={"lr": 1.0e-3, "batch_size": 16}),
        cur_with(optim={"lr": 2.0e-3, "batch_size": 32}),  # the stage's lr (none given: optim.lr)
        cur_with(model={"d_model": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.0}),
        cur_with(eval={"every_epochs": 2, "probe_per_len": 4}),
        cur_with(target={"task": "parity", "accuracy": 0.9}),
        tiny(stages=[{**STAGES[0], "mix": {"polynomial": 1.0, "parity": 0.0}}, STAGES[1]]),
        tiny(stages=[{**STAGES[0], "name": "warmup"}, STAGES[1]]),
        # the same tasks listed the other way round: their tokens and rows differ
        cur_with(tasks={"polynomial": {"kind": "polynomial", "modulus": 11}, "parity": {"kind": "parity"}}),
    ]
    for cur in changed:
        assert key_at(cur, 0, 2) != base, describe(cur, 0, 2)
    assert key_at(cur_with(name="other", seed=7), 0, 2) == base  # seeds belong to the environment


def test_a_skipped_stage_is_no_part_of_the_prefix():
    skipped = tiny(stages=[{"name": "warmup", "mix": {"parity": 1.0}, "epochs": 0}, *STAGES])
    assert key_at(skipped, 2, 1) == key_at(cur_with(), 1, 1)


def test_unplanned_trials_store_stage_ends_and_doubling_points():
    cur = cur_with(pretrain=5, finetune={"epochs": 3})
    where = {(p.stage, p.epoch) for p in points(cur) if p.key in worth_storing(cur)}
    assert where == {(0, 1), (0, 2), (0, 4), (0, 5), (1, 1), (1, 2)}
    planned = {key_at(cur, 0, 3)}
    assert worth_storing(cur, planned) == planned


def fork(producer, consumer, stage: int, epoch: int, seeds: list[int] | None = None):
    """Train `producer` to (stage, epoch), then `consumer` from that state: its reports and trainer(s)."""
    if seeds is None:
        run = Trainer(producer)
        rounds = ([ev] for ev in run.run())
        state_of = run.state_dict
    else:
        group = Seeds(producer, seeds)
        rounds = ([ev for _, ev in evs] for evs in group.run())
        state_of = group.state_dict
        run = group.trainers[0]
    reports = []
    for evs in rounds:
        reports.append([timeless(ev.metrics) for ev in evs])
        if (run.position.stage, run.position.epoch) == (stage, epoch):
            state = adopt(state_of(), consumer, seeds)
            break
    if seeds is None:
        rest = Trainer(consumer, state=state)
        reports += [[timeless(ev.metrics)] for ev in rest.run()]
        return reports, [rest]
    group = Seeds(consumer, seeds, state=state)
    reports += [[timeless(ev.metrics) for _, ev in evs] for evs in group.run()]
    return reports, group.trainers


def unshared(cur, seeds: list[int] | None = None):
    if seeds is None:
        run = Trainer(cur)
        return [[timeless(ev.metrics)] for ev in run.run()], [run]
    group = Seeds(cur, seeds)
    return [[timeless(ev.metrics) for _, ev in evs] for evs in group.run()], group.trainers


def assert_same(a, b):
    (reports_a, trainers_a), (reports_b, trainers_b) = a, b
    assert reports_a == reports_b
    for x, y in zip(trainers_a, trainers_b):
        assert [timeless(h) for h in x.history] == [timeless(h) for h in y.history]
        assert (x.outcome.reached, x.outcome.compute_to_target) == (y.outcome.reached, y.outcome.compute_to_target)
        for (name, p), q in zip(x.model.named_parameters(), y.model.parameters()):
            assert torch.equal(p, q), name


def test_a_fork_inside_a_stage_is_the_unshared_run():
    """Pretraining 2 epochs of another trial's 4, then finetuning differently: exactly the same."""
    producer = cur_with(pretrain=4)
    consumer = cur_with(pretrain=2, finetune={"lr": 1.0e-3})
    assert_same(fork(producer, consumer, 0, 2), unshared(consumer))
    consumer = cur_with(pretrain=6)  # and a longer pretraining forked from the shorter one's end
    assert_same(fork(cur_with(pretrain=2), consumer, 0, 2), unshared(consumer))


def test_a_fork_at_a_stage_boundary_is_the_unshared_run_for_every_seed():
    producer = cur_with(pretrain=2)
    consumer = cur_with(pretrain=2, finetune={"lr": 1.0e-3, "train_modules": ["blocks.1.mlp"]})
    assert_same(fork(producer, consumer, 0, 2, seeds=[0, 1]), unshared(consumer, seeds=[0, 1]))
