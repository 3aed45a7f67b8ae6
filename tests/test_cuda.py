"""The CUDA path: skipped without a CUDA device (`-m gpu` selects these where one exists)."""

from __future__ import annotations

import pytest
import torch

from iterhead.trainable.loop import Trainer
from iterhead.trainable.seeds import SeedBatch

from support import tiny

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
DATA = {"min_len": 1, "max_len": 4, "train_per_len": 40, "test_per_len": 32, "cot": True}


def test_cuda_trains_the_same_trial_as_the_cpu():
    """Same compute counted; accuracies and losses equal up to float rounding."""
    cpu, cuda = Trainer(tiny(data=DATA)), Trainer(tiny(data=DATA), "cuda")
    a, b = [e.metrics for e in cpu.run()], [e.metrics for e in cuda.run()]
    assert [m["compute/flops"] for m in a] == [m["compute/flops"] for m in b]
    assert [m["loss/train"] for m in b] == pytest.approx([m["loss/train"] for m in a], abs=1e-3)


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
    seeds = [0, 1, 2, 3]
    batch = SeedBatch(tiny(data=DATA), seeds, "cuda")
    together = {s: [] for s in seeds}
    for evaluations in batch.run():
        for s, ev in evaluations:
            together[s].append(ev.metrics["loss/train"])
    for s in seeds:
        alone = [e.metrics["loss/train"] for e in Trainer(tiny(data=DATA, seed=s), "cuda").run()]
        assert together[s] == pytest.approx(alone, abs=1e-3)
