"""Keep freed tensor memory in the process on Linux, so a CPU training step stops page-faulting.

glibc's malloc serves large blocks (its threshold starts at 128 KiB) with fresh ``mmap``
pages and returns them on free, so every step's activations, tens of MB, are faulted in
page by page again. `keep_freed_memory` raises the threshold to glibc's maximum (32 MiB)
and stops trimming the heap below 1 GiB: blocks are then reused from one step to the next.
Nothing numerical changes; the process keeps up to 1 GiB of freed heap instead of handing
it back.

It is a process-wide setting, made once, and a no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling for the threshold on 64-bit machines
TRIM_THRESHOLD = 2**30


@functools.cache
def keep_freed_memory() -> bool:
    """Set the two thresholds once per process; whether glibc took them."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): leave malloc alone
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
