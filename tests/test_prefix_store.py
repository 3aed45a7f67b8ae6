"""The prefix store's files survive killed writers and claimants, and are never trusted blindly.

Real files under `tmp_path` and real subprocesses killed with SIGKILL; no mocks. Leases are
short (`LEASE` seconds) so that waiting on a claim, and a dead claim lapsing, take seconds.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from iterhead.trainable.prefix import Point, entry_key, points
from iterhead.trainable.prefix_store import FORMAT, POLL_S, Claim, PrefixStore, Sharing

from support import damage_a_record, tiny

ENV = "test-environment"
LEASE = 2.0


def tiny_points() -> list[Point]:
    """tiny()'s evaluation points: (0,1), (0,2), (1,1), (1,2), (1,3)."""
    return points(tiny())


def start_within(sharing: Sharing, timeout: float) -> tuple[Point | None, dict[str, Any] | None, float]:
    """`sharing.start()` and its duration, failing (not hanging) if it has not returned after `timeout` s."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = sharing.start()
        except BaseException as e:  # noqa: BLE001 - handed to the test below
            out["error"] = e

    began = time.monotonic()
    thread = threading.Thread(target=run, name="test-start", daemon=True)  # daemon: a hang cannot block exit
    thread.start()
    thread.join(timeout)
    took = time.monotonic() - began
    assert not thread.is_alive(), f"Sharing.start still waiting after {timeout} s"
    if "error" in out:
        raise out["error"]
    point, entry = out["result"]
    return point, entry, took


def test_an_entry_comes_back_as_it_was_put_and_the_first_put_wins(tmp_path: Path) -> None:
    store = PrefixStore(tmp_path)
    state = {"seeds": [{"model": {"w": torch.randn(4, 3), "b": torch.arange(3)}, "step": 12}],
             "rng": torch.tensor([1, 2, 3], dtype=torch.uint8)}
    reports = [{"epoch": 1, "accuracy": 0.5, "stage": "pretrain"}, {"epoch": 2, "accuracy": 0.75, "stage": "pretrain"}]
    assert not store.has("k") and store.get("k") is None
    store.put("k", state, reports, {"trial": "a"})
    assert store.has("k")
    entry = store.get("k")
    assert entry is not None
    assert (entry["format"], entry["key"], entry["reports"], entry["source"]) == (FORMAT, "k", reports, {"trial": "a"})
    got = entry["state"]
    assert torch.equal(got["seeds"][0]["model"]["w"], state["seeds"][0]["model"]["w"])
    assert torch.equal(got["seeds"][0]["model"]["b"], state["seeds"][0]["model"]["b"])
    assert got["seeds"][0]["step"] == 12 and torch.equal(got["rng"], state["rng"])

    store.put("k", {"seeds": []}, [], {"trial": "b"})  # the same key is the same state: the first is kept
    assert store.get("k")["source"] == {"trial": "a"}
    assert [p.name for p in store.entries.iterdir()] == ["k.pt"]  # and nothing else was left behind


def test_a_writer_killed_mid_write_leaves_no_readable_entry(tmp_path: Path) -> None:
    """A process puts a 32 MB entry under new keys in a loop and is SIGKILLed while writing one."""
    n = 8_000_000
    script = textwrap.dedent(f"""
        import sys
        import torch
        from iterhead.trainable.prefix_store import PrefixStore
        store = PrefixStore(sys.argv[1])
        w = torch.arange({n}, dtype=torch.float32)
        i = 0
        while True:
            store.put(f"k{{i}}", {{"w": w}}, [{{"i": i}}], {{"writer": "doomed"}})
            i += 1
    """)
    store = PrefixStore(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:  # one complete entry, and the next one's temporary file being written
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "the writer never started a second entry"
            done = list(store.entries.glob("*.pt"))
            tmps = [p for p in store.entries.glob(".*.tmp") if p.exists() and p.stat().st_size > 0]
            if done and tmps:
                break
            time.sleep(0.001)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -9

    torn = list(store.entries.glob(".*.tmp"))
    assert len(torn) == 1, torn  # killed inside write_atomic (its window is all but the whole loop)
    key = torn[0].name[1:].split(".pt.")[0]
    expected = torch.arange(n, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete entry loads without a word
        for path in store.entries.glob("*.pt"):
            entry = store.get(path.stem)
            assert entry is not None and entry["key"] == path.stem
            assert entry["reports"] == [{"i": int(path.stem[1:])}] and torch.equal(entry["state"]["w"], expected)
        assert not store.has(key) and store.get(key) is None  # the torn file is no entry

    store.put(key, {"w": torch.ones(2)}, [], {"writer": "again"})
    again = store.get(key)
    assert again is not None and again["source"] == {"writer": "again"}


def test_corrupt_and_foreign_entries_are_ignored_loudly(tmp_path: Path) -> None:
    store = PrefixStore(tmp_path)
    store.put("torn", {"w": torch.randn(1000)}, [], {})
    data = store.path("torn").read_bytes()
    store.path("torn").write_bytes(data[: len(data) // 2])
    torch.save({"format": "someone-else-1", "key": "other-format", "state": {}, "reports": []},
               store.path("other-format"))
    torch.save({"format": FORMAT, "key": "elsewhere", "state": {}, "reports": []}, store.path("other-key"))
    torch.save([1, 2, 3], store.path("not-a-dict"))
    for key in ("torn", "other-format", "other-key", "not-a-dict"):
        assert store.has(key)
        with pytest.warns(UserWarning, match=re.escape(str(store.path(key)))):
            assert store.get(key) is None
        assert not store.has(key)  # set aside, so the next trial to get there writes a good one
    store.put("torn", {"w": torch.ones(2)}, [], {})
    assert torch.equal(store.get("torn")["state"]["w"], torch.ones(2))


def test_an_entry_whose_bytes_changed_is_set_aside_like_an_unreadable_one(tmp_path: Path) -> None:
    """torch.load reads a record whose CRC32 fails as other numbers: a trial would have trained on."""
    store = PrefixStore(tmp_path)
    store.put("k", {"w": torch.randn(1000)}, [], {})
    record = damage_a_record(store.path("k"))
    with pytest.warns(UserWarning, match=f"unreadable \\(Corrupt: .*record {record} fails its CRC32"):
        assert store.get("k") is None
    assert not store.has("k") and len(list(store.entries.glob("k.pt.bad-*"))) == 1
    store.put("k", {"w": torch.ones(2)}, [], {})  # the next trial to get there writes a good one
    assert torch.equal(store.get("k")["state"]["w"], torch.ones(2))


def test_start_falls_back_past_a_corrupt_entry_to_the_next_one_down(tmp_path: Path) -> None:
    store = PrefixStore(tmp_path)
    pts = tiny_points()
    shallow, deep = pts[0], pts[2]  # (0, 1) and (1, 1)
    store.put(entry_key(ENV, shallow), {"w": torch.zeros(3)}, [{"epoch": 1}], {"at": "shallow"})
    store.put(entry_key(ENV, deep), {"w": torch.ones(3)}, [{"epoch": 3}], {"at": "deep"})
    store.path(entry_key(ENV, deep)).write_bytes(b"PK\x03\x04 truncated")
    sharing = Sharing(store, ENV, pts, {p.key for p in pts}, "trial")
    try:
        with pytest.warns(UserWarning, match=re.escape(str(store.path(entry_key(ENV, deep))))):
            point, entry = sharing.start()
    finally:
        sharing.close()
    assert point == shallow
    assert entry is not None and entry["source"] == {"at": "shallow"}
    assert torch.equal(entry["state"]["w"], torch.zeros(3))


def test_live_claims_are_the_fresh_unreleased_ones(tmp_path: Path) -> None:
    store = PrefixStore(tmp_path, lease_s=LEASE)
    store.claim("fresh", {"a", "b"}, created_ns=5)
    store.claim("lapsed", {"c"})
    old = time.time() - LEASE - 1
    os.utime(store.claims / "lapsed.json", (old, old))  # its owner stopped renewing a lease ago
    store.claim("released", {"d"})
    store.release("released")
    assert store.live_claims() == [Claim("fresh", 5, frozenset({"a", "b"}))]

    store.renew("lapsed")  # a renewal (the heartbeat) is what keeps a claim live
    store.renew("released")  # and it does not bring back a released one
    assert {c.owner for c in store.live_claims()} == {"fresh", "lapsed"}


def test_a_trial_waits_for_what_an_older_live_claim_promises(tmp_path: Path) -> None:
    store = PrefixStore(tmp_path, lease_s=LEASE)
    pts = tiny_points()
    deep = pts[2]
    key = entry_key(ENV, deep)
    store.claim("older", {key}, created_ns=time.time_ns() - 10**9)

    def older_trial() -> None:  # trains for a second, renewing its lease, then writes what it promised
        until = time.monotonic() + 1.0
        while time.monotonic() < until:
            store.renew("older")
            time.sleep(0.1)
        store.put(key, {"w": torch.ones(3)}, [{"epoch": 3}], {"owner": "older"})

    writer = threading.Thread(target=older_trial)
    writer.start()
    sharing = Sharing(store, ENV, pts, {p.key for p in pts}, "younger")
    try:
        point, entry, took = start_within(sharing, timeout=LEASE + 5)
        promised = sharing.claim.promises if sharing.claim else None
    finally:
        sharing.close()
        writer.join()
    assert took >= 0.9  # it waited rather than train the shared prefix again
    assert point == deep and entry is not None and entry["source"] == {"owner": "older"}
    assert promised == {entry_key(ENV, p) for p in pts if p.depth > deep.depth}  # only what lies past the fork


def test_a_younger_claim_is_not_waited_for(tmp_path: Path) -> None:
    store = PrefixStore(tmp_path, lease_s=LEASE)
    pts = tiny_points()
    store.claim("younger", {entry_key(ENV, pts[2])}, created_ns=time.time_ns() + 10**12)
    sharing = Sharing(store, ENV, pts, {p.key for p in pts}, "older")
    try:
        point, entry, took = start_within(sharing, timeout=LEASE + 5)
    finally:
        sharing.close()
    assert (point, entry) == (None, None) and took < POLL_S  # no poll: it went straight to training


def test_a_claimant_killed_while_holding_its_claim_is_waited_for_one_lease_at_most(tmp_path: Path) -> None:
    """A subprocess claims a prefix the test needs and keeps its lease (Sharing's heartbeat), then is SIGKILLed."""
    store = PrefixStore(tmp_path, lease_s=LEASE)
    pts = tiny_points()
    script = textwrap.dedent(f"""
        import time
        from iterhead.trainable.prefix import Point
        from iterhead.trainable.prefix_store import PrefixStore, Sharing
        store = PrefixStore({str(tmp_path)!r}, lease_s={LEASE!r})
        pts = [Point(*t) for t in {[dataclasses.astuple(p) for p in pts]!r}]
        sharing = Sharing(store, {ENV!r}, pts, {{pts[2].key}}, "doomed")
        print(sharing.start(), flush=True)
        time.sleep(600)
    """)
    claim = store.claims / "doomed.json"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip() == "(None, None)", proc.stderr.read() if proc.stderr else ""
        first = claim.stat().st_mtime_ns
        deadline = time.monotonic() + LEASE
        while claim.stat().st_mtime_ns == first:  # the heartbeat renews it
            assert time.monotonic() < deadline, "the claimant never renewed its lease"
            time.sleep(0.05)
        assert [c.promises for c in store.live_claims()] == [{entry_key(ENV, pts[2])}]
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -9

    sharing = Sharing(store, ENV, pts, {p.key for p in pts}, "survivor")
    try:
        point, entry, took = start_within(sharing, timeout=LEASE + 5)
    finally:
        sharing.close()
    assert (point, entry) == (None, None)  # nothing stored: train from the start
    assert LEASE / 2 <= took <= LEASE + POLL_S + 1.0  # waited on the claim while it looked live, no longer
