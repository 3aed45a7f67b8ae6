"""One PBT member's trial, from the trainable's side: where it starts, where it stops, what it leaves.

The driver's searcher (`search/population.py`) hands each trial a member, a generation, the
member's lineage (the curriculum the trial trains), the population entry to start from and
the point to stop at (the end of the generation's interval; none in the last generation).
The trial leaves its state at that point as a new entry, ``population/<entry>.pt`` in the
search's folder (so every node of a cluster that shares the folder reaches it), which the
next generation's trials of this member, and of the members that copy it, start from.

An entry holds the trainer's whole state (`loop.Trainer.state_dict`: weights, optimiser,
position, compute, outcome and the evaluation history along the lineage). It is written
atomically (`checkpoint.write_atomic`), so a trial killed mid-write leaves none, and a
retried trial writes the same one again. A trial whose entry to start from is missing or
unreadable fails loudly: unlike a shared prefix, it cannot train the state itself.

A state taken from another member (an exploit) is adopted as this member's own: its
curriculum is replaced by this member's lineage, which equals the donor's up to the switch,
and the donor's segment in force ends there, so the trainer continues with the member's new
segment and a fresh optimiser (`loop.Trainer.load_state_dict`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from iterhead.curricula.schema import Curriculum
from iterhead.trainable.checkpoint import read, write_atomic
from iterhead.trainable.schedule import Position

FORMAT = "iterhead-population-1"


@dataclass(frozen=True)
class MemberTrial:
    """The PBT part of a trial's config (`search.population.Population.config`)."""

    folder: Path
    member: int
    generation: int
    entry: str  # the entry this trial leaves at `stop`
    start: str | None  # the entry it starts from (None: from scratch)
    donor: int | None  # whose state `start` holds, when another member's
    stop: tuple[int, int] | None  # (stage index, epochs done in it) where the generation ends
    segments: list[dict[str, Any]]  # the lineage's segments of the PBT stage (name, start, settings, made_by)

    @classmethod
    def from_config(cls, config: dict[str, Any], folder: str | Path) -> "MemberTrial":
        stop = config.get("stop")
        return cls(Path(folder), int(config["member"]), int(config["generation"]), str(config["entry"]),
                   config.get("start"), config.get("donor"), tuple(stop) if stop is not None else None,
                   list(config["segments"]))

    def path(self, name: str) -> Path:
        return self.folder / f"{name}.pt"

    def stops_at(self, position: Position) -> bool:
        return self.stop is not None and (position.stage, position.epoch) == self.stop

    def start_state(self, cur: Curriculum, device: torch.device) -> dict[str, Any] | None:
        """The state to start from, as this member's own (None: train from scratch)."""
        if self.start is None:
            return None
        path = self.path(self.start)
        try:
            entry = read(path, device)  # refuses bytes changed since it was written (CRC32)
        except Exception as e:
            raise RuntimeError(f"population entry {path} cannot be read ({type(e).__name__}: {e}); "
                               "the generation before this one must have written it") from e
        if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("name") != self.start:
            raise RuntimeError(f"{path} is not the population entry {self.start!r}")
        return {**entry["state"], "curriculum": cur.model_dump(mode="json")}

    def leave(self, state: dict[str, Any]) -> None:
        """Write this trial's entry (a retried trial writes the same state again)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        entry = {"format": FORMAT, "name": self.entry, "member": self.member, "generation": self.generation,
                 "state": state}
        write_atomic(self.path(self.entry), lambda f: torch.save(entry, f))

    def has_left(self) -> bool:
        return self.path(self.entry).exists()
