"""Which device a run trains on, and what a CUDA run needs to repeat itself.

The choices are pure functions of what CUDA reports (`pick_device`, `trial_device`), so
every branch is tested on a machine without a GPU; `resolve_device` feeds them torch's
answers.

A Tune trial trains where Ray put it: on the GPU Ray assigned it, else on the CPU, never
on a GPU it was not given (Ray 2.60 leaves ``CUDA_VISIBLE_DEVICES`` untouched for a task
or actor without GPUs, so CUDA there sees every GPU of the node).

Determinism on CUDA: `deterministic_cuda` makes torch use deterministic kernels only (an
op without one raises instead of running), and cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG``
(`prepare_env`, called by the entry points before training starts). With them, a CUDA
run repeats bit for bit, and resumes exactly, on the same GPU model with the same torch
and CUDA versions. Across GPU models, or between a GPU and the CPU, the numbers differ:
CUDA's random numbers (dropout masks) are laid out by launch configurations that follow
the GPU's multiprocessor count, and kernels sum in other orders.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from iterhead.trainable.results import PRECISIONS

CUBLAS_WORKSPACE_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_WORKSPACE = ":4096:8"
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_CAPACITY = "4096"  # oneDNN's default is 1024 (`prepare_env`)
DETERMINISTIC_WORKSPACES = (":4096:8", ":16:8")  # the values torch's deterministic mode accepts
DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def pick_device(name: str, cuda_available: bool, device_count: int) -> torch.device:
    """The device `name` (auto, cpu, cuda, cuda:N) means where CUDA reports these values.

    ``auto`` is CUDA when there is a device, else the CPU. Asking for CUDA without it raises
    `RuntimeError`; a name that is no device, a CUDA index past the visible devices, or a CPU
    index past 0 (torch would train on the one CPU device and record ``cpu:1``), raises
    `ValueError` (at once, not at the first tensor moved there).
    """
    if name == "auto":
        return torch.device("cuda" if cuda_available and device_count > 0 else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a device; use {DEVICE_CHOICES}") from None
    if device.type == "cpu":  # torch accepts cpu:1 and trains on the one CPU device, cores and all
        if device.index:
            raise ValueError(f"{name!r} is not a device: torch has one CPU device, cpu, which runs on all the cores "
                             f"its threads may use (iterhead train --threads sets how many); use {DEVICE_CHOICES}")
        return torch.device("cpu")  # cpu:0 is the same device, recorded as cpu
    if device.type != "cuda":
        raise ValueError(f"{name!r} is not a device iterhead trains on; use {DEVICE_CHOICES}")
    if not cuda_available or device_count < 1:
        build = " (this torch is a CPU build)" if torch.version.cuda is None else ""
        raise RuntimeError(f"{name} was asked for, but no CUDA device is available{build}")
    if device.index is not None and device.index >= device_count:
        raise ValueError(f"{name} does not exist: {device_count} CUDA device(s) are visible, "
                         f"cuda:0 to cuda:{device_count - 1} (CUDA_VISIBLE_DEVICES sets which)")
    return device


def resolve_device(name: str = "auto") -> torch.device:
    """`pick_device` with what this process's torch reports."""
    available = torch.cuda.is_available()
    return pick_device(name, available, torch.cuda.device_count() if available else 0)


def trial_device(gpu_ids: Sequence[int | str], cuda_available: bool, device_count: int) -> torch.device:
    """The device of a Tune trial given ``ray.get_gpu_ids()``: its assigned GPU, else the CPU.

    Ray restricts ``CUDA_VISIBLE_DEVICES`` of a trial with GPUs to the ones it assigned (a
    fractional share gets the shared GPU's id), so the assigned GPU is ``cuda:0`` inside the
    trial. A trial assigned a GPU that torch cannot use (a CPU build, a driver that does
    not match) raises rather than training on the CPU; so does a trial that sees more GPUs
    than it was assigned (``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES`` set), where
    ``cuda:0`` need not be its GPU.
    """
    if not gpu_ids:
        return torch.device("cpu")
    ids = ", ".join(map(str, gpu_ids))
    if not cuda_available or device_count < 1:
        build = "a CPU build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise RuntimeError(f"Ray assigned this trial GPU {ids}, but torch {torch.__version__} ({build}) "
                           "sees no CUDA device: install a CUDA build of torch that matches the "
                           "node's driver, or set resources.gpu to 0 to train on CPUs")
    if device_count > len(gpu_ids):
        raise RuntimeError(f"Ray assigned this trial GPU {ids}, but torch sees {device_count} CUDA "
                           "devices: Ray did not restrict CUDA_VISIBLE_DEVICES (is "
                           "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES set?), so the trial "
                           "cannot tell which device is its own")
    return torch.device("cuda", 0)


def prepare_env() -> None:
    """Settings a library reads once, when a process first uses it, each unless the user set it;
    call before training starts.

    - cuBLAS's workspace for deterministic products: torch's deterministic mode refuses cuBLAS
      calls without one of `DETERMINISTIC_WORKSPACES`.
    - oneDNN's primitive cache, to `ONEDNN_CACHE_CAPACITY` primitives: on a CPU, bf16 matrix
      products and GELU run as oneDNN primitives, one per shape, and one epoch of the paper
      configuration (lengths 1..32) makes 924 of them, an fp32 evaluation 230 more (a bf16 one
      919), past oneDNN's default of 1024, so the epoch after each evaluation rebuilt the ones
      the evaluation had evicted (`benchmarks/primitive_cache.py`, BENCHMARKS.md). A bf16
      product's primitive holds 0.4 to 0.8 MB (measured on an AMD EPYC with AVX-512 bf16), and
      a bf16 evaluation meets new shapes as its rows stop at other places (30 to 80 more an
      evaluation there), so a long run with `eval.precision: bf16` may come to hold the whole
      capacity, 4096 x 0.4 to 0.8 MB = 1.6 to 3.3 GB, where 1024 held under 1 GB; fp32's GELU
      primitives take a few kB.
    """
    os.environ.setdefault(CUBLAS_WORKSPACE_ENV, CUBLAS_WORKSPACE)
    os.environ.setdefault(ONEDNN_CACHE_ENV, ONEDNN_CACHE_CAPACITY)


def deterministic_cuda(device: torch.device) -> None:
    """On CUDA, deterministic kernels only for this process (module docstring); else nothing.

    Strict, not ``warn_only``: with ``warn_only`` the fused attention backward kernels keep
    their non-deterministic defaults and only warn, so a run would not repeat.
    """
    if device.type != "cuda":
        return
    prepare_env()
    workspace = os.environ[CUBLAS_WORKSPACE_ENV]
    if workspace not in DETERMINISTIC_WORKSPACES:
        raise RuntimeError(f"{CUBLAS_WORKSPACE_ENV}={workspace} makes cuBLAS non-deterministic; unset it "
                           f"or set it to {' or '.join(DETERMINISTIC_WORKSPACES)}")
    torch.use_deterministic_algorithms(True)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 in hardware: a CUDA GPU with bf16 units (Ampere and
    later, or a ROCm GPU torch counts as such), or a CPU with AVX-512 bf16 or AMX tiles
    (where oneDNN runs bf16 matmuls natively). `torch.cuda.is_bf16_supported()` asks about
    the current device and by default also counts GPUs that only emulate bf16 (a V100 or a
    T4 makes bf16 tensors), so it is asked about `device`, without emulation."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            try:
                return torch.cuda.is_bf16_supported(including_emulation=False)
            except TypeError:  # a torch before that argument: natively from compute capability 8.0 (Ampere)
                return torch.version.hip is not None or torch.cuda.get_device_capability(device) >= (8, 0)
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


BF16_MIN_D_MODEL = 128  # on CPUs, bf16 steps pay from this width (measured: `resolve_precision`)
BF16_MIN_D_MODEL_CUDA = 768  # on CUDA, the narrowest width measured to pay (`resolve_precision`)


def pick_precision(name: str, native: bool, wide: bool = True) -> str:
    """``auto`` is bf16 training (fp32 weights and optimiser; the evaluation stays fp32 unless
    `eval.precision` says otherwise) where the hardware has native bf16 and the model is
    `wide` enough for it to pay, fp32 elsewhere; fp32 and bf16 force one. BENCHMARKS.md
    holds the evidence that bf16 training reaches the target as fp32 does, and where it is
    faster."""
    if name not in PRECISIONS:
        raise ValueError(f"{name!r} is not a precision; use {', '.join(PRECISIONS)}")
    if name != "auto":
        return name
    return "bf16" if native and wide else "fp32"


def resolve_precision(name: str, device: torch.device, d_model: int) -> str:
    """`pick_precision` with what `device` reports, for a model `d_model` wide.

    bf16 pays only where matrix products dominate a step; narrower models train in fp32.
    On a CPU that is from `BF16_MIN_D_MODEL`: measured on a 2-core Xeon with AMX, d_model 64
    at batch 64 stepped 1.08 to 1.29x slower in bf16 (casts and bf16 elementwise kernels
    outweigh the small products), d_model 128 and up 0.49 to 0.94x. That line moves with the
    tokens a step: on a 2-core AMD EPYC with AVX-512 bf16, d_model 64 took 0.94x fp32's epoch
    at batch 64 with lengths 1..8 and 0.65x at batch 256 with the paper's data, so the CPU
    threshold stays until both kinds are timed at the same sizes. On CUDA it is from
    `BF16_MIN_D_MODEL_CUDA`: on H200s (`benchmarks/precision_width.py`, BENCHMARKS.md) a
    paper-data epoch at batch 256 took 1.07 to 1.11x fp32's time in bf16 at d_model 128 to
    512 in two runs, where the host's kernel launches set the pace and bf16 adds casts;
    0.49x at 768, and 0.31 to 0.49x at 1024. 513 to 767 were not timed."""
    if name != "auto":
        return pick_precision(name, False)
    return pick_precision(name, native_bf16(device), wide_enough(device.type, d_model))


def wide_enough(device_type: str, d_model: int) -> bool:
    """Whether a model `d_model` wide is at or past the narrowest width measured to train faster
    in bf16 on a `device_type` with native bf16."""
    return d_model >= (BF16_MIN_D_MODEL_CUDA if device_type == "cuda" else BF16_MIN_D_MODEL)
