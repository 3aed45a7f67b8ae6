"""Device choice on CPU: every branch with CUDA's answers faked, never a GPU needed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from iterhead.search.cli import main
from iterhead.trainable import devices
from iterhead.trainable.devices import pick_device, resolve_device, trial_device

from support import ROOT

SMALL = ROOT / "examples" / "poly_then_parity_small.yaml"


@pytest.mark.parametrize("name, available, count, expected", [
    ("auto", False, 0, "cpu"),
    ("auto", True, 2, "cuda"),
    ("cpu", True, 2, "cpu"),
    ("cpu:0", False, 0, "cpu"),  # the same device, recorded as cpu
    ("cuda", True, 1, "cuda"),
    ("cuda:0", True, 1, "cuda:0"),
    ("cuda:1", True, 2, "cuda:1"),
])
def test_pick_device_names_what_exists(name, available, count, expected):
    assert pick_device(name, available, count) == torch.device(expected)


@pytest.mark.parametrize("name, count", [("cuda:1", 1), ("cuda:3", 2), ("cuda:2", 2)])
def test_a_cuda_index_past_the_visible_devices_fails_at_once(name, count):
    with pytest.raises(ValueError, match=rf"{name} does not exist: {count} CUDA device\(s\) are visible"):
        pick_device(name, True, count)


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_an_error(name):
    with pytest.raises(RuntimeError, match="no CUDA device is available"):
        pick_device(name, False, 0)


@pytest.mark.parametrize("name", ["nonsense", "gpu", "cuda:-1", "meta", ""])
def test_a_name_that_is_no_device_is_an_error(name):
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        pick_device(name, True, 1)


@pytest.mark.parametrize("name", ["cpu:1", "cpu:7"])
def test_a_cpu_index_past_0_is_an_error(tmp_path, capsys, monkeypatch, no_workspace, name):
    """torch accepted cpu:1, trained on the one CPU device with every core, and the run recorded cpu:1."""
    monkeypatch.setenv(devices.ONEDNN_CACHE_ENV, "")  # train's prepare_env sets it: restored after the test
    monkeypatch.delenv(devices.ONEDNN_CACHE_ENV)
    with pytest.raises(ValueError, match="torch has one CPU device, cpu"):
        pick_device(name, False, 0)
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(SMALL), "--device", name]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --device: {name!r} is not a device: torch has one"), err
    assert list(tmp_path.iterdir()) == []  # nothing started


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_resolve_device_here_refuses_cuda_3():
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="cuda:3 was asked for, but no CUDA device is available"):
        resolve_device("cuda:3")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
@pytest.mark.parametrize("device", ["cuda:3", "cuda"])
def test_cli_train_turns_a_missing_cuda_device_into_exit_2(tmp_path, capsys, monkeypatch, no_workspace, device):
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(SMALL), "--device", device]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --device: ") and device in err[0]
    assert list(tmp_path.iterdir()) == []  # nothing started


def test_a_trial_without_gpus_trains_on_the_cpu_even_where_cuda_sees_gpus():
    assert trial_device([], True, 8) == torch.device("cpu")
    assert trial_device([], False, 0) == torch.device("cpu")


@pytest.mark.parametrize("ids, count", [([0], 1), (["3"], 1), ([2], 1), ([0, 1], 2),
                                        (["GPU-5f0c8f3e-uuid"], 1)])
def test_a_trial_with_a_gpu_trains_on_its_gpu_as_cuda_0(ids, count):
    """Ray narrows CUDA_VISIBLE_DEVICES to the assigned ids, a fractional share included."""
    assert trial_device(ids, True, count) == torch.device("cuda", 0)


@pytest.mark.parametrize("available, count", [(False, 0), (True, 0)])
def test_a_trial_given_a_gpu_that_torch_cannot_use_fails_loudly(available, count):
    with pytest.raises(RuntimeError, match=r"assigned this trial GPU 1.*sees no CUDA device.*resources\.gpu"):
        trial_device([1], available, count)


def test_a_trial_that_sees_gpus_it_was_not_given_fails_loudly():
    with pytest.raises(RuntimeError, match="sees 4 CUDA devices.*CUDA_VISIBLE_DEVICES"):
        trial_device([2], True, 4)


def test_cpu_runs_leave_torchs_deterministic_mode_alone():
    before = torch.are_deterministic_algorithms_enabled()
    devices.deterministic_cuda(torch.device("cpu"))
    assert torch.are_deterministic_algorithms_enabled() == before


@pytest.fixture
def no_workspace(monkeypatch):
    """CUBLAS_WORKSPACE_CONFIG unset during the test, and as it was afterwards."""
    monkeypatch.setenv(devices.CUBLAS_WORKSPACE_ENV, "")  # records the value to restore
    monkeypatch.delenv(devices.CUBLAS_WORKSPACE_ENV)


def test_cuda_runs_get_strict_deterministic_kernels_and_a_cublas_workspace(no_workspace, restore_determinism):
    """Strict: with warn_only the fused attention backward keeps its non-deterministic default."""
    torch.use_deterministic_algorithms(False)
    devices.deterministic_cuda(torch.device("cuda", 0))  # sets flags only; nothing runs on a GPU
    assert os.environ[devices.CUBLAS_WORKSPACE_ENV] == ":4096:8"
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()


def test_prepare_env_keeps_a_workspace_the_user_chose(monkeypatch):
    monkeypatch.setenv(devices.CUBLAS_WORKSPACE_ENV, ":16:8")
    devices.prepare_env()
    assert os.environ[devices.CUBLAS_WORKSPACE_ENV] == ":16:8"


ONEDNN_SHAPES = """
import sys
import torch
import torch.nn.functional as F
if sys.argv[1] == "prepared":
    from iterhead.trainable.devices import prepare_env
    prepare_env()
for _ in range(2):  # each shape twice: a miss the second time is a primitive the cache evicted
    for n in range(1, {shapes} + 1):
        F.gelu(torch.ones(n, 3))  # on a CPU, a oneDNN eltwise primitive per shape
"""


@pytest.mark.parametrize("how, misses_per_shape", [("prepared", 1), ("as-is", 2)])
def test_prepare_env_keeps_more_onednn_primitives_than_the_default(tmp_path, how, misses_per_shape):
    """1100 shapes, over oneDNN's default capacity of 1024: it rebuilds each the second time
    round (the least recently used goes first), while `prepare_env`'s capacity keeps them all."""
    shapes = 1100
    env = {k: v for k, v in os.environ.items() if k != devices.ONEDNN_CACHE_ENV}
    out = subprocess.run([sys.executable, "-c", ONEDNN_SHAPES.format(shapes=shapes), how], check=True,
                         capture_output=True, text=True, env={**env, "ONEDNN_VERBOSE": "2"}, cwd=tmp_path).stdout
    assert out.count("create:cache_miss") == misses_per_shape * shapes


def test_prepare_env_keeps_a_primitive_cache_capacity_the_user_chose(monkeypatch):
    monkeypatch.setenv(devices.ONEDNN_CACHE_ENV, "64")
    devices.prepare_env()
    assert os.environ[devices.ONEDNN_CACHE_ENV] == "64"


def test_a_non_deterministic_cublas_workspace_is_refused(monkeypatch, restore_determinism):
    monkeypatch.setenv(devices.CUBLAS_WORKSPACE_ENV, ":0:0")
    with pytest.raises(RuntimeError, match="CUBLAS_WORKSPACE_CONFIG=:0:0 makes cuBLAS non-deterministic"):
        devices.deterministic_cuda(torch.device("cuda"))



class Built(Exception):
    """Raised by a stand-in Trainer: the trial got as far as building it, on this device."""


def test_a_trial_asks_ray_which_gpu_it_was_given(monkeypatch, no_workspace):
    """The trainable's wiring, without Ray: no GPU assigned trains on the CPU however many GPUs
    CUDA shows; a GPU assigned where torch has no CUDA fails the trial before it trains."""
    import copy

    from iterhead.trainable import tune as trainable

    from support import PARITY_BASE

    def trainer(cur, device, state=None, precision="fp32"):
        raise Built(str(device))

    monkeypatch.setattr(trainable.tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr(trainable, "Trainer", trainer)
    monkeypatch.setattr(trainable.ray, "get_gpu_ids", lambda: [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    with pytest.raises(Built, match="^cpu$"):
        trainable.train_trial({}, base=copy.deepcopy(PARITY_BASE), smoke=True, precision="fp32")

    monkeypatch.setattr(trainable.ray, "get_gpu_ids", lambda: [0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(RuntimeError, match="Ray assigned this trial GPU 0"):
        trainable.train_trial({}, base=copy.deepcopy(PARITY_BASE), smoke=True, precision="fp32")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(Built, match="^cuda:0$"):
        trainable.train_trial({}, base=copy.deepcopy(PARITY_BASE), smoke=True, precision="fp32")


def test_auto_precision_is_bf16_only_where_the_hardware_has_it():
    from iterhead.trainable.devices import pick_precision

    assert pick_precision("auto", native=True) == "bf16"
    assert pick_precision("auto", native=False) == "fp32"
    assert pick_precision("fp32", native=True) == "fp32"  # one setting away: the exact old behaviour
    assert pick_precision("bf16", native=False) == "bf16"
    with pytest.raises(ValueError, match="'fp16' is not a precision; use auto, fp32, bf16"):
        pick_precision("fp16", native=True)


def test_auto_precision_on_a_cpu_keeps_narrow_models_in_fp32():
    from iterhead.trainable.devices import BF16_MIN_D_MODEL, native_bf16, resolve_precision

    cpu = torch.device("cpu")
    wide = "bf16" if native_bf16(cpu) else "fp32"
    assert resolve_precision("auto", cpu, BF16_MIN_D_MODEL) == wide
    assert resolve_precision("auto", cpu, BF16_MIN_D_MODEL // 2) == "fp32"
    assert resolve_precision("bf16", cpu, 16) == "bf16"  # forcing is never overridden


def test_bf16_pays_on_cuda_only_for_wide_models():
    """Measured on H200s: bf16 epochs were slower up to d_model 512, twice as fast at 768."""
    from iterhead.trainable.devices import BF16_MIN_D_MODEL, BF16_MIN_D_MODEL_CUDA, wide_enough

    assert not wide_enough("cuda", 128) and not wide_enough("cuda", 512)
    assert wide_enough("cuda", 768) and wide_enough("cuda", 1024)
    assert wide_enough("cuda", BF16_MIN_D_MODEL_CUDA) and not wide_enough("cuda", BF16_MIN_D_MODEL_CUDA - 1)
    assert wide_enough("cpu", BF16_MIN_D_MODEL) and not wide_enough("cpu", BF16_MIN_D_MODEL // 2)


def test_cuda_visible_devices_counts_no_more_gpus_than_the_machine_has(monkeypatch):
    """The variable alone counted GPUs on a machine without one: a search's trials asking for a
    GPU were each assigned one, and each failed three times."""
    from iterhead.search.run import local_gpus

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    present = local_gpus()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(present + 3))))
    assert local_gpus() == present
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert local_gpus() == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-a,MIG-b,MIG-c")  # instances of one GPU: Ray gives one a trial
    assert local_gpus() == 3
