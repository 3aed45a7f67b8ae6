"""Helpers the tests import: tiny curricula that train in a second or two on a CPU."""

from __future__ import annotations

import http.server
import io
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.request
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from iterhead.curricula.io import parse_curriculum
from iterhead.curricula.schema import Curriculum

ROOT = Path(__file__).resolve().parents[1]


def tiny(**overrides: Any) -> Curriculum:
    """A two-task, two-stage curriculum small enough for unit tests; override any top field."""
    data: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.1},
        "data": {"min_len": 1, "max_len": 4, "train_per_len": 64, "test_per_len": 32, "cot": True},
        "tasks": {"parity": {"kind": "parity"}, "polynomial": {"kind": "polynomial", "modulus": 11}},
        "optim": {"lr": 1.0e-3, "batch_size": 32},
        "stages": [
            {"name": "pretrain", "mix": {"polynomial": 1.0}, "epochs": 2},
            {"name": "finetune", "mix": {"parity": 0.7, "polynomial": 0.3}, "epochs": 3},
        ],
        "target": {"task": "parity", "accuracy": 1.0},
        "eval": {"every_epochs": 1, "probe_per_len": 4},
    }
    data.update(overrides)
    return parse_curriculum(data, file="<tiny>")


PARITY_BASE: dict[str, Any] = {
    "name": "b", "seed": 0,
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 1, "dropout": 0.0},
    "data": {"min_len": 1, "max_len": 4, "train_per_len": 128, "test_per_len": 64, "cot": True},
    "tasks": {"parity": {"kind": "parity"}},
    "optim": {"lr": 1.0e-3, "batch_size": 32},
    "stages": [{"name": "train", "mix": {"parity": 1.0}, "epochs": 20}],
    "target": {"task": "parity", "accuracy": 1.0},
    "eval": {"every_epochs": 1, "probe_per_len": 2},
}
"""A one-task base curriculum whose trials take a few seconds (search tests vary its epochs)."""


def alive(pgid: int) -> list[int]:
    """Processes of a process group that are not zombies (the Ray processes a driver or
    `ray start` started are in its group)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[2]) == pgid and stat[0] != "Z":
                pids.append(int(entry.name))
    return pids


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(data: Path, port: int) -> Iterator[tuple[str, subprocess.Popen]]:
    """`start.sh` on `port` with its store in `data`, once it answers /health; stopped at the end."""
    proc = subprocess.Popen([str(ROOT / "mlflow_server" / "start.sh"), "--port", str(port), "--data", str(data)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.read().strip() == b"OK":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {proc.stdout.read().decode()[-2000:]}")
            time.sleep(0.5)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # only the process group this test started
        proc.wait(timeout=30)


@contextmanager
def web_server(status: int, body: bytes | None) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 that answers every GET and POST with `status` and the page
    `body` (None: no handler, so http.server's own 501 page), as a web server that is no MLflow
    does; yields its URL."""

    class Answers(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # not on the command's stderr
            pass

        def answer(self) -> None:
            assert body is not None
            self.send_response(status)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        if body is not None:
            do_GET = do_POST = answer

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def no_ray(opts: Any) -> None:
    """Stands in for `search.run.start_ray` where a test checks that bad input stops a search
    before Ray starts: a tripwire, not a stand-in for Ray."""
    raise AssertionError("Ray was started")


def damage_a_record(path: Path) -> str:
    """Flip bytes in the middle of the largest tensor record of a file torch.save wrote, leaving its
    stored CRC32 as it was (what a bad disk or a botched copy does); returns the record's name.
    torch.load reads such a file without complaint, as other weights."""
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    header = record.header_offset  # the local header: 30 bytes, then the name and the extra field
    name, extra = struct.unpack("<HH", raw[header + 26:header + 30])
    middle = header + 30 + name + extra + record.file_size // 2
    for i in range(middle, middle + 8):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    return record.filename


def run_until(argv: list[str], cwd: Path, env: dict[str, str], begun: str,
              then: Callable[[subprocess.Popen], None]) -> subprocess.CompletedProcess:
    """`argv` run in `cwd`; once its stdout shows `begun`, `then(it)` (a stop, a store that fails); its
    outcome, with the whole of its stdout. A watchdog kills it after 300 s: reading its stdout has no
    timeout of its own."""
    command = subprocess.Popen(argv, cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    watchdog = threading.Timer(300, command.kill)
    watchdog.start()
    try:
        seen = []
        for line in command.stdout or []:
            seen.append(line)
            if begun in line:
                break
        assert seen and begun in seen[-1], "".join(seen) + (command.stderr.read() if command.stderr else "")
        then(command)
        out, err = command.communicate(timeout=120)
    finally:
        watchdog.cancel()
        if command.poll() is None:
            command.kill()
            command.wait()
    return subprocess.CompletedProcess(argv, command.returncode, "".join(seen) + out, err)


class CtrlCAt(io.StringIO):
    """The terminal's output, which presses Ctrl-C (SIGINT to this process) when `at` is printed."""

    def __init__(self, at: str) -> None:
        super().__init__()
        self.at, self.pressed = at, False

    def write(self, text: str) -> int:
        if self.at in text and not self.pressed:
            self.pressed = True
            os.kill(os.getpid(), signal.SIGINT)
        return super().write(text)


def ctrl_c_as_at_a_terminal() -> None:
    """Let the commands a test starts from here hear Ctrl-C (SIGINT), as at a terminal. A test run
    that a non-interactive shell started in the background (a CI job) has Ctrl-C ignored, which a
    child keeps across exec, and a command rightly keeps it so (`nohup cmd &`). The autouse
    fixture in conftest.py puts the handler back after the test."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
