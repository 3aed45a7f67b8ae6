"""The training loop: determinism, exact resume, stages, compute accounting, the sampler."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from iterhead.curricula.data import answer_len, stream
from iterhead.curricula.sampler import Layout, plan_epoch, shares
from iterhead.trainable import checkpoint, evaluate, loop
from iterhead.trainable.loop import Trainer
from iterhead.trainable.seeds import Seeds
from iterhead.trainable.summary import planned_flops, summary_metrics

from support import tiny


def run_all(trainer: Trainer) -> list[dict[str, float]]:
    return [ev.metrics for ev in trainer.run()]


def without_time(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if "seconds" not in k}


PRECISIONS = pytest.mark.parametrize("precision", ["fp32", "bf16"])


@PRECISIONS
def test_same_seed_same_numbers_other_seed_other_numbers(precision):
    a = run_all(Trainer(tiny(), precision=precision))
    b = run_all(Trainer(tiny(), precision=precision))
    c = run_all(Trainer(tiny(seed=1), precision=precision))
    assert [without_time(m) for m in a] == [without_time(m) for m in b]
    assert [m["loss/train"] for m in a] != [m["loss/train"] for m in c]


@PRECISIONS
def test_resume_from_checkpoint_is_exact(tmp_path, precision):
    straight = Trainer(tiny(), precision=precision)
    history = run_all(straight)
    first = Trainer(tiny(), precision=precision)
    events = first.run()
    for _ in range(3):  # stop mid-way through the second stage, after its first evaluation
        next(events)
    checkpoint.save(first.state_dict(), tmp_path)
    resumed = Trainer(tiny(), state=checkpoint.load(tmp_path), precision=precision)
    rest = run_all(resumed)
    assert [without_time(m) for m in rest] == [without_time(m) for m in history[3:]]
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_checkpoint_refuses_another_curriculum(tmp_path):
    trainer = Trainer(tiny())
    checkpoint.save(trainer.state_dict(), tmp_path)
    with pytest.raises(ValueError, match="different curriculum"):
        Trainer(tiny(seed=3), state=checkpoint.load(tmp_path))


def test_the_order_a_mix_lists_its_tasks_in_changes_nothing():
    """It drew each task's rows in the mapping's order, so a reordered mix trained other rows,
    though the curricula compare equal and share prefix keys."""
    stages = [{"name": "s", "mix": {"parity": 0.5, "polynomial": 0.5}, "epochs": 2}]
    reordered = [{"name": "s", "mix": {"polynomial": 0.5, "parity": 0.5}, "epochs": 2}]
    assert tiny(stages=stages) == tiny(stages=reordered)
    assert run_all(Trainer(tiny(stages=stages)))[-1]["loss/train"] == \
        run_all(Trainer(tiny(stages=reordered)))[-1]["loss/train"]
    layout = Layout({"a": 0, "b": 100, "c": 200}, min_len=1, max_len=5, per_len=20)
    weights = {"a": 0.1, "b": 0.2, "c": 0.7}  # at 15 slots a and c tie for the last one (1.5 and 10.5)
    backwards = dict(reversed(weights.items()))
    assert shares(weights, 15) == shares(backwards, 15) == {"a": 2, "b": 3, "c": 10}
    assert np.array_equal(plan_epoch(layout, weights, 16, stream(0, "t")).rows,
                          plan_epoch(layout, backwards, 16, stream(0, "t")).rows)


def test_checkpoint_refuses_the_tasks_in_another_order(tmp_path):
    """The tasks' order sets their token ids and rows, so it is part of what a state continues."""
    trainer = Trainer(tiny())
    checkpoint.save(trainer.state_dict(), tmp_path)
    swapped = {"polynomial": {"kind": "polynomial", "modulus": 11}, "parity": {"kind": "parity"}}
    with pytest.raises(ValueError, match="lists its tasks in another order"):
        Trainer(tiny(tasks=swapped), state=checkpoint.load(tmp_path))


@pytest.mark.parametrize("seeds", [None, [0, 1]])
def test_weights_left_non_finite_by_an_epochs_last_step_are_a_divergence(monkeypatch, seeds):
    """The epoch's loss is summed before each step, so it stayed finite; the NaN model was
    then evaluated, and its argmax (token 0) scored the answers made of that token."""
    real = Trainer.count

    def count_then_poison(self, plan):  # after the epoch's last step, as an overflowing update would
        real(self, plan)
        with torch.no_grad():
            self.model.head.weight.fill_(float("nan"))

    monkeypatch.setattr(Trainer, "count", count_then_poison)
    if seeds is None:
        events = list(Trainer(tiny()).run())
    else:
        group = Seeds(tiny(), seeds, engine="lockstep")
        events = [ev for round_ in group.run() for _, ev in round_]
    assert events and all(ev.diverged and ev.final and ev.epoch == 1 for ev in events)
    assert len(events) == (1 if seeds is None else 2)


def test_finite_weights_whose_activations_overflow_are_a_divergence():
    """One step an epoch: its loss was taken before the step and the weights stayed finite, but
    their products overflow float32, so the probes were NaN, written as metrics, and the accuracy
    an argmax of NaN logits."""
    stages = [{"name": "only", "mix": {"parity": 1.0}, "epochs": 1}]
    trainer = Trainer(tiny(optim={"lr": 1.0e10, "batch_size": 10**6}, stages=stages))
    events = list(trainer.run())
    assert trainer.weights_finite()
    assert len(events) == 1 and events[0].diverged and events[0].final and trainer.outcome.diverged
    assert all(np.isfinite(v) for v in events[0].metrics.values())


def test_epoch_costs_the_same_whatever_the_mix():
    costs = []
    for mix in ({"parity": 1.0}, {"polynomial": 1.0}, {"parity": 0.3, "polynomial": 0.7}):
        cur = tiny(stages=[{"name": "s", "mix": mix, "epochs": 1}])
        trainer = Trainer(cur)
        run_all(trainer)
        costs.append((trainer.compute.examples, trainer.compute.tokens, trainer.compute.flops))
    assert costs[0] == costs[1] == costs[2]
    assert costs[0][2] == pytest.approx(planned_flops(tiny(stages=[{"name": "s", "mix": {"parity": 1}, "epochs": 1}])))


def test_zero_epoch_stage_is_skipped_and_compute_is_cumulative():
    cur = tiny(stages=[{"name": "pretrain", "mix": {"polynomial": 1}, "epochs": 0},
                       {"name": "finetune", "mix": {"parity": 1}, "epochs": 2}])
    trainer = Trainer(cur)
    events = list(trainer.run())
    assert {ev.stage for ev in events} == {"finetune"}
    two = Trainer(tiny())
    events = list(two.run())
    flops = [ev.metrics["compute/flops"] for ev in events]
    assert flops == sorted(flops) and len(set(flops)) == len(flops)
    assert two.compute.flops == pytest.approx(planned_flops(tiny()))


@PRECISIONS
def test_train_modules_freezes_everything_else(precision):
    cur = tiny(stages=[{"name": "ft", "mix": {"parity": 1}, "epochs": 1, "train_modules": ["blocks.1.mlp"]}])
    trainer = Trainer(cur, precision=precision)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    run_all(trainer)
    for name, p in trainer.model.named_parameters():
        changed = not torch.equal(before[name], p)
        assert changed == name.startswith("blocks.1.mlp."), name


def test_stops_at_target_and_summarises():
    cur = tiny(target={"task": "parity", "accuracy": 0.01})
    trainer = Trainer(cur)
    events = list(trainer.run())
    assert [ev.reached for ev in events] == [False] * (len(events) - 1) + [True]
    assert len(events) < 5  # stopped before the last stage ended
    s = summary_metrics(cur, trainer.outcome)
    assert s["reached"] == 1.0 and s["compute_to_target"] == events[-1].metrics["compute/flops"]
    unreached = Trainer(tiny(target={"task": "parity", "accuracy": 1.0},
                             stages=[{"name": "s", "mix": {"polynomial": 1}, "epochs": 1}]))
    run_all(unreached)
    s = summary_metrics(unreached.cur, unreached.outcome)
    assert s["reached"] == 0.0 and np.isfinite(s["compute_to_target"])
    assert s["compute_to_target"] > unreached.compute.flops


def test_target_min_len_judges_the_target_on_the_lengths_from_it():
    """Without ``target.min_len`` the target is judged on ``acc/<task>``; with it, on the mean
    of the per-length accuracies from it up. Training is the same either way (same seed)."""
    whole = list(Trainer(tiny(target={"task": "parity", "accuracy": 1.0})).run())
    from3 = list(Trainer(tiny(target={"task": "parity", "accuracy": 1.0, "min_len": 3})).run())
    assert all(ev.target_acc == ev.metrics["acc/parity"] for ev in whole)
    for ev in from3:
        assert ev.target_acc == statistics.fmean([ev.metrics["acc/parity/len_3"], ev.metrics["acc/parity/len_4"]])
        assert ev.reached == (ev.target_acc >= 1.0)
    assert [ev.metrics["loss/train"] for ev in whole[:len(from3)]] == [ev.metrics["loss/train"] for ev in from3][:len(whole)]
    assert any(a.target_acc != b.target_acc for a, b in zip(whole, from3))


def test_metrics_have_the_documented_names():
    metrics = run_all(Trainer(tiny()))[-1]
    for task in ("parity", "polynomial"):
        assert 0.0 <= metrics[f"acc/{task}"] <= 1.0
        per_len = [metrics[f"acc/{task}/len_{n}"] for n in range(1, 5)]
        assert metrics[f"acc/{task}"] == pytest.approx(np.mean(per_len))
        for layer in range(2):
            for head in range(2):
                assert 0.0 <= metrics[f"probe/{task}/iteration/l{layer}h{head}"] <= 1.0
                assert 0.0 <= metrics[f"probe/{task}/cot_to_eoi/l{layer}h{head}"] <= 1.0
    for key in ("loss/train", "compute/flops", "compute/examples", "compute/tokens", "compute/seconds",
                "compute/eval_flops"):
        assert metrics[key] > 0


def test_sampler_stratifies_by_length_and_batches_by_length():
    layout = Layout({"a": 0, "b": 100}, min_len=1, max_len=5, per_len=20)
    plan = plan_epoch(layout, {"a": 0.25, "b": 0.75}, 16, stream(0, "t"))
    assert len(plan.rows) == 100 and len(np.unique(plan.rows)) == 100
    for length in range(1, 6):
        rows = plan.rows[plan.lengths == length]
        assert len(rows) == 20 and (rows < 100).sum() == 5
    for lo, hi, short, long in plan.batches():
        assert long - short <= 1 and 0 < hi - lo <= 16
    assert shares({"x": 1, "y": 1, "z": 1}, 10) == {"x": 4, "y": 3, "z": 3}


def test_divergence_stops_at_once_and_is_censored():
    cur = tiny(optim={"lr": 1.0e10, "batch_size": 32})
    trainer = Trainer(cur)
    events = list(trainer.run())
    assert len(events) == 1 and events[0].diverged and events[0].final
    assert events[0].epoch == 1 and events[0].metrics["diverged"] == 1.0  # the first epoch's sync caught it
    assert trainer.outcome.diverged and not trainer.outcome.reached
    s = summary_metrics(cur, trainer.outcome)
    assert s["diverged"] == 1.0 and s["reached"] == 0.0 and np.isfinite(s["compute_to_target"])
    healthy = Trainer(tiny())
    run_all(healthy)
    assert not healthy.outcome.diverged


def test_bf16_trains_close_to_fp32_with_the_same_compute():
    fp32, bf16 = Trainer(tiny()), Trainer(tiny(), precision="bf16")
    a, b = run_all(fp32), run_all(bf16)
    assert [m["compute/flops"] for m in a] == [m["compute/flops"] for m in b]
    losses_a, losses_b = [m["loss/train"] for m in a], [m["loss/train"] for m in b]
    assert losses_a != losses_b  # the steps really ran in bf16
    # no rounding bound survives hundreds of optimiser steps (training amplifies differences);
    # 5% asks only that both precisions learn alike here (BENCHMARKS.md compares them over seeds)
    assert losses_b == pytest.approx(losses_a, rel=0.05)
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in bf16._bf16.model.parameters())
    with pytest.raises(ValueError, match="precision"):
        Trainer(tiny(), precision="fp16")


@pytest.mark.parametrize("eval_precision", ["fp32", "bf16"])
def test_a_bf16_run_scores_accuracy_at_its_eval_precision(monkeypatch, eval_precision):
    """Training precision does not choose the evaluation's: fp32 unless `eval.precision` asks
    for the screened bf16 one, on the test and the training rows alike."""
    asked = []

    def spy(model, table, chunk_tokens=None, precision="fp32"):
        asked.append(precision)
        return evaluate.correct_rows(model, table, chunk_tokens, precision)

    monkeypatch.setattr(loop, "correct_rows", spy)
    cur = tiny(eval={"every_epochs": 5, "probe_per_len": 4, "train_per_len": 8, "precision": eval_precision})
    evaluations = run_all(Trainer(cur, precision="bf16"))
    assert asked == [eval_precision] * 2 * len(evaluations)  # test and training rows each time


@pytest.mark.parametrize("cot", [True, False])
def test_single_length_fast_loss_reads_exactly_the_masked_positions(cot):
    """A one-length batch takes the unmasked mean over its window; that window must be exactly
    the loss mask's answer positions, or the fast path would train other tokens."""
    cur = tiny(data={"min_len": 1, "max_len": 4, "train_per_len": 64, "test_per_len": 32, "cot": cot})
    trainer = Trainer(cur)
    trainer.model.eval()

    for length in range(1, 5):
        rows = torch.from_numpy(trainer.layout.rows_of("parity", length)[:8])
        start, stop = length + 1, length + 1 + answer_len(length, cot)
        mask = trainer.train_mask[rows]
        assert mask[:, start:stop].all() and mask.sum() == mask[:, start:stop].sum()
        batch = trainer.train_tokens[rows]
        logits = trainer.model(batch[:, :stop], q_start=start)
        fast = F.cross_entropy(logits.flatten(0, 1), batch[:, start + 1:stop + 1].flatten())
        full = trainer.model(batch[:, :-1])
        each = F.cross_entropy(full.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        masked = (each * mask.flatten()).sum() / mask.sum()
        assert fast.item() == pytest.approx(masked.item(), rel=1e-5)


def test_shared_batch_order_is_the_same_for_every_seed_and_off_by_default():
    def shapes(trainer):
        plan, _ = trainer.epoch_plan(trainer.cur.stages[1], 3)
        return [(hi - lo, short, long) for lo, hi, short, long in plan.batches()], plan.rows
    data = {"min_len": 1, "max_len": 4, "train_per_len": 40, "test_per_len": 32, "cot": True}
    shared = {"lr": 1e-3, "batch_size": 32, "batch_order": "shared"}
    a, rows_a = shapes(Trainer(tiny(data=data, optim=shared)))
    b, rows_b = shapes(Trainer(tiny(data=data, optim=shared, seed=5)))
    assert a == b and not np.array_equal(rows_a, rows_b)
    c, _ = shapes(Trainer(tiny(data=data)))
    d, _ = shapes(Trainer(tiny(data=data, seed=5)))
    assert c != d


def test_training_set_accuracy_is_scored_beside_the_test_accuracy():
    """`eval.train_per_len` scores that many training rows a length under ``train_acc/``; it
    changes nothing else (training and test accuracy are the same numbers without it)."""
    plain = Trainer(tiny())
    scored = Trainer(tiny(eval={"every_epochs": 1, "probe_per_len": 4, "train_per_len": 16}))
    table = scored.train_table
    train_rows = {row.tobytes() for row in scored.train_tokens.numpy()}
    assert all(row.tobytes() in train_rows for row in table.tokens.numpy())
    assert sorted(np.unique(table.lengths, return_counts=True)[1]) == [32] * 4  # 16 of each task, lengths 1..4
    a, b = run_all(plain), run_all(scored)
    assert len(a) == len(b)
    for m, n in zip(a, b):
        assert {k: v for k, v in n.items() if not k.startswith("train_acc/") and "eval" not in k
                and "seconds" not in k} == without_time({k: v for k, v in m.items() if "eval" not in k})
        assert {k for k in n if k.startswith("train_acc/")} == {
            f"train_acc/{t}{s}" for t in ("parity", "polynomial") for s in ["", *(f"/len_{L}" for L in range(1, 5))]}
        assert n["compute/eval_flops"] > m["compute/eval_flops"]
    assert plain.train_table is None and not any(k.startswith("train_acc/") for k in a[-1])


def test_training_set_accuracy_shows_memorising():
    """Polynomial iteration at lengths 4..5 from 32 training inputs a length, test inputs unseen:
    the model learns its training rows but not the task, and only ``train_acc/`` shows it."""
    cur = tiny(model={"d_model": 64, "n_layers": 2, "n_heads": 1, "dropout": 0.0},
               data={"min_len": 4, "max_len": 5, "train_per_len": 32, "test_per_len": 32, "cot": True,
                     "split": "disjoint"},
               tasks={"polynomial": {"kind": "polynomial", "modulus": 11}},
               optim={"lr": 3.0e-3, "batch_size": 16},
               stages=[{"name": "train", "mix": {"polynomial": 1.0}, "epochs": 150}],
               target={"task": "polynomial", "accuracy": 1.0},
               eval={"every_epochs": 150, "probe_per_len": 0, "train_per_len": 32})
    torch.set_num_threads(1)
    (last,) = run_all(Trainer(cur))
    assert last["train_acc/polynomial"] >= 0.9 and last["acc/polynomial"] <= 0.5, last
