"""A trial's artifacts: its curriculum YAML, attention maps and accuracy-against-compute plot."""

from __future__ import annotations

from pathlib import Path

from iterhead.curricula.io import dump_curriculum
from iterhead.trainable import plots
from iterhead.trainable import results as r
from iterhead.trainable.loop import Trainer
from iterhead.trainable.probes import example_maps

ARTIFACTS = "artifacts"  # the folder name inside a final checkpoint


def write_artifacts(trainer: Trainer, folder: Path) -> list[Path]:
    """Write the three artifacts of `trainer`'s run into `folder`; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    cur = trainer.cur
    yaml_path = folder / "curriculum.yaml"
    yaml_path.write_text(dump_curriculum(cur))
    maps = example_maps(trainer.model, trainer.test, trainer.vocab, trainer.device, cur.data.cot)
    attention = plots.attention_maps(folder / "attention.png", maps)
    starts: dict[str, float] = {}
    previous = 0.0
    for ev in trainer.history:  # a stage starts where the evaluation before its first one stood
        starts.setdefault(ev[r.STAGE], previous)
        previous = ev[r.FLOPS]
    flops = [ev[r.FLOPS] for ev in trainer.history]
    accuracy = {t: [ev[r.acc(t)] for ev in trainer.history] for t in cur.tasks}
    curve = plots.accuracy_vs_compute(folder / "compute_to_accuracy.png", flops, accuracy,
                                      cur.target.task, cur.target.accuracy, starts)
    return [yaml_path, attention, curve]
