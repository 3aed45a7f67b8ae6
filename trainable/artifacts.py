"""A trial's artifacts: its curriculum YAML, attention maps and accuracy-against-compute plot;
for a PBT member also its lineage (lineage.yaml) and its schedule against compute (schedule.png)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from iterhead.curricula.io import dump_curriculum
from iterhead.trainable import plots
from iterhead.trainable import results as r
from iterhead.trainable.loop import Trainer
from iterhead.trainable.probes import example_maps
from iterhead.trainable.summary import epoch_flops

ARTIFACTS = "artifacts"  # the folder name inside a final checkpoint


def write_artifacts(trainer: Trainer, folder: Path, figures: bool = True) -> list[Path]:
    """Write the three artifacts of `trainer`'s run into `folder` (only the curriculum unless
    `figures`: drawing takes most of a second); returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    cur = trainer.cur
    yaml_path = folder / "curriculum.yaml"
    yaml_path.write_text(dump_curriculum(cur))
    if not figures:
        return [yaml_path]
    patterns = example_maps(trainer.model, trainer.test, trainer.vocab, trainer.device, cur.data.cot)
    attention = plots.attention_maps(folder / "attention.png", patterns)
    starts: dict[str, float] = {}
    previous = 0.0
    for ev in trainer.history:  # a stage starts where the evaluation before its first one stood
        starts.setdefault(ev[r.STAGE], previous)
        previous = ev[r.FLOPS]
    flops = [ev[r.FLOPS] for ev in trainer.history]
    accuracy = {r.acc(t): [ev[r.acc(t)] for ev in trainer.history] for t in cur.tasks}
    judged = r.acc(cur.target.task)
    if cur.target.min_len is not None:
        judged = f"{judged}, lengths {cur.target.min_len}+"
        accuracy[judged] = [ev[r.TARGET_ACC] for ev in trainer.history]
    curve = plots.accuracy_vs_compute(folder / "compute_to_accuracy.png", flops, accuracy,
                                      judged, cur.target.accuracy, starts)
    return [yaml_path, attention, curve]


def write_lineage(trainer: Trainer, segments: list[dict[str, Any]], member: int, folder: Path,
                  figure: bool = True) -> list[Path]:
    """A PBT member's lineage so far: each segment of its PBT stage (the stage name it trains
    under, the stage epoch it starts at, its epochs, the training FLOPs at its start, its
    settings, the member that started it), and (with `figure`) a plot of the settings against
    those FLOPs."""
    folder.mkdir(parents=True, exist_ok=True)
    cur = trainer.cur
    per_epoch = epoch_flops(cur)
    first = [s.name for s in cur.stages].index(segments[0]["name"])
    before = sum(s.epochs for s in cur.stages[:first])
    rows = [{"stage": seg["name"], "from_epoch": seg["start"], "epochs": cur.stages[first + i].epochs,
             "flops_at_start": per_epoch * (before + seg["start"]), "settings": seg["settings"],
             "started_by": f"member {seg['made_by']}"} for i, seg in enumerate(segments)]
    path = folder / "lineage.yaml"
    path.write_text(yaml.safe_dump({"member": member, "segments": rows}, sort_keys=False))
    if not figure:
        return [path]
    stops = trainer.outcome.compute_to_target if trainer.outcome.reached else trainer.compute.flops
    figure = plots.schedule(folder / "schedule.png", rows, stops, f"member {member}")
    return [path, figure]
