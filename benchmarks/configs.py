"""The configurations the speed benchmarks time: the paper's (lengths 1..32, 1024 sequences a
length, d_model 128, 2 layers, one head, batch 256) and a small one (lengths 1..8), as
curricula of one parity stage."""

from __future__ import annotations

PAPER = "paper (L 1..32, 1024/len, d128)"
SMALL = "small (L 1..8, 1024/len, d128)"
CONFIGS = {
    PAPER: {"min_len": 1, "max_len": 32, "train_per_len": 1024, "test_per_len": 1024},
    SMALL: {"min_len": 1, "max_len": 8, "train_per_len": 1024, "test_per_len": 1024},
}
D_MODEL = 128  # every configuration's width, the paper's


def curriculum(data: dict, epochs: int, name: str = "bench") -> dict:
    return {
        "name": name, "seed": 0,
        "model": {"d_model": D_MODEL, "n_layers": 2, "n_heads": 1, "dropout": 0.1},
        "data": {**data, "cot": True},
        "tasks": {"parity": {"kind": "parity"}},
        "optim": {"lr": 3.0e-4, "batch_size": 256},
        "stages": [{"name": "train", "mix": {"parity": 1.0}, "epochs": epochs}],
        "target": {"task": "parity", "accuracy": 1.0},
        # One evaluation at the end (none in a 0-epoch run; every_epochs must be positive), with
        # probes at their default: an evaluation as a real run does it.
        "eval": {"every_epochs": max(epochs, 1)},
    }
