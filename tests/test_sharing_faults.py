"""Trials finish with the unshared results when the prefix store holds what faults leave behind.

A real local Ray runs the real trainable (`trainable.tune.train_trial`) through a Tune grid,
once with a prefix store that faults have already visited and once without sharing:

- a torn entry at the point where the shorter pretraining ends (what a non-atomic copy or a
  full disk leaves), and a writer's half-written temporary file beside it (what a writer
  SIGKILLed mid-write leaves);
- the claim of a trial SIGKILLed while it held it, older than every trial here, promising
  the longer pretraining's end, which its dead owner will never write.

The search must finish (a trial that trusted the dead claim would wait forever), every
trial's results must equal the unshared ones, the torn entry must be set aside and written
again, and a trial that forks must fork from a good entry.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from ray import tune

from iterhead.curricula.trial import trial_curriculum
from iterhead.trainable import results as r
from iterhead.trainable.devices import resolve_precision
from iterhead.trainable.prefix import entry_key, environment, points
from iterhead.trainable.prefix_store import PrefixStore
from iterhead.trainable.tune import train_trial

from support import tiny

pytestmark = pytest.mark.integration

LEASE = 3.0  # seconds: short, so that the dead claim lapses quickly
PENALTY = 1.0e12
BASE = tiny(stages=[{"name": "pretrain", "mix": {"polynomial": 1.0}, "epochs": 2},
                    {"name": "finetune", "mix": {"parity": 1.0}, "epochs": 2}]).model_dump(mode="json")
GRID = [2, 4]


def key_at(pretrain: int) -> str:
    """The store key of the state at the end of a `pretrain`-epoch pretraining, as a trial here keys it."""
    cur = trial_curriculum(BASE, {"stages.pretrain.epochs": pretrain}, False)
    cpu = torch.device("cpu")
    env = environment([cur.seed], cpu, resolve_precision("auto", cpu, cur.model.d_model), "lockstep", 1, None, PENALTY)
    return entry_key(env, next(p for p in points(cur) if (p.stage, p.epoch) == (0, pretrain)))


def plan() -> list[str]:
    return [next(p.key for p in points(trial_curriculum(BASE, {"stages.pretrain.epochs": e}, False))
                 if (p.stage, p.epoch) == (0, e)) for e in GRID]


def run_grid(storage: Path, share: dict | None) -> dict[int, tuple[dict, float]]:
    """Each trial's last result and the seconds since the grid began, by pretraining epochs."""
    trainable = tune.with_parameters(train_trial, base=BASE, penalty=PENALTY, share=share)
    tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": 1}),
                       param_space={"stages.pretrain.epochs": tune.grid_search(GRID)},
                       # a trial that trusted the dead claim would wait forever: stop it, and fail below
                       tune_config=tune.TuneConfig(max_concurrent_trials=2, time_budget_s=120),
                       run_config=tune.RunConfig(storage_path=str(storage), verbose=0))
    start = time.monotonic()
    grid = tuner.fit()
    assert not grid.errors, grid.errors
    return {res.config["stages.pretrain.epochs"]: (res.metrics, time.monotonic() - start) for res in grid}


def dead_claimant(store: Path, key: str) -> None:
    """A process that claims `key` as the oldest trial of all, renews its lease, and is SIGKILLed."""
    code = textwrap.dedent(f"""
        import time
        from iterhead.trainable.prefix_store import PrefixStore
        store = PrefixStore({str(store)!r}, lease_s={LEASE})
        store.claim("dead-trial", {{{key!r}}}, created_ns=1)
        print("claimed", flush=True)
        while True:
            store.renew("dead-trial")
            time.sleep(0.2)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "claimed"
    proc.kill()
    proc.wait(timeout=10)


def same(a: dict, b: dict) -> bool:
    own = {r.NODE_ID, r.PREFIX_SOURCE, r.FLOPS_FORKED}
    keep = [k for k in a if "seconds" not in k and k not in own and (k in r.SUMMARY or k.startswith(r.PREFIXES))]
    return all(a[k] == b[k] for k in keep) and bool(keep)


def test_a_search_finishes_with_unshared_results_past_torn_entries_and_dead_claims(ray_local, tmp_path):
    folder = tmp_path / "prefixes"
    store = PrefixStore(folder, LEASE)
    torn, longer = key_at(GRID[0]), key_at(GRID[1])
    store.path(torn).write_bytes(b"PK\x03\x04 cut short")
    (store.entries / f".{torn}.pt.x1y2z3.tmp").write_bytes(b"PK\x03\x04 a writer died here")
    dead_claimant(folder, longer)
    assert [c.owner for c in store.live_claims()] == ["dead-trial"]  # its lease has not lapsed yet

    shared = run_grid(tmp_path / "shared", {"folder": str(folder), "planned": plan(), "lease_s": LEASE})
    plain = run_grid(tmp_path / "plain", None)
    for epochs in GRID:
        assert same(shared[epochs][0], plain[epochs][0]), epochs
    assert list(store.entries.glob(f"{torn}.pt.bad-*"))  # the torn entry, set aside ...
    assert store.get(torn) is not None  # ... and written again by the trial that trained that prefix
    forks = [shared[e][0][r.PREFIX_SOURCE] for e in GRID if r.PREFIX_SOURCE in shared[e][0]]
    assert all(f.endswith("stage pretrain epoch 2") for f in forks), forks  # never from the torn or dead ones
    assert not store.live_claims()  # the dead claim lapsed; the trials released theirs
