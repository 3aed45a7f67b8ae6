"""A Ray address or a tracking URI that cannot work is bad input: exit 2 with one line naming
where it came from, in seconds, before a folder, a store or a Ray is made (`search.endpoints`).
Ray's and MLflow's clients would retry for minutes and end in tracebacks."""

from __future__ import annotations

import importlib.util
import os

import pytest
import yaml

from iterhead.search import run
from iterhead.search.cli import main
from iterhead.search.endpoints import ray_address

from support import PARITY_BASE, free_port, no_ray


@pytest.fixture
def spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(run, "start_ray", no_ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(PARITY_BASE))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({"name": "s", "base": "base.yaml"}))
    return tmp_path / "spec.yaml"


def refused() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there now


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("address, words", [
    ("foo", "is not HOST:PORT"), ("127.0.0.1", "is not HOST:PORT"), ("127.0.0.1:99999", "is not HOST:PORT"),
    ("ray://127.0.0.1:10001", "Ray Client (ray://)"), ("http://127.0.0.1:8265", "Ray Client (ray://)"),
    (None, "nothing answers at 127.0.0.1:"), ("127.0.0.1:\u00b2", "is not HOST:PORT"),  # int() fails on a superscript
    ("a..b:6379", "'a..b' is not a host name"), ("a\udcffb:6379", "is not a host name"),  # the idna codec fails
])
def test_a_ray_address_that_cannot_work_exits_2_before_anything_is_made(spec, capsys, address, words):
    uri = f"sqlite:///{spec.parent}/mlflow.db"
    assert main(["search", str(spec), "--tracking-uri", uri, "--address", address or refused()]) == 2
    err = one_error(capsys)
    assert err.startswith("error: --address: ") and words in err, err
    assert sorted(p.name for p in spec.parent.iterdir()) == ["base.yaml", "spec.yaml"]  # no store, no folder


def test_an_address_from_the_environment_is_named_as_such(spec, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", refused())
    assert main(["search", str(spec), "--tracking-uri", f"sqlite:///{spec.parent}/mlflow.db"]) == 2
    assert one_error(capsys).startswith("error: RAY_ADDRESS: nothing answers at ")


def test_local_is_the_embedded_ray_and_auto_is_only_a_recorded_cluster(monkeypatch, tmp_path, ray_local):
    """`ray.init(address="auto")` falls back to any Ray process running here, such as another
    driver's embedded Ray, which ends with that driver; iterhead's auto is what `ray start` recorded."""
    from ray._private.utils import get_ray_address_file

    from iterhead.curricula.errors import ConfigError

    assert ray_address("local", "--address") is None and ray_address(None, "RAY_ADDRESS") is None
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    recorded = get_ray_address_file(None)
    assert recorded.startswith(str(tmp_path)) and not os.path.exists(recorded)
    with pytest.raises(ConfigError, match="no cluster started with `ray start` is recorded") as err:
        ray_address("auto", "--address")
    assert f"(in {recorded};" in str(err.value)  # where it looked: `ray start --temp-dir` records elsewhere
    head = ray_local.get_runtime_context().gcs_address  # this module's local Ray, as `ray start` records one
    os.makedirs(os.path.dirname(recorded), exist_ok=True)
    with open(recorded, "w") as f:
        f.write(head)
    assert ray_address("auto", "--address") == head


@pytest.mark.parametrize("command", ["train", "search", "export", "report", "reconcile"])
def test_a_tracking_server_nothing_answers_at_exits_2_at_once(spec, capsys, command):
    uri = f"http://{refused()}"
    args = {"train": [str(spec.parent / "base.yaml")], "search": [str(spec)], "export": ["--experiment", "s", "-o", str(spec.parent / "best.yaml")],
            "report": ["--experiment", "s"], "reconcile": []}[command]
    assert main([command, *args, "--tracking-uri", uri]) == 2
    err = one_error(capsys)
    assert err.startswith(f"error: --tracking-uri: no tracking server answers at {uri} "), err


@pytest.mark.parametrize("uri, words", [
    ("http://", "names no host"), ("http://127.0.0.1:99999", "is not a URL"), ("http://[::1", "is not a URL"),
    ("postgresql+nosuchdriver://u@127.0.0.1/db", "is not a database URL"),
])
def test_a_tracking_uri_that_cannot_work_is_named_from_where_it_came(spec, capsys, monkeypatch, uri, words):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["search", str(spec)]) == 2
    err = one_error(capsys)
    assert err.startswith("error: MLFLOW_TRACKING_URI: ") and words in err, err


@pytest.mark.skipif(importlib.util.find_spec("MySQLdb") is not None, reason="needs a machine without MySQLdb")
def test_a_database_store_without_its_driver_exits_2_before_ray(spec, capsys):
    assert main(["search", str(spec), "--tracking-uri", "mysql://u@127.0.0.1/db"]) == 2
    assert "needs the Python package 'MySQLdb'" in one_error(capsys)



def test_a_server_that_accepts_a_connection_passes_whatever_it_answers(monkeypatch):
    """Only the connection is checked: a login in the URI, a client certificate, a path prefix or a
    slow answer are MLflow's to handle (this server accepts and never answers)."""
    import socket

    from iterhead.search.endpoints import check_store

    for proxy in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        for uri in (f"http://127.0.0.1:{port}", f"http://user:secret@127.0.0.1:{port}/mlflow",
                    f"https://127.0.0.1:{port}"):
            check_store(uri, "--tracking-uri")  # no ConfigError


def test_a_password_in_the_uri_is_not_printed(spec, capsys, monkeypatch):
    for proxy in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    assert main(["search", str(spec), "--tracking-uri", f"http://user:secret@{refused()}"]) == 2
    err = one_error(capsys)
    assert "no tracking server answers at http://user:***@127.0.0.1:" in err and "secret" not in err, err


@pytest.mark.parametrize("command", ["train", "search", "export", "report", "reconcile"])
@pytest.mark.parametrize("given", ["flag", "env"])
def test_a_malformed_url_exits_2_and_its_password_is_not_printed(spec, capsys, monkeypatch, command, given):
    """`urlsplit` raises on an unclosed IPv6 bracket; the error naming the URI must not raise again."""
    uri = "http://user:secret@[::1"
    args = {"train": [str(spec.parent / "base.yaml")], "search": [str(spec)],
            "export": ["--experiment", "s", "-o", str(spec.parent / "best.yaml")],
            "report": ["--experiment", "s"], "reconcile": []}[command]
    if given == "env":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main([command, *args, *(["--tracking-uri", uri] if given == "flag" else [])]) == 2
    err = one_error(capsys)
    field = "--tracking-uri" if given == "flag" else "MLFLOW_TRACKING_URI"
    assert err.startswith(f"error: {field}: 'http://user:***@[::1' is not a URL"), err
    assert "secret" not in err


@pytest.mark.parametrize("speaks", ["http", "nothing"])
def test_an_address_where_something_else_answers_exits_2_and_a_ray_head_passes(spec, capsys, monkeypatch,
                                                                               ray_local, speaks):
    """A web server (a dashboard's port, say) or a port that accepts and stays silent speaks no
    gRPC: `ray.init` retried there for minutes. A real head's GCS (this module's local Ray)
    answers the HTTP/2 preface."""
    import http.server
    import socket
    import threading

    import ray

    from iterhead.search import endpoints

    monkeypatch.setattr(endpoints, "ANSWER_S", 0.5)  # the silent port's wait
    if speaks == "http":
        quiet = type("Quiet", (http.server.BaseHTTPRequestHandler,), {"log_message": lambda *a: None})
        web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), quiet)
        threading.Thread(target=web.serve_forever, daemon=True).start()
        port, close = web.server_address[1], lambda: (web.shutdown(), web.server_close())
    else:
        silent = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; no one reads or writes
        port, close = silent.getsockname()[1], silent.close
    try:
        address = f"127.0.0.1:{port}"
        assert main(["search", str(spec), "--tracking-uri", f"sqlite:///{spec.parent}/mlflow.db",
                     "--address", address]) == 2
        err = one_error(capsys)
        assert err.startswith(f"error: --address: something answers at {address}, but not as a Ray"), err
        assert sorted(p.name for p in spec.parent.iterdir()) == ["base.yaml", "spec.yaml"]
    finally:
        close()
    gcs = ray.get_runtime_context().gcs_address
    assert ray_address(gcs, "--address") == gcs


def test_a_grpc_server_that_is_no_gcs_exits_2_at_once(spec, capsys, ray_local):
    """A Ray Client server (port 10001, given without ray://) or a raylet's port speaks gRPC without the
    GCS's methods: `ray.init` asked it for the cluster id 20 times, a second and a log line each, then
    failed, after the store and the folder were made. This module's raylet stands in for a Ray Client
    server: both answer the GCS's first call with UNIMPLEMENTED (seen with Ray 2.60)."""
    import time

    node = next(n for n in ray_local.nodes() if n["Alive"])
    address = f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}"
    start = time.monotonic()
    uri = f"sqlite:///{spec.parent}/mlflow.db"
    assert main(["search", str(spec), "--tracking-uri", uri, "--address", address]) == 2
    err = one_error(capsys)
    assert err.startswith(f"error: --address: a gRPC server answers at {address}, but not a Ray cluster head's "), err
    assert "GCS port (6379 by default)" in err and time.monotonic() - start < 5
    assert sorted(p.name for p in spec.parent.iterdir()) == ["base.yaml", "spec.yaml"]


def _hpack_integer(data: bytes) -> int:
    """RFC 7541 5.1's integer with a 7-bit prefix, read back: the reader of what `_length` writes."""
    value = data[0] & 127
    if value < 127:
        return value
    shift = 0
    for byte in data[1:]:
        value += (byte & 127) << shift
        shift += 7
        if not byte & 128:
            break
    return value


@pytest.mark.parametrize("n", [0, 126, 127, 128, 254, 255, 300, 5000, 2**20])
def test_a_header_length_reads_back_as_hpack_reads_it(n):
    """A host name can pass 126 bytes, past one byte of HPACK length; `bytes([n])` also raised past 255."""
    from iterhead.search.endpoints import _length

    assert _hpack_integer(_length(n)) == n


def test_a_status_that_ends_in_a_continuation_frame_is_read_there():
    """HTTP/2 lets a header block go on in CONTINUATION frames: the verdict waits for END_HEADERS,
    so a grpc-status 12 carried there is still UNIMPLEMENTED (and a plain block is still a head)."""
    import socket
    import threading

    from iterhead.search import endpoints as e

    def answer(server: socket.socket, status: bytes) -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)  # the preface and the call
            conn.sendall(e._frame(e.SETTINGS, 0, 0) + e._frame(e.HEADERS, e.END_STREAM, 1, b"\x88")  # :status 200
                         + e._frame(e.CONTINUATION, e.END_HEADERS, 1, status))
            conn.recv(65536)  # the SETTINGS ack, until the probe closes

    for status, verdict in ((e.UNIMPLEMENTED, "other"), (b"\x0bgrpc-status\x010", "gcs")):
        with socket.create_server(("127.0.0.1", 0)) as server:
            threading.Thread(target=answer, args=(server, status), daemon=True).start()
            assert e._grpc_answer("127.0.0.1", server.getsockname()[1]) == verdict
