"""`mlflow_server/start.sh`: a real server on a free loopback port that `iterhead train` logs to."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from iterhead.search.cli import main

from support import ROOT, ctrl_c_as_at_a_terminal, free_port, run_until, running_server, tiny

pytestmark = pytest.mark.integration


def listening(port: int) -> set[str]:
    """Local addresses with a socket listening on `port`, read from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(address)
    return found


@pytest.fixture
def server(mlflow_server):
    return mlflow_server


def test_train_logs_to_the_server_over_http(server, tmp_path, monkeypatch):
    url, _, data = server
    monkeypatch.chdir(tmp_path)
    cur = tiny(name="over-http", stages=[{"name": "s", "mix": {"parity": 1.0}, "epochs": 2}])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cur.model_dump(mode="json")))
    assert main(["train", str(path), "--tracking-uri", url]) == 0
    client = MlflowClient(url)
    (run,) = client.search_runs([client.get_experiment_by_name("over-http").experiment_id])
    assert run.info.status == "FINISHED" and "compute/flops" in run.data.metrics
    assert len(client.get_metric_history(run.info.run_id, "acc/parity")) == 2
    local = client.download_artifacts(run.info.run_id, "curriculum.yaml", str(tmp_path))
    assert yaml.safe_load(open(local))["name"] == "over-http"
    assert list((data / "artifacts").rglob("attention.png"))  # stored by the server, not the client
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_server_listens_on_loopback_only(server):
    _, port, _ = server
    addresses = listening(port)
    assert addresses == {"0100007F"}, addresses  # 127.0.0.1, nothing on 0.0.0.0 or ::


def test_the_default_experiment_stores_its_artifacts_through_the_server(server):
    """Clients need no access to the folder start.sh ran in (mlflow_server/README.md)."""
    url, _, _ = server
    assert MlflowClient(url).get_experiment("0").artifact_location == "mlflow-artifacts:/0"


def test_a_port_already_served_is_refused(server):
    """`mlflow server` itself exits 0 on a port in use, leaving the other server to answer."""
    _, port, data = server
    out = subprocess.run([str(ROOT / "mlflow_server" / "start.sh"), "--port", str(port), "--data", str(data / "x")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and f"already listens on 127.0.0.1:{port}" in out.stderr


def test_an_mlflow_found_on_the_path_runs_with_its_own_interpreter(server, tmp_path):
    """Outside this checkout (no .venv beside the script) start.sh takes mlflow from PATH, and its
    interpreter from mlflow's first line: a pipx install has no python beside it."""
    _, port, data = server
    script = tmp_path / "start.sh"
    script.write_text((ROOT / "mlflow_server" / "start.sh").read_text())
    script.chmod(0o755)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "mlflow").symlink_to(Path(sys.executable).parent / "mlflow")  # no python beside it
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    out = subprocess.run([str(script), "--port", str(port), "--data", str(data / "y")], capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 1 and f"already listens on 127.0.0.1:{port}" in out.stderr, out.stderr  # it ran python


def test_bad_port_is_refused():
    out = subprocess.run([str(ROOT / "mlflow_server" / "start.sh"), "--port", "http"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "--port" in out.stderr


RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
           "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0"}  # about 6 s a write that gets no answer, not 4 minutes


def gone_mid_run(tmp_path: Path, argv: list[str], begun: str, then: signal.Signals | None = None) -> tuple[
        subprocess.CompletedProcess, float]:
    """`iterhead ARGV --tracking-uri SERVER`, the server SIGKILLed once stdout shows `begun` (and the
    command sent `then` at once); the command's outcome, and its seconds from the kill to its end."""
    stopped: list[float] = []
    with running_server(tmp_path / "data", free_port()) as (url, proc):
        def fail(command: subprocess.Popen) -> None:
            os.killpg(proc.pid, signal.SIGKILL)
            if then is not None:
                command.send_signal(then)
            stopped.append(time.monotonic())

        done = run_until([str(Path(sys.executable).parent / "iterhead"), *argv, "--tracking-uri", url], tmp_path,
                         {**os.environ, **RETRIES, "ITERHEAD_HEARTBEAT_S": "3600"}, begun, fail)  # no beat's warning
    return done, time.monotonic() - stopped[0]


def long_curriculum(tmp_path: Path) -> Path:
    cur = tiny(name="gone", stages=[{"name": "s", "mix": {"parity": 1.0}, "epochs": 400}])
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cur.model_dump(mode="json")))
    return tmp_path / "c.yaml"


def test_a_server_gone_mid_run_ends_train_in_one_line(tmp_path):
    """A server stopped while `iterhead train` logs to it: the first write that MLflow's retries
    give up on ends the command (exit 1, one line naming the server). Each write queued behind it
    used to wait out the same retries in turn (4 minutes each by default): hours, without a word."""
    done, seconds = gone_mid_run(tmp_path, ["train", str(long_curriculum(tmp_path)), "--threads", "1"], "epoch    3]")
    assert seconds < 60  # a few writes' retries; it took minutes
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: --tracking-uri: the MLflow store failed: ")
    assert "http://127.0.0.1:" in done.stderr, done.stderr


@pytest.mark.slow  # a server of its own to kill (about 20 s to start): `make test-slow`
def test_a_stop_while_the_server_is_gone_stays_a_stop(tmp_path):
    """SIGTERM while the server does not answer: the store's error, raised while the writer closed,
    replaced the stop (exit 1, not 143); it is said in one line and the command still exits 143."""
    done, seconds = gone_mid_run(tmp_path, ["train", str(long_curriculum(tmp_path)), "--threads", "1"], "epoch    3]",
                                 then=signal.SIGTERM)
    assert seconds < 60
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("warning: the tracking store failed while stopping: "), lines
    assert lines[1] == "terminated"


@pytest.mark.slow  # a server of its own to kill (about 20 s to start): `make test-slow`
def test_a_search_whose_server_is_gone_says_how_to_continue_it(tmp_path):
    """The search fails (exit 1) at the store's first unanswered write; Tune saved its state, so it
    says the command that continues it once the server is back (it said nothing)."""
    long_curriculum(tmp_path)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "name": "gone-search", "base": "c.yaml", "space": {"optim.lr": {"grid": [0.001]}},
        "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent": 1, "scheduler": "none"}}))
    done, seconds = gone_mid_run(tmp_path, ["search", "spec.yaml", "--num-cpus", "1", "--storage-path", "runs"],
                                 "MLflow parent run")
    assert seconds < 90
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "search failed; once its cause is fixed, continue it with: iterhead search spec.yaml --resume " \
        "--tracking-uri http://127.0.0.1:" in done.stdout, done.stdout[-2000:]
    assert done.stderr.splitlines()[-1].startswith("error: --tracking-uri: the MLflow store failed: "), done.stderr


@pytest.mark.slow  # a server of its own to kill (about 20 s to start): `make test-slow`
@pytest.mark.parametrize("then, code, last", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_a_search_stopped_while_its_server_is_gone_stays_a_stop(tmp_path, then, code, last):
    """SIGTERM or Ctrl-C to a search while the server does not answer: the callback's last writes,
    raised out of Tune's fit, replaced the stop (exit 1, 'search failed'); it is said in one line,
    the command says how to continue and still exits 143 or 130."""
    long_curriculum(tmp_path)
    ctrl_c_as_at_a_terminal()
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "name": "gone-stop", "base": "c.yaml", "space": {"optim.lr": {"grid": [0.001]}},
        "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent": 1, "scheduler": "none"}}))
    done, seconds = gone_mid_run(tmp_path, ["search", "spec.yaml", "--num-cpus", "1", "--storage-path", "runs"],
                                 "[status]", then=then)
    assert seconds < 90
    assert done.returncode == code, done.stdout[-2000:] + done.stderr[-2000:]
    hint = "search interrupted; continue it with: iterhead search spec.yaml --resume"
    assert hint in done.stdout, done.stdout[-2000:]
    assert "search failed" not in done.stdout
    said = [line for line in done.stderr.splitlines() if "tracking store" in line or "MLflow store" in line]
    assert len(said) == 1 and said[0].startswith("warning: the tracking store failed while stopping: "), said
    assert done.stderr.splitlines()[-1] == last, done.stderr[-2000:]
