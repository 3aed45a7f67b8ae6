"""A tracking server that fails mid-run, seen through a real HTTP proxy in front of a real `mlflow server`.

`RunWriter` gives up on a store only when it did not answer (`tracking.unreachable`): the writes queued
behind such a failure would each wait out MLflow's retries again. A server that answers with errors
(500s, 429s) may take the next write, and a missed heartbeat must never stop the run it watches. And a
page that is no MLflow reply means "this URI is no MLflow server" (exit 2) only as the store's first
answer: mid-run it is a failure while running (exit 1). The proxy only switches what stands in the path;
every answer that succeeds comes from the real server. Last, a command stopped while its store fails.
"""

from __future__ import annotations

import http.client
import http.server
import io
import json
import os
import sys
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import replace
from typing import Any, Callable, Iterator, Literal

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from iterhead.search.tracking import HEARTBEAT_TAG, Heartbeat, RunWriter, begin_command
from iterhead.trainable.results import KIND, REACHED

from support import run_until, tiny

pytestmark = pytest.mark.integration

Mode = Literal["forward", "500", "429", "drop", "html"]
LOGIN_PAGE = b"<!DOCTYPE html><html><title>Sign in</title><form method=post><input name=user></form></html>"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
              "host", "content-length"}  # the proxy's own connection's, set anew on each side
RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
           "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}  # read by MLflow at each call; no waits between tries
ATTEMPTS = 3  # requests one failing write sends: the first and MLflow's 2 retries (urllib3's Retry(total=2))
WAIT_S = 60  # bound on waits for a background thread: each step takes well under a second here


class StoreProxy:
    """A threaded HTTP proxy on 127.0.0.1 that forwards every request to `upstream`, or fails it as the
    test's `mode` says: ``500``/``429`` (a server that answers errors), ``drop`` (a connection closed
    without an answer: requests' ConnectionError), ``html`` (a login page, status 200). `counts` holds
    the requests received in each mode, so a test can tell whether a write was sent at all."""

    def __init__(self, upstream: str) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self.host, self.port, self.netloc = parts.hostname or "", parts.port, parts.netloc
        self.mode: Mode = "forward"
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):  # HTTP/1.0: one request a connection
            def log_message(self, *args: Any) -> None:
                pass

            def handle_request(self) -> None:
                proxy.handle(self)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_request  # what MLflow's client sends

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # a port free now, no race
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> StoreProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def handle(self, req: http.server.BaseHTTPRequestHandler) -> None:
        """Count the request under the mode it met, then answer as that mode says."""
        body = read_body(req)  # the whole request, whatever the mode: a drop closes after it, as a crash does
        with self._lock:
            mode = self.mode
            self.counts[mode] += 1
        if mode == "drop":
            req.close_connection = True
        elif mode == "html":
            answer(req, 200, "OK", [("Content-Type", "text/html; charset=utf-8")], LOGIN_PAGE)
        elif mode in ("500", "429"):
            answer(req, int(mode), "Error", [("Content-Type", "text/plain")], b"try again later")
        else:
            self.forward(req, body)

    def forward(self, req: http.server.BaseHTTPRequestHandler, body: bytes) -> None:
        """`req` as it came (method, path and query, headers, body), its answer as the server gave it."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=WAIT_S)
        try:
            conn.putrequest(req.command, req.path, skip_host=True, skip_accept_encoding=True)
            conn.putheader("Host", self.netloc)
            for name, value in req.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    conn.putheader(name, value)
            if body or req.command in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            got = conn.getresponse()
            answer(req, got.status, got.reason, [(k, v) for k, v in got.getheaders()
                                                 if k.lower() not in HOP_BY_HOP | {"date", "server"}], got.read())
        finally:
            conn.close()


def read_body(req: http.server.BaseHTTPRequestHandler) -> bytes:
    """The request's body, sent with a length or in chunks (an artifact's upload may stream)."""
    if "chunked" not in req.headers.get("Transfer-Encoding", "").lower():
        return req.rfile.read(int(req.headers.get("Content-Length") or 0))
    body = b""
    while size := int(req.rfile.readline().split(b";")[0], 16):
        body += req.rfile.read(size)
        req.rfile.readline()
    while req.rfile.readline() not in (b"\r\n", b"\n", b""):  # the trailer, up to its blank line
        pass
    return body


def answer(req: http.server.BaseHTTPRequestHandler, status: int, reason: str, headers: list[tuple[str, str]],
           body: bytes) -> None:
    """One whole answer with its length: the client reads it to the end, whatever it is."""
    req.send_response(status, reason)
    for name, value in headers:
        req.send_header(name, value)
    req.send_header("Content-Length", str(len(body)))
    req.end_headers()
    req.wfile.write(body)


def wait_until(done: Callable[[], bool], what: str) -> None:
    """Poll for what a background thread (the writer's, a heartbeat's) does; fail after `WAIT_S`."""
    deadline = time.monotonic() + WAIT_S
    while not done():
        assert time.monotonic() < deadline, f"no {what} in {WAIT_S} s"
        time.sleep(0.05)


@pytest.fixture
def server(mlflow_server: tuple[str, int, Any]) -> str:
    return mlflow_server[0]


@pytest.fixture
def proxy(server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[StoreProxy]:
    for name, value in RETRIES.items():
        monkeypatch.setenv(name, value)
    with StoreProxy(server) as proxy:
        yield proxy


def new_run(writer: RunWriter, name: str) -> str:
    """A run made through the proxy while it forwards: the store answered as MLflow first."""
    return writer.submit(writer.create_run, "outages", name, {}, {}).result(timeout=WAIT_S)


@pytest.mark.parametrize("status", ["500", "429"])
def test_a_server_that_answers_errors_takes_the_writes_after_them(server, proxy, status):
    """MLflow raises after its retries of 500s or 429s (a RetryError in the chain): the server
    answered, so each write queued after the failed one is still sent, and succeeds once the server
    answers as MLflow again. Marked down, each would fail at once with the first write's error."""
    writer = RunWriter(proxy.url)
    run = new_run(writer, f"answers-{status}")
    proxy.mode = status
    failed = writer.submit(writer.log_metrics, run, {"m": 1.0}, 0)
    behind = writer.submit(writer.log_metrics, run, {"m": 2.0}, 1, check=False)  # whether or not `failed` is done
    with pytest.raises(MlflowException) as flushed:
        writer.flush()
    assert flushed.value is failed.exception()
    assert isinstance(behind.exception(), MlflowException) and behind.exception() is not failed.exception()
    assert proxy.counts[status] == 2 * ATTEMPTS, proxy.counts  # both writes reached the server, with retries
    proxy.mode = "forward"
    sent = proxy.counts["forward"]
    writer.submit(writer.log_metrics, run, {"m": 3.0}, 2)
    writer.close()
    assert proxy.counts["forward"] > sent
    assert [m.value for m in MlflowClient(server).get_metric_history(run, "m")] == [3.0]


def test_a_server_that_does_not_answer_fails_the_writes_queued_behind_at_once(server, proxy):
    """A write the server never answered (requests' ConnectionError after MLflow's retries) marks the
    store down: each write queued behind it fails with that same error, without a request of its own
    (each would wait out MLflow's retries again: minutes apiece by default)."""
    writer = RunWriter(proxy.url)
    run = new_run(writer, "drop")
    sent = proxy.counts["forward"]
    proxy.mode = "drop"
    first = writer.submit(writer.log_metrics, run, {"m": 1.0}, 0)
    behind = [writer.submit(writer.log_metrics, run, {"m": 2.0}, step, check=False) for step in (1, 2)]
    err = first.exception(timeout=WAIT_S)
    assert isinstance(err, MlflowException), err
    assert all(f.exception(timeout=WAIT_S) is err for f in behind)
    assert proxy.counts == {"forward": sent, "drop": ATTEMPTS}, proxy.counts  # the first write's tries only
    with pytest.raises(MlflowException) as closed:
        writer.close()
    assert closed.value is err


def test_a_missed_heartbeat_leaves_the_store_to_the_writes_after_it(server, proxy):
    """A beat the server did not answer is a warning (`Heartbeat._stamp`), queued outside the error
    tracking: the tracked write after it is still sent and succeeds, no error waits for close(), and
    the next beat stamps the run."""
    writer = RunWriter(proxy.url)
    run = new_run(writer, "beats")
    proxy.mode = "drop"
    with pytest.warns(RuntimeWarning, match="could not record a heartbeat"):
        beat = Heartbeat(writer, run, every=0.5)  # the first beat at once, then every half second
        try:
            wait_until(lambda: proxy.counts["drop"] >= ATTEMPTS, "failed beat")  # a beat's last try arrived
            proxy.mode = "forward"
            sent = proxy.counts["forward"]
            writer.submit(writer.log_metrics, run, {"m": 1.0}, 0).result(timeout=WAIT_S)  # after that beat: ordered
            assert proxy.counts["forward"] > sent
            client = MlflowClient(server)
            wait_until(lambda: HEARTBEAT_TAG in client.get_run(run).data.tags, "heartbeat tag")
        finally:
            beat.stop()
    writer.close()
    assert [m.value for m in client.get_metric_history(run, "m")] == [1.0]


def test_a_login_page_mid_run_is_a_store_failure_not_a_wrong_uri(server, proxy, tmp_path):
    """A proxy's login page (status 200) that `iterhead train` gets after its run began: the URI named
    an MLflow server (its first answer was one), so this is a failure while running (exit 1, one line
    naming the store), not bad input (exit 2, "is no MLflow tracking server"). The first-answer case is
    in tests/test_train_cli.py."""
    cur = tiny(name="login-mid-run", stages=[{"name": "s", "mix": {"parity": 1.0}, "epochs": 400}])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cur.model_dump(mode="json")))
    done = run_until([sys.executable, "-m", "iterhead.search.cli", "train", "c.yaml", "--threads", "1",
                      "--tracking-uri", proxy.url], tmp_path,
                     {**os.environ, **RETRIES, "ITERHEAD_HEARTBEAT_S": "3600"},  # no beat's warning
                     "epoch    3]", lambda _: setattr(proxy, "mode", "html"))
    assert done.stdout.count("epoch    3]") == 1, done.stdout + done.stderr
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: --tracking-uri: the MLflow store failed: "), done.stderr
    assert proxy.counts["html"] >= 1  # the login page was what failed
    client = MlflowClient(server)
    assert len(client.search_runs([client.get_experiment_by_name("login-mid-run").experiment_id])) == 1  # made


def test_a_stopping_writer_still_ends_its_runs_and_says_the_stores_error_once(tmp_path, capsys):
    """A search stopped while its store failed: a write's error raised at the next submit skipped the
    runs' ends and replaced the stop (exit 1). Stopping, the ends are queued whatever failed before,
    and the first error is said in one line, once for the driver's and the callback's writers."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    writers = [RunWriter(uri), RunWriter(uri)]
    run = writers[0].submit(writers[0].create_run, "w", "ok", {}, {}).result()
    for writer in writers:
        assert writer.submit(writer.log_metrics, "no-such-run", {"m": 1.0}, 0).exception() is not None
        writer.mark_stopping()
    writers[0].submit(writers[0].end_run, run, "KILLED")  # raised the error above, unqueued, before
    for writer in writers:
        writer.close(stopping=True)
    said = [line for line in capsys.readouterr().err.splitlines() if "tracking store" in line]  # not MLflow's log
    assert len(said) == 1 and said[0].startswith("warning: the tracking store failed while stopping: "), said
    assert "no-such-run" in said[0]
    assert MlflowClient(uri).get_run(run).info.status == "KILLED"
    begin_command()  # the next command's stop says it again
    later = RunWriter(uri)
    assert later.submit(later.log_metrics, "no-such-run", {"m": 1.0}, 0).exception() is not None
    later.close(stopping=True)
    assert "no-such-run" in capsys.readouterr().err


def test_a_ctrl_c_as_no_trial_runs_while_the_store_is_gone_stays_a_stop(proxy, ray_local, tmp_path, capsys):
    """The server stops answering and Ctrl-C comes as the first of two trials (one at a time)
    ends: Tune starts no other, so every trial it holds has ended. The stop was taken for the
    search's end: with the store there, the search was summarised and marked finished with one
    trial; gone, the writes that failed on it made a failure of it (exit 1, 'search failed'). It
    stays a stop (exit 130, the `--resume` hint) with one line for the store. Once the server
    answers again, `--resume` trains the second trial and ends the first trial's run, which its
    dropped end left RUNNING, then `reconcile` KILLED (no trial of it runs again)."""
    from iterhead.search.reconcile import reconcile
    from iterhead.search.run import SearchOptions, run_search
    from iterhead.search.spec import load_search

    from support import PARITY_BASE, CtrlCAt

    class GoneAt(CtrlCAt):
        def write(self, text: str) -> int:
            if self.at in text:
                proxy.mode = "drop"
            return super().write(text)

    (tmp_path / "base.yaml").write_text(yaml.safe_dump(PARITY_BASE))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "name": "gone-between", "base": "base.yaml", "space": {"stages.train.epochs": {"grid": [1, 2]}},
        "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent": 1, "scheduler": "none"},
        "resources": {"cpu": 1}}))
    out = GoneAt(" finished:")
    opts = SearchOptions(uri=proxy.url, storage_path=str(tmp_path / "runs"))
    with pytest.raises(KeyboardInterrupt):
        run_search(load_search(tmp_path / "spec.yaml"), opts, out=out)
    assert out.pressed and proxy.counts["drop"] > 0
    assert "search interrupted; continue it with: iterhead search" in out.getvalue(), out.getvalue()
    said = [line for line in capsys.readouterr().err.splitlines() if "tracking store" in line]
    assert len(said) == 1 and said[0].startswith("warning: the tracking store failed while stopping: "), said
    (state,) = (tmp_path / "runs").glob("gone-between-*/iterhead-search.json")
    assert json.loads(state.read_text())["state"] != "finished"
    proxy.mode = "forward"  # back an hour later: `reconcile`, as the resume's own does, marks its runs KILLED
    assert [m.what for m in reconcile(MlflowClient(proxy.url), ["gone-between"], now=time.time() + 3600)]
    rows = run_search(load_search(tmp_path / "spec.yaml"), replace(opts, resume=True), out=io.StringIO())
    assert len(rows) == 2 and all(row["status"] == "TERMINATED" for row in rows), rows
    assert "View run" not in capsys.readouterr().out  # MLflow's lines for each run a server ends: not a search's
    client = MlflowClient(proxy.url)
    runs = client.search_runs([client.get_experiment_by_name("gone-between").experiment_id])
    # the first trial's run too, whose end and last report the stop dropped: no trial of it ran again
    assert len(runs) == 3 and {run.info.status for run in runs} == {"FINISHED"}, runs
    trial_runs = [run for run in runs if run.data.tags.get(KIND) == "trial"]
    assert len(trial_runs) == 2
    for run in trial_runs:  # and what it reported and drew last
        assert REACHED in run.data.metrics, run.info.run_name
        drawn = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"curriculum.yaml", "attention.png", "compute_to_accuracy.png"} <= drawn, (run.info.run_name, drawn)
