"""Writing runs to MLflow: batched, from one ordered background thread.

Every write goes through `RunWriter`, which owns one worker thread: calls are queued in
order and return at once, so training never waits on the tracking store (importing MLflow
and creating a fresh sqlite schema alone take seconds). Errors are not swallowed: the next
call after a failed write, and `close()`, raise it.

The tracking URI defaults to MLflow's own default, ``sqlite:///mlflow.db`` in the working
directory; ``--tracking-uri`` or ``MLFLOW_TRACKING_URI`` override it. File stores are
refused by MLflow 3 and rejected here up front, as bad input. An experiment created in a
sqlite store keeps its artifacts beside the database file (`artifact_location`), not in
MLflow's default of ``./mlruns`` under whatever folder the command ran from.
"""

from __future__ import annotations

import math
import os
import re
import sqlite3
import sys
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from pathlib import Path
from typing import Any, Callable

from iterhead.curricula.errors import ConfigError, first_line, one_line, require_utf8, shown
from iterhead.search.endpoints import uri_field
from iterhead.trainable import results as r

DEFAULT_URI = "sqlite:///mlflow.db"
SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")  # MLflow 3's stores
MAX_METRICS, MAX_PARAMS, MAX_PARAM_CHARS = 1000, 100, 6000
STORE_FIX = "name the store the runs were tracked in"  # to a command that reads one
MLFLOW_TABLES = {"experiments", "runs"}  # in every MLflow store, those made before its migrations too
# Whose exceptions are the tracking store's (unreachable server, locked or broken database)
STORE_MODULES = ("mlflow.", "sqlalchemy.", "sqlite3")
RUNS_PAGE = 50_000  # the most runs one MLflow search returns (its SEARCH_MAX_RESULTS_THRESHOLD)
# The stores whose failure while stopping the command running in this process has said: a
# search's driver and its callback each close a writer, and one line says it (`begin_command`)
SAID_WHILE_STOPPING: set[str] = set()


def begin_command() -> None:
    """A search or a training begins in this process: its stop says a store's failure again, where
    an earlier command's (a benchmark's, a test's) said it for the same store."""
    SAID_WHILE_STOPPING.clear()


def every_page(search: Callable[[int, str | None], Any], page: int) -> list[Any]:
    """Every item of an MLflow search, page by page: `search(max_results, page_token)` gives at
    most a page and the token of the next one."""
    out, token = [], None
    while True:
        found = search(page, token)
        out += list(found)
        token = found.token
        if not token:
            return out


def all_runs(client: Any, experiment_id: str, filter_string: str, page: int | None = None) -> list[Any]:
    """Every run of an experiment that `filter_string` matches: a search's trials, or an
    experiment's seed runs, can be more than one search returns (`RUNS_PAGE`)."""
    return every_page(lambda n, token: client.search_runs([experiment_id], filter_string=filter_string,
                                                          max_results=n, page_token=token), page or RUNS_PAGE)


def resolve_uri(uri: str | None, must_exist: bool = False) -> str:
    """The tracking URI to use, checked: `ConfigError` for one MLflow cannot use, and with
    `must_exist` (commands that only read a store) for a sqlite file that holds no store yet."""
    field = uri_field(uri)
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    require_utf8(uri, shown(uri), "give a URI in UTF-8", field=field)  # MLflow failed on it after the run began
    scheme = uri.split(":", 1)[0].split("+", 1)[0] if ":" in uri else uri  # `databricks` alone
    if scheme not in SCHEMES:
        raise ConfigError(f"{uri!r} is not a tracking URI MLflow 3 accepts (file stores are refused); "
                          "use sqlite:///PATH.db or http://HOST:PORT", field=field)
    file = sqlite_file(uri)
    if uri.startswith("sqlite:") and file is None:  # sqlite://, sqlite:///:memory: (not sqlite+driver:)
        raise ConfigError(f"{uri!r} is an in-memory store, which keeps nothing once the process ends (and "
                          "MLflow puts its artifacts in ./mlruns); use sqlite:///PATH.db", field=field)
    if file is not None and not file.parent.is_dir():
        raise ConfigError(f"the folder {str(file.parent)!r} of the sqlite store does not exist", field=field)
    if file is not None and file.exists() and not file.is_file():
        raise ConfigError(f"{str(file)!r} is a folder, not a sqlite database file; name a .db file", field=field)
    if file is not None and file.is_file() and file.stat().st_size and not is_sqlite(file):
        raise ConfigError(f"{str(file)!r} is not a sqlite database; name a .db file, or a new one", field=field)
    tables = sqlite_tables(file) if file is not None and file.is_file() and file.stat().st_size else None
    if tables and not MLFLOW_TABLES <= tables:  # MLflow would add its tables beside the user's
        listed = ", ".join(repr(t) for t in sorted(tables)[:3]) + (", ..." if len(tables) > 3 else "")
        raise ConfigError(f"{str(file)!r} is a sqlite database of other tables ({listed}), not an MLflow store; "
                          "name an MLflow store's .db file, or a new one", field=field)
    if must_exist and file is not None:  # MLflow would make a new, empty store there, or write into it
        if not file.is_file():
            raise ConfigError(f"no tracking store at {uri}; {STORE_FIX}", field=field)
        if file.stat().st_size == 0:
            raise ConfigError(f"{file} is an empty file, not a tracking store; {STORE_FIX}", field=field)
        if tables == set():
            raise ConfigError(f"{file} is a database without tables, not a tracking store; {STORE_FIX}", field=field)
    return uri


def is_sqlite(file: Path) -> bool:
    """Whether `file` starts as every sqlite database does."""
    with open(file, "rb") as f:
        return f.read(16) == b"SQLite format 3\x00"


def sqlite_tables(file: Path) -> set[str] | None:
    """The tables of the sqlite database `file`, read through a read-only connection (which leaves
    its tables and rows as they were; a WAL database may get its -wal and -shm files); None where
    it cannot be read now (locked by a writer, say), which is left for MLflow to report."""
    try:
        with closing(sqlite3.connect(f"{file.resolve().as_uri()}?mode=ro", uri=True)) as db:
            return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.Error:
        return None


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, read as SQLAlchemy reads it when it opens the
    store for MLflow (the path ends at the query, ``?mode=rw``, and ``%20`` is a space), so the
    checks look at the file MLflow opens; None for other stores and in-memory ones."""
    if not uri.startswith("sqlite:///"):
        return None
    from sqlalchemy.engine import make_url

    path = make_url(uri).database
    return None if path in (None, "", ":memory:") else Path(path)


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment's artifacts go: ``mlruns/<experiment>`` beside a sqlite store's
    file, so the store and its artifacts sit together and a command run from another folder
    scatters nothing there; None (the server's or MLflow's choice) for other stores. Unsafe
    characters of a free-form name (`iterhead train --experiment`) become ``_``; two names
    that meet in one folder are harmless, as each run's artifacts sit under its own run id."""
    file = sqlite_file(uri)
    if file is None:
        return None
    folder = re.sub(r"[^A-Za-z0-9_.-]", "_", experiment).strip(".") or "_"
    return (file.resolve().parent / "mlruns" / folder).as_uri()


def ui_hint(uri: str) -> str:
    """How to look at the runs."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def raise_first(futures: list[Future]) -> None:
    """Wait for `futures`; raise the first error, noting how many more failed (none is lost
    silently: each failed write after the first would otherwise vanish with it)."""
    errors = [e for e in (f.exception() for f in futures) if e is not None]
    if not errors:
        return
    more = [e for e in errors[1:] if e is not errors[0]]  # writes skipped after it raise it again
    if more and hasattr(errors[0], "add_note"):
        errors[0].add_note(f"{len(more)} more tracking write(s) failed; the last: {more[-1]!r}")
    raise errors[0]


def store_error(err: BaseException) -> bool:
    """Whether `err` is the tracking store's (`STORE_MODULES`), not iterhead's own."""
    return type(err).__module__.startswith(STORE_MODULES)


def unreachable(err: BaseException) -> bool:
    """Whether `err` says the store did not answer, after MLflow's own retries of the call (about
    4 minutes by default): MLflow raises its own error with the HTTP client's as the context. Not
    a server that answered with errors (its 429s or 500s, `RetryError`): it may take the next call."""
    import requests

    seen: BaseException | None = err
    chain: set[int] = set()  # a chain can loop back (an error raised again while handling its own cause)
    while seen is not None and id(seen) not in chain:
        if isinstance(seen, (requests.ConnectionError, requests.Timeout)):
            return True
        chain.add(id(seen))
        seen = seen.__cause__ or seen.__context__
    return False


class RunWriter:
    """Ordered, non-blocking writes to one tracking store (module docstring)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-writer")
        self._pending: list[Future] = []
        self._lock = threading.Lock()  # submit() is also called from the heartbeat thread
        self._client: Any = None
        self._down: BaseException | None = None  # the store did not answer this error's write
        self._stopping = False  # `mark_stopping()`: earlier writes' errors wait for close(stopping=True)
        self.submit(self._connect)

    def _connect(self) -> None:
        from mlflow import MlflowClient  # slow import, kept off the main thread

        self._client = MlflowClient(tracking_uri=self.uri)

    def submit(self, fn: Callable[..., Any], *args: Any, check: bool = True) -> Future:
        """Queue `fn(*args)`; with `check`, first re-raise the error of an earlier failed write
        (unless the command is stopping: `mark_stopping()`)."""
        if check and not self._stopping:
            self.raise_errors()
        with self._lock:
            future = self._pool.submit(self._call, fn, *args)
            self._pending.append(future)
        return future

    def submit_untracked(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Queue `fn(*args)` in order with the rest, outside the error tracking (heartbeats)."""
        return self._pool.submit(self._call, fn, *args)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` unless the store already failed to answer: each queued write would wait
        out MLflow's retries again (minutes each: a stopped server held a command for hours), and
        the command ends on that first error anyway, which every skipped write raises again."""
        if self._down is not None:
            raise self._down
        try:
            return fn(*args)
        except Exception as err:
            if self._down is None and unreachable(err):  # only here, on the worker thread
                self._down = err
            raise

    def raise_errors(self) -> None:
        with self._lock:
            done = [f for f in self._pending if f.done()]
            self._pending = [f for f in self._pending if not f.done()]
        raise_first(done)

    def mark_stopping(self) -> None:
        """The command is stopping (Ctrl-C, SIGTERM): what it still writes (ending its runs) is
        queued whatever failed before, and close(stopping=True) says the first error. Raised at a
        later submit, the error skipped the writes after it and replaced the stop (exit 1)."""
        self._stopping = True

    def flush(self) -> None:
        """Wait for every queued write; raise the first error. The writer stays usable."""
        with self._lock:
            pending, self._pending = self._pending, []
        raise_first(pending)

    def close(self, stopping: bool = False) -> None:
        """Wait for every queued write; raise the first error. A command that is `stopping` (Ctrl-C,
        SIGTERM) says a store's error in one line instead: raised, it replaced the stop as the
        command's outcome (exit 1, not 130 or 143) while the store was down."""
        try:
            self.flush()
        except Exception as err:
            if not stopping or not store_error(err):
                raise
            if self.uri not in SAID_WHILE_STOPPING:
                SAID_WHILE_STOPPING.add(self.uri)
                print(one_line(f"warning: the tracking store failed while stopping: {first_line(err, 300)}; runs "
                               "it did not end stay RUNNING until `iterhead reconcile` (or a search's --resume) "
                               "reaches it"), file=sys.stderr)
        finally:
            self._pool.shutdown(wait=True)

    # -- what runs in the worker ----------------------------------------------------------

    @property
    def client(self) -> Any:
        return self._client

    def experiment_id(self, name: str) -> str:
        """The experiment called `name`, created if missing (once, before any trial writes)."""
        exp = self._client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise ConfigError(f"experiment {name!r} is deleted in {self.uri}; restore it (mlflow "
                                  "experiments restore) or choose another name", field="--experiment")
            return exp.experiment_id
        return self._client.create_experiment(name, artifact_location=artifact_location(self.uri, name))

    def create_run(self, experiment: str, run_name: str, tags: dict[str, str],
                   params: dict[str, Any], parent_run_id: str | None = None) -> str:
        """A new run with its params; a child of `parent_run_id` when given."""
        tags = dict(tags)
        if parent_run_id:
            tags[r.PARENT_RUN] = parent_run_id
        run = self._client.create_run(self.experiment_id(experiment), run_name=run_name, tags=tags)
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), MAX_PARAMS):
            self._client.log_batch(run_id, params=items[i:i + MAX_PARAMS])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int,
                    timestamp_ms: int | None = None) -> None:
        self.log_steps(run_id, [(step, timestamp_ms or int(time.time() * 1000), metrics)])

    def log_steps(self, run_id: str, steps: list[tuple[int, int, dict[str, float]]]) -> None:
        """Several steps' metrics, (step, timestamp ms, metrics) each, in as few batches as fit.

        A batch ends at a step boundary (unless one step alone is over MLflow's limit), so a
        crash between batches never leaves a step half logged.
        """
        from mlflow.entities import Metric

        batch: list[Metric] = []
        for step, ts, metrics in steps:
            items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
            if batch and len(batch) + len(items) > MAX_METRICS:
                self._client.log_batch(run_id, metrics=batch)
                batch = []
            for i in range(0, len(items), MAX_METRICS):
                chunk = items[i:i + MAX_METRICS]
                if len(chunk) == MAX_METRICS:
                    self._client.log_batch(run_id, metrics=chunk)
                else:
                    batch += chunk
        if batch:
            self._client.log_batch(run_id, metrics=batch)

    def log_artifact(self, run_id: str, path: str | Path, folder: str | None = None) -> None:
        self._client.log_artifact(run_id, str(path), folder)

    def end_run(self, run_id: str, status: str) -> None:
        self._client.set_terminated(run_id, status)


HEARTBEAT_TAG = r.HEARTBEAT_TAG  # defined in `trainable.results`; importable here as before


def heartbeat_every() -> float:
    """Seconds between a live run's heartbeats: 30, or ``ITERHEAD_HEARTBEAT_S`` (for tests). Checked,
    as `ConfigError`: reconcile's staleness bound and each beat's wait are computed from it."""
    text = os.environ.get("ITERHEAD_HEARTBEAT_S", "30")
    try:
        every = float(text)
    except ValueError:
        every = math.nan
    if not 0 < every < math.inf:  # NaN fails too
        raise ConfigError(f"{text!r} is not a number of seconds above 0; unset it for the default of 30 s",
                          field="ITERHEAD_HEARTBEAT_S")
    return every


class Heartbeat:
    """Stamps ``iterhead.heartbeat`` (Unix seconds) on a live run every `every` seconds.

    `iterhead reconcile` tells a crashed run from a live one by this stamp's age. The
    interval defaults to 30 s (``ITERHEAD_HEARTBEAT_S`` overrides it, for tests).
    """

    def __init__(self, writer: RunWriter, run_id: Future | str, every: float | None = None) -> None:
        self.writer, self.run_id = writer, run_id
        self.every = every if every is not None else heartbeat_every()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="iterhead-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        """A beat is queued only once the last one is done: while the store does not answer, each
        waits out MLflow's retries (minutes), and beats queued meanwhile would hold every write
        queued after them for as long again."""
        beat: Future | None = None
        while True:
            if beat is None or beat.done():
                beat = self.writer.submit_untracked(self._stamp)
            if self._stop.wait(self.every):
                return

    def _stamp(self) -> None:
        """A missed beat is only a warning: it must not stop the run it watches."""
        if isinstance(self.run_id, Future) and self.run_id.exception() is not None:
            return  # no run to beat for: its creation's error is reported where it was asked for
        try:
            run = self.run_id.result() if isinstance(self.run_id, Future) else self.run_id
            self.writer.client.set_tag(run, r.HEARTBEAT_TAG, str(int(time.time())))
        except Exception as err:  # noqa: BLE001 - reported, and the next beat tries again
            warnings.warn(f"iterhead: could not record a heartbeat ({err})", RuntimeWarning, stacklevel=1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
