"""What the embedded Ray exposes, measured: listening sockets, and token authentication.

Ray 2.60's processes bind all interfaces whatever `ray.init` is told (its gRPC servers are
built for multi-node clusters); the README's security section says so and what to do. This
test keeps that section honest: if Ray ever binds loopback only, it fails until the README
is updated. YAML safety and weights-only checkpoints are tested with the validator and the
checkpoint tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from iterhead.search.run import SearchOptions, start_ray

from support import ROOT

pytestmark = pytest.mark.integration
LOOPBACK = {"0100007F", "00000000000000000000000001000000"}
WILDCARD = {"00000000", "00000000000000000000000000000000"}


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack += children.get(pid, [])
    return out


def listening_addresses(pids: list[int]) -> set[str]:
    """Local addresses (hex, as /proc/net shows them) of TCP sockets these processes listen on."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                found.add(fields[1].split(":")[0])
    return found


@pytest.fixture(scope="module")
def embedded_ray(tmp_path_factory):
    import ray

    assert start_ray(SearchOptions(uri="sqlite:///unused.db", num_cpus=1))
    yield ray
    ray.shutdown()


def test_listening_sockets_are_what_the_readme_says(embedded_ray):
    addresses = listening_addresses(descendants(os.getpid()))
    assert addresses, "Ray's processes were not found"
    node_ip = embedded_ray.util.get_node_ip_address()
    node_hex = {"".join(f"{int(b):02X}" for b in reversed(node_ip.split(".")))} if "." in node_ip else set()
    assert addresses <= LOOPBACK | WILDCARD | node_hex, addresses  # nothing else is bound
    readme = (ROOT / "README.md").read_text()
    assert ("listen on all network interfaces" in readme) == bool(addresses & WILDCARD)


def test_clients_without_the_token_are_refused(embedded_ray, tmp_path):
    gcs = embedded_ray.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HOME": str(tmp_path)}  # no token file either
    probe = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{gcs}'); print('CONNECTED')"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert "CONNECTED" not in probe.stdout and probe.returncode != 0
    assert "InvalidAuthToken" in probe.stderr  # refused for the missing token, not something else
