"""`iterhead search` on the embedded Ray, stopped by SIGTERM while it starts: exit 143 with one line
and no traceback, no run left RUNNING, no process left behind.

Each driver runs in a process group of its own, which is all a test signals. The signal is sent
when the driver reaches the moment under test (a file or a process appears, a line is printed),
never after a fixed sleep.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import yaml
from mlflow import MlflowClient

from support import PARITY_BASE, alive, ctrl_c_as_at_a_terminal

pytestmark = pytest.mark.integration


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "iterhead.search.cli", "search", *args]


def write_spec(folder: Path, epochs: list[int]) -> None:
    (folder / "base.yaml").write_text(yaml.safe_dump(PARITY_BASE))
    (folder / "spec.yaml").write_text(yaml.safe_dump({
        "name": "stopped", "base": "base.yaml",
        "space": {"stages.train.epochs": {"grid": epochs}},
        "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent": 2, "scheduler": "none"},
        "resources": {"cpu": 1}}))


def wait_for(ready: Callable[[], bool], driver: subprocess.Popen, what: str, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while not ready():
        if driver.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the driver never reached {what} (exit status {driver.poll()})")
        time.sleep(0.01)


def gcs_started(pgid: int) -> bool:
    """Whether a GCS server runs in the driver's group: `ray.init` has begun, with seconds to go (raylet, agents)."""
    def name(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return ""

    return any(name(pid) == "gcs_server" for pid in alive(pgid))


def left_behind(pgid: int, within_s: float = 30.0) -> list[int]:
    """The processes of the driver's group still running `within_s` after it exited (Ray's need a moment)."""
    deadline = time.monotonic() + within_s
    while alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive(pgid)


@pytest.mark.parametrize("moment, sig", [("store", signal.SIGTERM), ("ray", signal.SIGTERM), ("ray", signal.SIGINT)],
                         ids=["store-sigterm", "ray-sigterm", "ray-ctrl-c"])
def test_a_stop_while_the_search_starts_exits_143_or_130_and_leaves_nothing(tmp_path, moment, sig):
    """Before Ray started, SIGTERM killed the driver (status -15) while MLflow made the store's tables,
    leaving a store later commands failed on; during `ray.init`, Ray's own handler made it exit 15, and
    the agents its raylet had started lived on for a minute, as they did after a Ctrl-C there."""
    write_spec(tmp_path, [3])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    ctrl_c_as_at_a_terminal()
    driver = subprocess.Popen(command("spec.yaml", "--smoke", "--num-cpus", "1", "--storage-path", "runs",
                                      "--tracking-uri", uri),
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        if moment == "store":  # its tables take seconds to make, from another thread
            wait_for((tmp_path / "mlflow.db").exists, driver, "the store's creation")
        else:
            wait_for(lambda: gcs_started(driver.pid), driver, "Ray's start")
        driver.send_signal(sig)
        out, err = driver.communicate(timeout=120)
        assert driver.returncode == 128 + sig, out + err
        assert err.strip().splitlines()[-1] == ("terminated" if sig == signal.SIGTERM else "interrupted"), out + err
        assert "Traceback" not in out + err, out + err
        assert left_behind(driver.pid) == []
    finally:
        if driver.poll() is None or alive(driver.pid):  # whatever a failed check left, never a stray Ray
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert not list((tmp_path / "runs").glob("*"))  # the search had not begun: its folder is gone
    client = MlflowClient(uri)  # a whole store, not tables cut short
    assert [r.info.status for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.info.status == "RUNNING"] == []



def test_a_command_run_off_the_main_thread_is_not_refused_for_its_signals(tmp_path):
    """Every command now handles SIGTERM, which only the main thread may: `main()` called from a
    caller's worker thread raised ValueError from `signal.signal` for all of them."""
    import threading

    from iterhead.search.cli import main

    curriculum = tmp_path / "c.yaml"
    curriculum.write_text(yaml.safe_dump(PARITY_BASE))
    codes: list[int] = []
    worker = threading.Thread(target=lambda: codes.append(main(["validate", str(curriculum)])))
    worker.start()
    worker.join(timeout=120)
    assert codes == [0]


@pytest.mark.parametrize("stop", [None, signal.SIGINT, signal.SIGUSR1], ids=["none", "ctrl-c", "sigusr1"])
def test_a_stop_before_tune_starts_a_trial_is_told_from_a_fit_that_ran_to_its_end(ray_local, tmp_path, stop):
    """A stop as Tune's loop begins, before it makes a trial (a callback's setup sends it), leaves
    nothing unfinished: Tune returns an empty grid, as a search with nothing left to run does.
    `tune_stopped` tells the two apart, for Ctrl-C and for Tune's SIGUSR1 alike."""
    from ray import tune

    from iterhead.search import signals

    class StopAtSetup(tune.Callback):
        def setup(self, **info) -> None:
            if stop is not None:
                os.kill(os.getpid(), stop)

    tuner = tune.Tuner(lambda config: {"x": 1.0}, param_space={"a": tune.grid_search([1, 2])},
                       run_config=tune.RunConfig(storage_path=str(tmp_path), callbacks=[StopAtSetup()], verbose=0))
    before = signal.getsignal(signal.SIGINT)
    with signals.tune_loop():
        grid = tuner.fit()
        stopped = signals.tune_stopped()
    assert stopped == (stop is not None)
    assert len(grid) == (0 if stop is not None else 2)
    assert signal.getsignal(signal.SIGINT) is before  # Tune's own handler is gone


def test_a_sigterm_repeated_as_a_stopped_search_exits_is_ignored(tmp_path):
    """A batch scheduler that repeats SIGTERM until the process ends: once the stopped driver said
    `terminated`, Python's default handler was back for the process's exit, and a repeat then
    killed it (status -15), the summary and `--resume` hint it still buffered for a pipe unwritten."""
    write_spec(tmp_path, [400])  # a trial that trains until the stop
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        driver = subprocess.Popen(command("spec.yaml", "--num-cpus", "1", "--storage-path", "runs", "--tracking-uri",
                                          f"sqlite:///{tmp_path}/mlflow.db"),
                                  cwd=tmp_path, stdout=stdout, stderr=stderr, start_new_session=True)
    try:
        wait_for(lambda: "started" in out.read_text(), driver, "a trial's start")
        driver.send_signal(signal.SIGTERM)
        wait_for(lambda: "terminated" in err.read_text().splitlines()[-1:], driver, "its stop", limit_s=240)
        while driver.poll() is None:  # the repeats, until it has exited
            driver.send_signal(signal.SIGTERM)
            time.sleep(0.02)
        assert driver.returncode == 143, out.read_text()[-2000:] + err.read_text()[-2000:]
        assert "search interrupted; continue it with: iterhead search spec.yaml --resume" in out.read_text()
    finally:
        if driver.poll() is None or alive(driver.pid):
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()


def test_a_stop_seen_in_an_inner_block_is_seen_by_the_blocks_around_it():
    """A search's block sits in its command's: a SIGTERM repeated after the search's block ended
    reached the command's block, which took it for a first one and raised `Terminated` again,
    cutting the stopped command's summary."""
    from iterhead.search.signals import Terminated, sigterm_as_ctrl_c

    def signalled() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between two bytecodes of this thread, soon after
            time.sleep(0.001)

    ctrl_c_as_at_a_terminal()  # none a fit left, nor Ctrl-C ignored; the conftest puts it back
    try:
        with sigterm_as_ctrl_c() as command_seen:
            with pytest.raises(Terminated), sigterm_as_ctrl_c() as search_seen:
                signalled()
            signalled()  # the repeat: ignored
    except Terminated:  # a KeyboardInterrupt would end the whole test session
        pytest.fail("the repeated SIGTERM stopped the command's block again")
    assert search_seen.is_set() and command_seen.is_set()


@pytest.mark.parametrize("raised", ["ctrl-c", "sigterm"])
def test_a_stop_that_lands_in_a_finaliser_still_stops_the_command(raised):
    """Python prints an exception raised in a finaliser (a `__del__`, a garbage-collector callback)
    as "ignored" and goes on: a Ctrl-C that landed there let `iterhead report` run to its end and
    exit 0. Within a command's block it is raised again a moment later, a SIGTERM's as
    `Terminated`. (A finaliser raises here what the signal's handler would raise there.)"""
    from iterhead.search.signals import Terminated, sigterm_as_ctrl_c

    class Finaliser:
        def __del__(self) -> None:
            if raised == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)  # its handler raises Terminated here, in the finaliser
                time.sleep(0.05)
            else:
                raise KeyboardInterrupt

    ctrl_c_as_at_a_terminal()  # the conftest puts the handler back
    found = sys.unraisablehook  # pytest's own
    with pytest.raises(Terminated if raised == "sigterm" else KeyboardInterrupt), sigterm_as_ctrl_c():
        Finaliser()  # dropped at once: its exception goes to sys.unraisablehook
        for _ in range(1000):
            time.sleep(0.001)
        pytest.fail("the stop was swallowed")
    assert sys.unraisablehook is found  # the block put back the hook it found
