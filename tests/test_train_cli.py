"""`iterhead train` end to end against a real sqlite MLflow store in a temp folder."""

from __future__ import annotations

import contextlib
import io

import pytest
from mlflow import MlflowClient

from iterhead.search.cli import main
from iterhead.search.train import SUMMARY_SECONDS

from support import ROOT, no_ray, web_server

SMALL = ROOT / "examples" / "poly_then_parity_small.yaml"


def train_small(uri: str) -> str:
    """`iterhead train` of the shipped small curriculum into the experiment "small"; what it printed.
    At 2 threads, named: without `--threads` a run takes the count the process has, which a
    module fixture inherits from whichever test ran before (`conftest._torch_threads`), and CPU
    numbers repeat at a fixed count only."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["train", str(SMALL), "--tracking-uri", uri, "--experiment", "small", "--threads", "2"]) == 0
    return printed.getvalue()


def small_runs(client: MlflowClient) -> list:
    return client.search_runs([client.get_experiment_by_name("small").experiment_id],
                              order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """The shipped small curriculum trained once (a second run is the slow tier's); its printed lines."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('train')}/mlflow.db"
    printed = train_small(uri)
    client = MlflowClient(uri)
    return client, small_runs(client), printed


def test_small_curriculum_reaches_target(small_run):
    """As its comment says, with seed 0 (the same seed giving the same numbers is `test_loop`'s, and
    the re-train of an export's, at a smaller size)."""
    _, (run,), _ = small_run
    assert run.data.metrics["reached"] == 1.0 and any(k.startswith("final/acc/") for k in run.data.metrics)


@pytest.mark.slow  # a second whole run of the shipped example, about 17 s: `make test-slow`
def test_small_curriculum_reaches_target_reproducibly(small_run):
    client, _, _ = small_run
    train_small(client.tracking_uri)
    a, b = (r.data.metrics for r in small_runs(client))
    assert a["reached"] == b["reached"] == 1.0
    assert a["compute_to_target"] == b["compute_to_target"]
    finals = sorted(k for k in a if k.startswith("final/acc/"))
    assert finals and all(a[k] == b[k] for k in finals)


def test_the_summary_line_splits_the_seconds_as_the_run_recorded_them(small_run):
    """`benchmarks/whole_process.py` reads this line to say where a whole process's time went."""
    _, runs, printed = small_run
    found = SUMMARY_SECONDS.search(printed)
    assert found, printed[-600:]
    training, evaluating, in_all = map(float, found.groups())
    metrics = runs[0].data.metrics
    assert (training, evaluating) == (round(metrics["compute/seconds"], 1), round(metrics["compute/eval_seconds"], 1))
    assert 0 < evaluating and training + evaluating <= in_all


def test_run_holds_params_history_and_artifacts(small_run, tmp_path):
    client, runs, _ = small_run
    run = runs[0]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["stages.pretrain.mix.polynomial"] == "1.0" and params["data.max_len"] == "4"
    history = client.get_metric_history(run.info.run_id, "acc/parity")
    steps = [m.step for m in history]
    assert len(steps) > 5 and steps == sorted(set(steps))
    flops = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "compute/flops"),
                                     key=lambda m: m.step)]
    assert flops == sorted(flops)
    metrics = run.data.metrics
    for key in ("acc/parity/len_4", "loss/train", "compute/examples", "compute/tokens",
                "compute/seconds", "probe/parity/iteration/l1h0", "examples_to_target"):
        assert key in metrics, key
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"curriculum.yaml", "attention.png", "compute_to_accuracy.png"}
    local = client.download_artifacts(run.info.run_id, "attention.png", str(tmp_path))  # not a stray /tmp folder
    with open(local, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, field", [
    (["--device", "nonsense"], "--device"),
    (["--tracking-uri", "./mlruns"], "--tracking-uri"),
    (["--tracking-uri", "sqlite:////no/such/folder/mlflow.db"], "--tracking-uri"),
    (["--tracking-uri", "sqlite:///:memory:"], "--tracking-uri"),  # kept nothing, artifacts in ./mlruns
    (["--tracking-uri", "sqlite://"], "--tracking-uri"),
    (["--tracking-uri", "sqlite:////tmp"], "--tracking-uri"),  # a folder: it trained, then failed to record
    (["--threads", "0"], "--threads"),
    (["--seeds", "0,zero"], "--seeds"),
    (["--seeds", "1,1"], "--seeds"),
    (["--seeds", "-1"], "--seeds"),
    (["--seeds", "1_0"], "--seeds"),  # int() reads it as 10
    (["--seeds", ",".join(map(str, range(65)))], "--seeds"),
    (["--precision", "fp8"], "--precision"),
    (["--budget", "0"], "--budget"),
    (["--budget", "inf"], "--budget"),
    (["--budget", "1e308"], "--budget"),  # twice it, the censored penalty, would be inf
])
def test_bad_options_exit_2_before_anything_starts(tmp_path, capsys, monkeypatch, args, field):
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(SMALL), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0]
    assert list(tmp_path.iterdir()) == []  # no store, no artifacts


def test_a_thread_count_torch_cannot_start_exits_2_at_once(tmp_path):
    """--threads 100,000 crashed torch and 5,000 hung it; 1,024 (a trial's most CPUs, which an
    export's reproduce line repeats) is the limit. A subprocess with a timeout, so that a
    regression fails here instead of hanging the run."""
    import subprocess
    import sys
    from pathlib import Path

    out = subprocess.run([str(Path(sys.executable).parent / "iterhead"), "train", str(SMALL), "--threads", "1025",
                          "--tracking-uri", f"sqlite:///{tmp_path}/m.db"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: --threads: must be from 1 to 1024"), out.stderr[-500:]
    assert list(tmp_path.iterdir()) == []  # no store


def test_a_curriculum_too_large_for_the_memory_fails_in_one_line(tmp_path):
    """Validation bounds a curriculum's data at 1 TiB, past any machine, not at this one's memory:
    data too large for it failed in numpy's allocation with a traceback. A subprocess with its
    address space capped, so the allocation fails on any machine."""
    import os
    import resource
    import subprocess
    import sys

    def cap() -> None:
        # far below the 149 GiB the data asks for, far above what importing torch and MLflow maps
        resource.setrlimit(resource.RLIMIT_AS, (64 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))

    big = tmp_path / "big.yaml"
    big.write_text("name: big\ntasks: {parity: {kind: parity}}\ndata: {max_len: 1, train_per_len: 20000000000, "
                   "test_per_len: 1}\nstages: [{name: s, mix: {parity: 1}, epochs: 1}]\ntarget: {task: parity}\n")
    out = subprocess.run([sys.executable, "-m", "iterhead.search.cli", "train", str(big), "--device", "cpu",
                          "--tracking-uri", f"sqlite:///{tmp_path}/m.db"], capture_output=True, text=True,
                         timeout=120, preexec_fn=cap,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
                              "CUDA_VISIBLE_DEVICES": ""})  # few threads' stacks, no CUDA context under the cap
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-800:]
    assert last.startswith("error: out of memory: Unable to allocate") and "for an array with shape" in last, last


def test_a_gpu_that_other_processes_fill_is_said_so_not_blamed_on_the_sizes():
    """torch's CUDA out-of-memory message says how much of the GPU this process held: under
    half, lower sizes would not have helped. Messages in torch's own words (also as some versions
    spelled them, "capacty"); an allocation this process filled, or numpy's, keep the sizes advice."""
    import torch

    from iterhead.curricula.errors import memory_advice, out_of_memory

    other = ("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.15 GiB of which "
             "6.75 MiB is free. Process 4242 has 70.00 GiB memory in use. Including non-PyTorch memory, this "
             "process has 9.12 GiB memory in use. Of the allocated memory 8.50 GiB is allocated by PyTorch")
    own = ("CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has a total capacty of 23.65 GiB of which "
           "1.66 GiB is free. Including non-PyTorch memory, this process has 20.81 GiB memory in use.")
    sizes = "lower the model's or the data's sizes, or optim.batch_size"
    for message, advice in ((other, "other processes hold most of the GPU's memory (this one held 9.12 GiB of "
                                     "79.15 GiB; nvidia-smi lists them): free it, or choose another GPU"),
                            (own, sizes), (other.replace("capacity", "capacty"), "other processes")):
        err = torch.OutOfMemoryError(message)
        assert out_of_memory(err) and memory_advice(err).startswith(advice), (message, memory_advice(err))
    assert memory_advice(MemoryError("Unable to allocate 149. GiB for an array")) == sizes


@pytest.mark.parametrize("command, file, says", [
    ("train", ROOT / "examples" / "search_small.yaml", "this is a search spec"),
    ("search", SMALL, "this is a curriculum"),
])
def test_a_file_of_the_other_kind_is_named_as_such(tmp_path, capsys, monkeypatch, command, file, says):
    """A search spec given to `train` (or a curriculum to `search`) says so and names the
    command to use, instead of listing the other kind's missing fields."""
    monkeypatch.chdir(tmp_path)
    assert main([command, str(file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and "missing" not in err[0]
    assert list(tmp_path.iterdir()) == []


def test_batched_seeds_write_one_run_per_seed_like_single_runs(tmp_path, float64):
    """`--seeds 0,1` trains both seeds as one model; each seed's run matches its single run.

    In float64, where batched and separate runs agree to about 1e-14 on any CPU (the
    `float64` fixture says why float32 cannot promise that), so the reached epoch and the
    losses can be compared tightly."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(SMALL.read_text().replace("epochs: 60", "epochs: 4").replace("epochs: 150", "epochs: 6"))
    assert main(["train", str(tiny), "--tracking-uri", uri, "--experiment", "together", "--seeds", "0,1"]) == 0
    assert main(["train", str(tiny), "--tracking-uri", uri, "--experiment", "alone"]) == 0
    client = MlflowClient(uri)
    runs = {r.data.params["seed"]: r for r in client.search_runs(
        [client.get_experiment_by_name("together").experiment_id])}
    assert sorted(runs) == ["0", "1"]
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["0"].data.tags["iterhead.batched_seeds"] == "0,1"
    (alone,) = client.search_runs([client.get_experiment_by_name("alone").experiment_id])
    together = runs["0"]
    assert {a.path for a in client.list_artifacts(together.info.run_id)} == {
        a.path for a in client.list_artifacts(alone.info.run_id)}
    for key in ("compute/flops", "compute/examples", "compute_to_target"):
        assert together.data.metrics[key] == alone.data.metrics[key], key
    assert together.data.metrics["loss/train"] == pytest.approx(alone.data.metrics["loss/train"], abs=1e-8)
    assert runs["1"].data.metrics["loss/train"] != together.data.metrics["loss/train"]


def test_sigterm_ends_the_run_killed(tmp_path):
    """A scheduler's SIGTERM mid-training: exit 143 and the run ended KILLED, not left RUNNING."""
    import signal
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cur = tmp_path / "long.yaml"
    cur.write_text(SMALL.read_text().replace("epochs: 60}", "epochs: 100000}"))  # never reaches parity
    proc = subprocess.Popen([sys.executable, "-m", "iterhead.search.cli", "train", str(cur), "--tracking-uri", uri,
                             "--experiment", "term", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # the first evaluation: the run is open and training
            if line.startswith("[pretrain epoch"):
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().endswith("terminated")
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("term").experiment_id])
    assert run.info.status == "KILLED" and run.info.end_time is not None


def search_spec(folder) -> str:
    """A one-trial search spec (and its base) in `folder`; its path."""
    import yaml

    from support import PARITY_BASE

    (folder / "base.yaml").write_text(yaml.safe_dump(PARITY_BASE))
    (folder / "spec.yaml").write_text(yaml.safe_dump({
        "name": "bad-storage", "base": "base.yaml", "space": {"stages.train.epochs": {"grid": [1]}},
        "search": {"algorithm": "grid", "num_samples": 1, "scheduler": "none"}, "resources": {"cpu": 1}}))
    return str(folder / "spec.yaml")


@pytest.mark.parametrize("where", ["afile", "afile/below"])
def test_a_storage_path_that_is_a_file_exits_2_before_ray_or_mlflow(tmp_path, capsys, monkeypatch, where):
    """Not a NotADirectoryError traceback after Ray started and a parent run was left FAILED."""
    from iterhead.search import run

    monkeypatch.setattr(run, "start_ray", no_ray)  # a tripwire: the check must come first
    (tmp_path / "afile").write_text("mine\n")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code = main(["search", search_spec(tmp_path), "--storage-path", str(tmp_path / where), "--tracking-uri", uri])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--storage-path" in err[0] and "afile is not a folder" in err[0]
    assert (tmp_path / "afile").read_text() == "mine\n"
    assert not (tmp_path / "mlflow.db").exists()  # no store, no parent run


def test_ablate_on_a_trial_folder_names_its_newest_checkpoint_folder(tmp_path, capsys):
    """Tune's trial folder holds checkpoint_NNNNNN folders: given the trial's, ablate said only
    that it held no trainer.pt."""
    for step in ("checkpoint_000000", "checkpoint_000002"):
        (tmp_path / step).mkdir()
        (tmp_path / step / "trainer.pt").write_bytes(b"")
    assert main(["ablate", "--checkpoint", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(f"the newest: {tmp_path / 'checkpoint_000002'}"), err


@pytest.mark.parametrize("content", [b"garbage\n", b"", b"PK\x03\x04" + b"x" * 64, b"seed: 0\n"])
def test_ablate_on_a_file_that_is_no_checkpoint_exits_2_with_one_line(tmp_path, capsys, content):
    (tmp_path / "trainer.pt").write_bytes(content)
    assert main(["ablate", "--checkpoint", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--checkpoint" in err[0] and "not a readable checkpoint" in err[0], err


@pytest.mark.parametrize("seeds", [[], ["--seeds", "0,1"]], ids=["one", "seeds"])
def test_a_deleted_experiment_exits_2_before_training(tmp_path, capsys, seeds):
    """It trained to the end first, then ended in MLflow's traceback (exit 1)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("gone", artifact_location=(tmp_path / "mlruns").as_uri()))
    capsys.readouterr()  # MLflow's notes on making the store
    assert main(["train", str(SMALL), "--tracking-uri", uri, "--experiment", "gone", *seeds]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "--experiment: experiment 'gone' is deleted" in err[0], err
    assert "training" not in captured.out


@pytest.mark.parametrize("status, body, code", [
    (501, None, 2),  # no handler for any method: http.server's own page
    (404, b"<!DOCTYPE html><title>Not Found</title>", 2),  # another web server on the port
    (200, b"<html>a web app</html>", 2),  # one that answers every path with its page
    (503, b"<html>Service Unavailable</html>", 1),  # a proxy before a server that may work later
])
def test_a_server_that_is_no_tracking_store_fails_in_one_line_before_training(tmp_path, capsys, monkeypatch,
                                                                                 status, body, code):
    """MLflow's traceback through its retries (139 lines), after the training it could not record.
    The server answers (so `endpoints.check_store` lets it by), but not as MLflow: a URI that names
    no MLflow server is bad input (exit 2, the fix named); a proxy's 503 is a failure while running."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.chdir(tmp_path)
    with web_server(status, body) as uri:
        assert main(["train", str(SMALL), "--tracking-uri", uri]) == code
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    if code == 2:
        assert len(err) == 1 and err[0].startswith(f"error: --tracking-uri: {uri} is no MLflow tracking server: "), err
        assert err[0].endswith("fix the URI (host, port and path) or start one (mlflow_server/start.sh)"), err
    else:
        assert len(err) == 1 and err[0].startswith("error: --tracking-uri: the MLflow store failed: "), err
    assert "training" not in captured.out


def test_a_run_made_after_another_failed_leaves_that_error_to_its_first_answer(monkeypatch):
    """`train --seeds` makes one run per seed; each creation was submitted checking the writes
    before it, so where the first seed's had already failed (a URI that names no MLflow server),
    the second's submit raised that error unmarked: exit 1, not 2, as the race went."""
    from iterhead.curricula.io import load_curriculum
    from iterhead.search.endpoints import first_answer, not_a_tracking_server
    from iterhead.search.tracking import RunWriter
    from iterhead.search.train import LoggedRun

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cur = load_curriculum(SMALL)
    with web_server(200, b"<html>a web app</html>") as uri:
        writer = RunWriter(uri)
        runs = [LoggedRun(writer, cur, "seeds", {}, "seed0")]
        assert runs[0].run.exception() is not None  # failed before the next seed's run is made
        runs.append(LoggedRun(writer, cur, "seeds", {}, "seed1"))
        with pytest.raises(Exception) as failed:
            first_answer(runs[0].run)
        assert not_a_tracking_server(failed.value, uri), failed.value
        for logged in runs:
            logged.end()
        with pytest.raises(Exception):
            writer.close()
