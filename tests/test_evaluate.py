"""Evaluation scores exactly the rows a plain full forward scores.

The reference runs every test row at the table's full padded width (causal attention: the
padding after a row's end cannot reach its answer positions), takes the argmax at every
answer position and compares the whole answer. The evaluation groups rows by length, runs
each distinct row once, gathers the first block's attention inputs from a table, runs the
shared prefixes of the later blocks once, only the answer window through the last block,
in chunks.

Tolerance: both sides compute the same fp32 logits with sums grouped or ordered differently
(chunks, the first-block table, shared prefixes, answer spans), so they may differ by
rounding. A logit is a chain of at most 3 layers (2 in most tests) x 4 matrix products of
length at most 4 x d_model = 128 (d_model is 32 here), so the relative error of either side
is at most about 3 x 4 x 128 x 2^-24 (9e-5, under 1e-4 of the row's largest |logit|); a
worst case that adds every rounding error in one direction, which they do not. Only a row
whose reference margin (target logit minus the best other, minimum over answer positions)
lies within that band of 0 could flip; such rows are left out of the comparison and there
must be few of them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
import pytest
import torch

from iterhead.curricula.data import answer_len, seq_len
from iterhead.trainable import evaluate
from iterhead.trainable.evaluate import EvalTable, accuracy_metrics, correct_rows, screened_rows
from iterhead.trainable.loop import Trainer

from support import tiny

REL_TOL = 1e-4  # module docstring


def curriculum(cot: bool, epochs: int):
    return tiny(
        model={"d_model": 32, "n_layers": 2, "n_heads": 1, "dropout": 0.0},
        data={"min_len": 1, "max_len": 6, "train_per_len": 128, "test_per_len": 64, "cot": cot},
        optim={"lr": 3.0e-3, "batch_size": 32},
        stages=[{"name": "train", "mix": {"parity": 0.5, "polynomial": 0.5}, "epochs": max(epochs, 1)}],
        eval={"every_epochs": max(epochs, 1), "probe_per_len": 0},
    )


@pytest.fixture(scope="module", params=[(True, 0), (True, 12), (False, 0), (False, 12)],
                ids=["cot-random", "cot-trained", "nocot-random", "nocot-trained"])
def trainer(request) -> Trainer:
    """A model at initialisation, or trained briefly (some rows right, some wrong)."""
    torch.set_num_threads(1)
    cot, epochs = request.param
    t = Trainer(curriculum(cot, epochs))
    if epochs:
        for _ in t.run():
            pass
    return t


def reference(model: torch.nn.Module, table: EvalTable) -> tuple[np.ndarray, np.ndarray]:
    """Per row: exact match from one full forward at full width, and the margin / scale."""
    model.eval()
    with torch.no_grad():
        logits = model(table.tokens[:, :-1])  # [n, width - 1, vocab]
    correct, margin = [], []
    for i, length in enumerate(table.lengths.tolist()):
        start, n = length + 1, answer_len(length, table.cot)
        row = logits[i, start:start + n]
        target = table.tokens[i, start + 1:start + 1 + n]
        correct.append(bool((row.argmax(-1) == target).all()))
        others = row.clone()
        others[torch.arange(n), target] = float("-inf")
        m = (row[torch.arange(n), target] - others.amax(-1)).min()
        margin.append(float(m / row.abs().max()))
    return np.array(correct), np.array(margin)


def compare(got: np.ndarray, want: np.ndarray, margin: np.ndarray) -> None:
    clear = np.abs(margin) > REL_TOL
    assert clear.mean() > 0.99, "too many near-ties to say anything"
    assert np.array_equal(got[clear], want[clear])


def test_fast_path_scores_the_reference_rows(trainer):
    want, margin = reference(trainer.model, trainer.eval_table)
    got = correct_rows(trainer.model, trainer.eval_table)
    compare(got, want, margin)
    if trainer.outcome.evaluations:  # the trained model gets some rows right and some wrong
        assert 0 < want.mean() < 1


@pytest.mark.parametrize("chunk_tokens", [1, 50, 2**20])
def test_chunk_size_does_not_change_the_verdicts(trainer, chunk_tokens):
    want, margin = reference(trainer.model, trainer.eval_table)
    compare(correct_rows(trainer.model, trainer.eval_table, chunk_tokens=chunk_tokens), want, margin)


def test_every_row_counts_and_duplicates_share_a_verdict(trainer):
    table = trainer.eval_table
    assert sum(g.hi - g.lo for g in table.groups) == len(table.lengths)
    assert sum(len(g.inputs) for g in table.groups) < len(table.lengths)  # short lengths repeat
    for g in table.groups:
        width = seq_len(g.length, table.cot)
        rows = table.tokens[g.lo:g.hi, :width - 1]
        assert torch.equal(g.inputs[g.inverse], rows)


def test_rows_with_a_shared_prefix_point_at_it(trainer):
    """The fast path above ran with shared prefixes: check they are the rows' real first tokens."""
    table = trainer.eval_table
    assert table.prefixes is not None
    shared = [g for g in table.groups if g.prefix is not None]
    assert shared and len(table.prefixes) < sum(len(g.inputs) for g in shared)
    for g in shared:
        assert torch.equal(table.prefixes[g.prefix], g.inputs[:, :table.prefixes.shape[1]])


def test_hooked_attention_scores_the_reference_rows(trainer):
    """With a hook attached (interventions), rows run whole and still score as the reference."""
    want, margin = reference(trainer.model, trainer.eval_table)
    handles = [b.attn.hook_pattern.register_forward_hook(lambda _m, _i, out: out) for b in trainer.model.blocks]
    try:
        got = correct_rows(trainer.model, trainer.eval_table)
    finally:
        for h in handles:
            h.remove()
    compare(got, want, margin)


def test_accuracy_is_the_mean_over_lengths(trainer):
    correct = correct_rows(trainer.model, trainer.eval_table)
    metrics = accuracy_metrics(trainer.eval_table, correct)
    table = trainer.eval_table
    for t, name in enumerate(table.task_names):
        per_len = [correct[(table.tasks == t) & (table.lengths == n)].mean() for n in range(1, 7)]
        assert metrics[f"acc/{name}/len_3"] == pytest.approx(per_len[2])
        assert metrics[f"acc/{name}"] == pytest.approx(np.mean(per_len))


@pytest.mark.parametrize("min_len", [None, 1])
def test_a_target_met_at_every_length_is_met_whatever_the_rounding(trainer, min_len):
    """19 of 20 rows right at each of 3 lengths is 0.95 at each, and their mean is 0.95, but
    float64 sums it to 0.9499999999999998: a target of 0.95 is met (`results.meets_target`),
    and one row fewer misses it."""
    from iterhead.trainable.results import meets_target, target_accuracy

    table = trainer.eval_table
    rows = {n: np.flatnonzero((table.tasks == 0) & (table.lengths == n))[:20] for n in (1, 2, 3)}
    keep = np.concatenate(list(rows.values()))
    sub = replace(table, lengths=table.lengths[keep], tasks=table.tasks[keep], task_names=table.task_names[:1])
    correct = np.ones(len(keep), dtype=bool)
    correct[[0, 20, 40]] = False  # one wrong row at each length
    metrics = accuracy_metrics(sub, correct)
    assert [metrics[f"acc/{table.task_names[0]}/len_{n}"] for n in (1, 2, 3)] == [0.95] * 3
    score = target_accuracy(metrics, table.task_names[0], min_len, 3)
    assert score < 0.95  # the rounding this guards against
    assert meets_target(score, 0.95)
    correct[1] = False
    fewer = accuracy_metrics(sub, correct)
    assert not meets_target(target_accuracy(fewer, table.task_names[0], min_len, 3), 0.95)


def test_training_mode_is_restored(trainer):
    trainer.model.train()
    correct_rows(trainer.model, trainer.eval_table)
    assert trainer.model.training
    trainer.model.eval()


def test_bf16_screen_scores_the_reference_rows(trainer):
    """bf16 with the near-tie rows rescored in fp32 gives fp32's verdicts; the model stays fp32."""
    want, margin = reference(trainer.model, trainer.eval_table)
    trainer.model.train()
    got = correct_rows(trainer.model, trainer.eval_table, precision="bf16")
    assert trainer.model.training
    trainer.model.eval()
    compare(got, want, margin)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())


def test_rows_bf16_cannot_tell_apart_are_rescored_in_fp32(monkeypatch):
    """Logits 2^-12 apart are one value in bf16 (8 significant bits), so the bf16 margin is 0:
    every row is rescored and fp32's verdict counts, which a plain bf16 pass gets wrong."""
    t = Trainer(curriculum(True, 0))
    with torch.no_grad():
        t.model.head.weight.zero_()  # logits = the bias at every position, exactly
        t.model.head.bias.fill_(1.0)
        t.model.head.bias[1] += 2**-12  # fp32's argmax is symbol 1 everywhere; bf16 sees a tie
    want = correct_rows(t.model, t.eval_table)
    assert 0 < want.sum() < len(want)  # right: the rows answered 1 throughout (parity of 1, 0, .., 0)
    got, rescored = screened_rows(t.model, t.eval_table)
    assert rescored == sum(len(g.inputs) for g in t.eval_table.groups)
    np.testing.assert_array_equal(got, want)
    monkeypatch.setattr(evaluate, "SCREEN", -1.0)  # no screen: the bf16 verdicts alone
    plain, rescored = screened_rows(t.model, t.eval_table)
    assert rescored == 0 and not plain.any()


def test_the_screen_rescores_only_rows_near_a_tie(trainer, monkeypatch):
    """Rows far from a tie keep their bf16 verdict, so not every row is rescored; an infinite
    screen rescores every row and still gives fp32's verdicts."""
    n = sum(len(g.inputs) for g in trainer.eval_table.groups)
    _, some = screened_rows(trainer.model, trainer.eval_table)
    monkeypatch.setattr(evaluate, "SCREEN", float("inf"))
    got, everything = screened_rows(trainer.model, trainer.eval_table)
    assert some < everything == n
    want, margin = reference(trainer.model, trainer.eval_table)
    compare(got, want, margin)


def test_an_evaluation_precision_other_than_fp32_or_bf16_is_refused(trainer):
    with pytest.raises(ValueError, match="fp32 or bf16, not 'fp16'"):
        correct_rows(trainer.model, trainer.eval_table, precision="fp16")


def head_positions(model: torch.nn.Module, run: Callable[[], np.ndarray]) -> tuple[np.ndarray, int]:
    """`run()`'s result and how many positions the model's head scored during it."""
    seen = []
    handle = model.head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[0] * args[0].shape[1]))
    try:
        return run(), sum(seen)
    finally:
        handle.remove()


def test_rows_stop_at_their_first_wrong_answer_token(monkeypatch):
    """A model at initialisation gets most chain-of-thought rows wrong early: the rows wrong in
    the first answer span are not run further, and the verdicts are those of whole rows."""
    t = Trainer(curriculum(True, 0))
    table = t.eval_table
    assert max(g.targets.shape[1] for g in table.groups) > evaluate.FIRST_CUT  # some rows have a later span
    early, some = head_positions(t.model, lambda: correct_rows(t.model, table))
    monkeypatch.setattr(evaluate, "FIRST_CUT", 10**6)  # every row whole
    whole, every = head_positions(t.model, lambda: correct_rows(t.model, table))
    assert every == sum(len(g.inputs) * g.targets.shape[1] for g in table.groups)
    assert some < every
    want, margin = reference(t.model, table)
    compare(early, want, margin)
    compare(whole, want, margin)


def assert_right_rows_run_whole(model: torch.nn.Module, table: EvalTable) -> None:
    """Scored against its own argmax, every row is right and runs every answer position once,
    except rows at a tie within rounding (margin under `REL_TOL` of the largest |logit|),
    which the spans' rounding may score wrong and stop early."""
    right = evaluate.own_answers(model, table)
    unsure = [m < REL_TOL * s for m, s in evaluate.row_margins(model, right)]
    correct, positions = head_positions(model, lambda: correct_rows(model, right))
    assert correct[~evaluate.spread_rows(right, unsure)].all()
    every = sum(len(g.inputs) * g.targets.shape[1] for g in right.groups)
    slack = sum(int(u.sum()) * g.targets.shape[1] for u, g in zip(unsure, right.groups))
    assert slack < every / 10, "too many near-ties to say anything"
    assert every - slack <= positions <= every


def test_rows_right_to_the_end_run_each_answer_position_once(trainer):
    """The spans cost no extra positions: no position runs twice."""
    assert_right_rows_run_whole(trainer.model, trainer.eval_table)


@pytest.mark.parametrize("n_layers", [1, 3])
def test_answer_spans_score_the_reference_rows_at_any_depth(n_layers):
    """One block keeps no keys and values between spans (its inputs come from the first-block
    table); three keep two blocks' worth. Either way rows score as whole rows do, and rows
    right to the end run every span."""
    cur = curriculum(True, 0)
    t = Trainer(cur.model_copy(update={"model": cur.model.model_copy(update={"n_layers": n_layers})}))
    assert len(t.model.blocks) == n_layers
    want, margin = reference(t.model, t.eval_table)
    compare(correct_rows(t.model, t.eval_table), want, margin)
    assert_right_rows_run_whole(t.model, t.eval_table)


def test_a_gpu_chunk_fits_its_memory_budget_at_any_width():
    """The paper's width keeps the largest chunk; a wide multi-head model takes fewer tokens a
    chunk, so that its gathered table rows and per-head outputs stay within the budget."""
    from iterhead.trainable.evaluate import CUDA_CHUNK_BYTES, CUDA_CHUNK_TOKENS, cuda_chunk_tokens

    assert cuda_chunk_tokens(128, 1, 4, CUDA_CHUNK_BYTES) == CUDA_CHUNK_TOKENS
    wide = cuda_chunk_tokens(768, 12, 4, CUDA_CHUNK_BYTES)
    assert 2**10 < wide < CUDA_CHUNK_TOKENS and wide * 4 * 768 * (2 + 24 + 4 + 6) <= CUDA_CHUNK_BYTES
    assert cuda_chunk_tokens(768, 12, 4, 2**20) == 2**10  # a floor: a chunk always holds some rows
