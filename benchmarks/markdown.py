"""What every benchmark script shares: the CPU it ran on, and its own section of BENCHMARKS.md."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def cpu_model() -> str:
    """The CPU's model name (what `lscpu` shows), for the record."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_kind() -> str:
    """The CPU's maker and its widest matrix instructions, e.g. "AMD EPYC with AVX2": the
    project's machines change kind between runs, and a figure holds for its kind only."""
    import torch

    name = " ".join(w for w in cpu_model().replace("(R)", "").replace("(TM)", "").split()
                    if w not in ("Processor", "CPU"))
    if torch.cpu._is_amx_tile_supported():
        isa = "AMX"
    elif torch.cpu._is_avx512_bf16_supported():
        isa = "AVX-512 bf16"
    else:
        isa = torch.backends.cpu.get_cpu_capability().replace("AVX512", "AVX-512")
    return f"{name} with {isa}"


def cpu_run_line(threads: int) -> str:
    """The machine and its state at the end of a CPU run, for a section's first sentence."""
    import os

    import torch

    from iterhead.trainable.devices import native_bf16

    native = "yes" if native_bf16(torch.device("cpu")) else "no"
    return (f"{os.cpu_count()} CPUs ({cpu_model()}; native bf16: {native}), torch {torch.__version__}, "
            f"{threads} threads, load average {os.getloadavg()[0]:.2f} at the end")


def replace_section(path: Path, heading: str, lines: list[str]) -> None:
    """Put a script's section (from `heading` to the next `## `) in place, or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    new = "\n".join(lines).strip("\n") + "\n"
    start = text.find(heading + "\n")
    if start < 0:
        path.write_text(text.rstrip("\n") + "\n\n\n" + new)
        return
    end = text.find("\n## ", start + len(heading))
    rest = "" if end < 0 else "\n\n" + text[end + 1:]
    path.write_text(text[:start] + new + rest)


def write_kind_section(out: str, heading: str, lines: list[str]) -> None:
    """Write `lines` into BENCHMARKS.md-like `out` under `heading` and this machine's kind."""
    title = f"{heading}: {machine_kind()}"
    replace_section(Path(out), title, [title, "", *lines])


def device_heading(heading: str, device: torch.device) -> tuple[str, str]:
    """`heading` with the machine kind and, on CUDA, the GPU's name (a figure holds for that
    pair); and the device's name as the text calls it."""
    import torch

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{heading}: {machine_kind()}" + (f" and {name}" if device.type == "cuda" else ""), name
