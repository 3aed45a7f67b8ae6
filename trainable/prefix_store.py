"""The prefix store: trained states that other trials of a search start from, and claims.

It lives in the search's storage folder, beside Tune's own state, so every node of a
cluster that shares that folder reaches it. Two kinds of file:

- ``entries/<key>.pt``: one prefix's state (every seed of the trial), the reports the
  trial made up to it, and where it came from. Written atomically (`checkpoint.write_atomic`:
  a temporary file, synced, renamed), so a writer killed mid-write leaves no readable
  entry. An entry that does not load (a record failing its CRC32 check included), or that
  carries another format or key, is ignored with a warning, never trusted, and set aside
  (renamed ``*.bad-<pid>``) so that the next trial to reach that point writes a good one.
- ``claims/<owner>.json``: a live trial's promise of the entries it is on its way to
  writing, with a lease: the file's modification time, renewed by a daemon thread while
  the trial's thread runs. A claimant that dies stops renewing and loses its claims after
  `lease_s`.

A trial that needs a prefix that an older live claim promises waits for it rather than
training it twice (`Sharing.start`). Only older claims are waited for (by creation time,
then owner), so no two trials ever wait for each other.
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from iterhead.trainable.checkpoint import read, write_atomic
from iterhead.trainable.prefix import Point, entry_key

# 2: the copies of a shared stage's lead keep its optimiser at the stage's end, and the source says
# what its writer forked; a format-1 entry may hold a fresh-Adam copy, so it is set aside
FORMAT = "iterhead-prefix-2"
LEASE_S = 30.0  # a claim not renewed for this long belongs to a dead trial
POLL_S = 0.5  # how often a waiting trial looks again


@dataclass(frozen=True)
class Claim:
    owner: str
    created_ns: int
    promises: frozenset[str]  # entry keys the owner will write

    @property
    def age(self) -> tuple[int, str]:
        return (self.created_ns, self.owner)


class PrefixStore:
    """The entries and claims in one folder (module docstring)."""

    def __init__(self, folder: str | Path, lease_s: float = LEASE_S) -> None:
        self.folder = Path(folder)
        self.entries = self.folder / "entries"
        self.claims = self.folder / "claims"
        self.entries.mkdir(parents=True, exist_ok=True)
        self.claims.mkdir(parents=True, exist_ok=True)
        self.lease_s = lease_s

    # -- entries ----------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        return self.entries / f"{key}.pt"

    def has(self, key: str) -> bool:
        return self.path(key).exists()

    def put(self, key: str, state: dict[str, Any], reports: list[dict[str, Any]], source: dict[str, Any]) -> None:
        """Write an entry atomically; an entry already there is the same state, and is kept."""
        import torch

        if self.has(key):
            return
        entry = {"format": FORMAT, "key": key, "state": state, "reports": reports, "source": source}
        write_atomic(self.path(key), lambda f: torch.save(entry, f))

    def get(self, key: str, device: Any = "cpu") -> dict[str, Any] | None:
        """The entry under `key`, or None if there is none or it cannot be trusted (warned)."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            entry = read(path, device)  # bytes changed since it was written (a CRC32 fails) count as torn
        except Exception as e:  # a torn or foreign file: ignore it, loudly
            return self._set_aside(path, f"unreadable ({type(e).__name__}: {e})")
        if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("key") != key:
            return self._set_aside(path, f"not an {FORMAT} entry for this key")
        return entry

    def _set_aside(self, path: Path, why: str) -> None:
        """Warn, and move a bad entry out of the way, so the next trial to get there writes a good one."""
        warnings.warn(f"prefix store: ignoring entry {path}: {why}", stacklevel=3)
        try:
            os.replace(path, path.with_name(f"{path.name}.bad-{os.getpid()}"))
        except OSError:  # another reader moved it first
            pass
        return None

    # -- claims -----------------------------------------------------------------------------

    def claim(self, owner: str, promises: set[str], created_ns: int | None = None) -> Claim:
        """Publish (or update) `owner`'s claim on the entries it will write; renews its lease."""
        claim = Claim(owner, time.time_ns() if created_ns is None else created_ns, frozenset(promises))
        text = json.dumps({"owner": owner, "created_ns": claim.created_ns, "promises": sorted(promises)})
        write_atomic(self.claims / f"{owner}.json", lambda f: f.write(text.encode()))
        return claim

    def renew(self, owner: str) -> None:
        try:
            os.utime(self.claims / f"{owner}.json")
        except FileNotFoundError:
            pass

    def release(self, owner: str) -> None:
        (self.claims / f"{owner}.json").unlink(missing_ok=True)

    def live_claims(self) -> list[Claim]:
        """Claims whose lease has not lapsed; a lapsed one is its dead owner's, and ignored."""
        now, out = time.time(), []
        for path in self.claims.glob("*.json"):
            try:
                if now - path.stat().st_mtime > self.lease_s:
                    continue
                data = json.loads(path.read_text())
                out.append(Claim(data["owner"], int(data["created_ns"]), frozenset(data["promises"])))
            except (OSError, ValueError, KeyError):  # released or replaced while we read it
                continue
        return out


class Sharing:
    """One trial's use of the store: where it starts, what it writes, its claim and lease.

    `points` are the trial's evaluation points (`prefix.points`) in training order; `writes`
    says which of them are worth storing (others of the search can start there).
    """

    def __init__(self, store: PrefixStore, env: str, points: list[Point], writes: set[str], owner: str) -> None:
        self.store, self.owner = store, owner
        self.points = points
        self.keys = {p.key: entry_key(env, p) for p in points}
        self.writes = {self.keys[p.key] for p in points if p.key in writes}
        self.claim: Claim | None = None
        self._beat: threading.Thread | None = None
        self._stop = threading.Event()

    def key(self, point: Point) -> str:
        return self.keys[point.key]

    def point_at(self, stage: int, epoch: int) -> Point | None:
        return next((p for p in self.points if (p.stage, p.epoch) == (stage, epoch)), None)

    def best(self) -> Point | None:
        """The deepest of the trial's points whose entry is stored."""
        return next((p for p in reversed(self.points) if self.store.has(self.key(p))), None)

    def start(self, device: Any = "cpu") -> tuple[Point | None, dict[str, Any] | None]:
        """Claim what this trial will write, wait for what older live claims promise, and return
        the deepest stored prefix to start from (None: train from the start).

        A trial waits while an older live claim promises an entry deeper than the deepest
        stored one: that claimant is already on its way there.
        """
        self.claim = self.store.claim(self.owner, self.writes)
        self._heartbeat()
        while True:
            best = self.best()
            depth = best.depth if best else 0
            wanted = {self.key(p) for p in self.points if p.depth > depth}
            older = [c for c in self.store.live_claims() if c.owner != self.owner and c.age < self.claim.age]
            if not any(c.promises & wanted for c in older):
                break
            time.sleep(POLL_S)
        entry = self.store.get(self.key(best), device) if best else None
        if best is not None and entry is None:  # unreadable: warned; fall back to the next one down
            for p in reversed(self.points[:self.points.index(best)]):
                entry = self.store.get(self.key(p), device)
                if entry is not None:
                    best = p
                    break
            else:
                best = None
        if best is not None:  # promise only what lies beyond the fork
            self.claim = self.store.claim(self.owner, {self.key(p) for p in self.points
                                                      if p.depth > best.depth and self.key(p) in self.writes},
                                          self.claim.created_ns)
        return best, entry

    def resume(self) -> None:
        """A trial restored from its own checkpoint: claim the entries not written yet, wait for none."""
        self.claim = self.store.claim(self.owner, {k for k in self.writes if not self.store.has(k)})
        self._heartbeat()

    def write(self, stage: int, epoch: int, state: Callable[[], dict[str, Any]], reports: list[dict[str, Any]],
              source: dict[str, Any], ends: bool = False) -> bool:
        """Store the state at (stage, epoch) if it is one of the trial's points worth storing, or
        if the trial `ends` there before its curriculum does (the target reached, the budget
        spent): a trial sharing the prefix up to there ends there too, and need train nothing."""
        point = self.point_at(stage, epoch)
        if point is None or self.store.has(self.key(point)):
            return False
        if self.key(point) not in self.writes and not (ends and point is not self.points[-1]):
            return False
        self.store.put(self.key(point), state(), reports, {**source, "stage": stage, "epoch": epoch})
        return True

    def _heartbeat(self) -> None:
        """Renew the lease while the thread that made the claim runs; a dead trial stops renewing."""
        trainer = threading.current_thread()

        def beat() -> None:
            while trainer.is_alive() and not self._stop.wait(self.store.lease_s / 4):
                self.store.renew(self.owner)

        self._beat = threading.Thread(target=beat, name="iterhead-prefix-lease", daemon=True)
        self._beat.start()

    def close(self) -> None:
        """Give up the claim (the trial ended, or stopped early: what it did not write, it never will)."""
        self._stop.set()
        self.store.release(self.owner)
