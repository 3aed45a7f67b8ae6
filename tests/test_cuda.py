"""The CUDA path: skipped without a CUDA device (`-m gpu` selects these where one exists).

What these check is what the README promises for a GPU: a CUDA run repeats bit for bit and
resumes exactly on the same device; against the CPU it agrees up to float32 rounding only
(dropout masks differ between devices, so those comparisons train without dropout).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iterhead.trainable import checkpoint
from iterhead.trainable.devices import native_bf16
from iterhead.trainable.evaluate import correct_rows, row_margins, screened_rows, spread_rows
from iterhead.trainable.loop import Trainer
from iterhead.trainable.seeds import Seeds

from support import tiny

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("restore_determinism")]  # CUDA trainers turn deterministic kernels on
DATA = {"min_len": 1, "max_len": 4, "train_per_len": 40, "test_per_len": 32, "cot": True}
NO_DROPOUT = {"d_model": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.0}
COUNTED = ("compute/flops", "compute/examples", "compute/tokens")

# float32 keeps 24 significant bits (eps = 2**-23, about 1.2e-7). CPU and CUDA kernels round
# differently (other summation orders, other exp, erf and rsqrt implementations), so each
# device sits within rounding of the exact-arithmetic run, not on the same bits. For the
# epoch-mean losses compared here that distance stays at a few eps: on a CPU, this model's
# float32 losses were within 2 eps of a float64 run over 30 epochs, and batched seeds within
# 1 eps of separate runs. 1e-5 relative (about 80 eps) leaves room for both sides' rounding
# and sits 30x below the smallest real difference measured (another dropout mask moves these
# losses by 3e-4 to 1e-3 relative). Parameters are not compared: Adam divides by
# sqrt(v) + 1e-8, so rounding noise on gradients that are zero in exact arithmetic becomes
# full-size steps that move weights without moving the loss.
FP32_REL = 1e-5


def metrics(trainer: Trainer) -> list[dict[str, float]]:
    return [e.metrics for e in trainer.run()]


def without_time(rows: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in m.items() if "seconds" not in k} for m in rows]


def test_cuda_trains_the_same_trial_as_the_cpu():
    """Same compute counted, exactly; losses equal up to float32 rounding."""
    cur = tiny(data=DATA, model=NO_DROPOUT)
    a, b = metrics(Trainer(cur)), metrics(Trainer(cur, "cuda"))
    assert len(a) == len(b)
    for key in COUNTED:
        assert [m[key] for m in a] == [m[key] for m in b], key
    assert [m["loss/train"] for m in b] == pytest.approx([m["loss/train"] for m in a], rel=FP32_REL)


def test_only_gpus_with_bf16_units_count_as_native_bf16():
    """Every device, asked about itself: an NVIDIA GPU from compute capability 8 (Ampere) up;
    older ones make bf16 tensors (which torch's default check counts) but emulate its maths."""
    for i in range(torch.cuda.device_count()):
        device = torch.device("cuda", i)
        with torch.cuda.device(device):
            expected = (torch.cuda.get_device_capability(device)[0] >= 8 if torch.version.hip is None
                        else torch.cuda.is_bf16_supported(including_emulation=False))
        assert native_bf16(device) == expected


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_cuda_run_repeats_bit_for_bit(precision):
    """Dropout on, deterministic kernels: two runs on one device give the same bits."""
    first = Trainer(tiny(data=DATA), "cuda", precision=precision)
    a = metrics(first)
    assert torch.are_deterministic_algorithms_enabled()
    second = Trainer(tiny(data=DATA), "cuda", precision=precision)
    assert without_time(metrics(second)) == without_time(a)
    for p, q in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(p, q)


def test_cuda_resume_from_checkpoint_is_exact(tmp_path):
    straight = Trainer(tiny(data=DATA), "cuda")
    history = metrics(straight)
    first = Trainer(tiny(data=DATA), "cuda")
    events = first.run()
    for _ in range(3):  # stop mid-way through the second stage, after its first evaluation
        next(events)
    checkpoint.save(first.state_dict(), tmp_path)
    resumed = Trainer(tiny(data=DATA), "cuda", state=checkpoint.load(tmp_path, "cuda"))
    assert without_time(metrics(resumed)) == without_time(history[3:])
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_an_epoch_never_waits_on_the_host():
    """No step synchronises with the host: CUDA's sync debug mode raises on any that does."""
    trainer = Trainer(tiny(data=DATA), "cuda")
    stage = trainer.cur.stages[0]
    trainer.start_stage(stage)
    trainer.train_epoch(*trainer.epoch_plan(stage, 0))  # warm-up: allocations, kernels
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_epoch(*trainer.epoch_plan(stage, 1))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_batched_seeds_on_cuda_match_separate_runs():
    """Both sides on the same device, so dropout masks are the same draws; rounding differs
    (batched products, explicit attention), hence `FP32_REL`; compute counted exactly."""
    seeds = [0, 1, 2, 3]
    batch = Seeds(tiny(data=DATA), seeds, "cuda", engine="stacked")
    together = {s: [] for s in seeds}
    for evaluations in batch.run():
        for s, ev in evaluations:
            together[s].append(ev.metrics)
    for s in seeds:
        alone = metrics(Trainer(tiny(data=DATA, seed=s), "cuda"))
        assert len(together[s]) == len(alone)
        for key in COUNTED:
            assert [m[key] for m in together[s]] == [m[key] for m in alone], key
        assert [m["loss/train"] for m in together[s]] == pytest.approx(
            [m["loss/train"] for m in alone], rel=FP32_REL)


def test_bf16_evaluation_on_cuda_scores_the_fp32_rows():
    """The screened bf16 evaluation (autocast, fused attention, the rows near a tie rescored)
    gives the fp32 verdicts on CUDA too. Rows whose fp32 margin is within 1e-4 of the row's
    largest |logit| are left out: the fp32 rescoring runs without the shared prefixes, so it
    may round those differently from the full fp32 pass (`test_evaluate.py`)."""
    trainer = Trainer(tiny(data=DATA), "cuda")
    metrics(trainer)
    table = trainer.eval_table
    want = correct_rows(trainer.model, table)
    got, _ = screened_rows(trainer.model, table)
    clear = spread_rows(table, [m.abs() > 1e-4 * s for m, s in row_margins(trainer.model, table)])
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(got[clear], want[clear])
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
