"""Host memory that training frees stays in the process (glibc), instead of being faulted in again at the next step.

glibc's malloc gives large freed blocks back to the OS: blocks above its mmap threshold are unmapped on free, and
free space at the top of the heap beyond its trim threshold is released. Both thresholds adapt to the blocks it
sees, but batches of varying shapes (length-grouped, prompt-shared rows) keep meeting new sizes. Every tensor
placed in memory given back is then page-faulted in and zeroed by the kernel again, which slows the early steps
(benchmarks/README.md has the fault counts); with this setting only the steps whose batch is the widest yet fault.

`keep_freed_host_memory` fixes both thresholds: blocks up to 32 MB (glibc's largest mmap threshold) come from the
heap, and the heap keeps up to 2 GB of free space at its top. What a run frees is then reused by the next step. The
cost is that the process does not shrink after a memory peak (its peak is unchanged). No effect on the values
computed; a no-op where the C library has no `mallopt` (macOS, musl).
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
MMAP_THRESHOLD = 32 * 2**20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int


def keep_freed_host_memory() -> bool:
    """Set glibc's mmap and trim thresholds as the module docstring says. Returns whether both were accepted."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.info("no mallopt in this C library: host memory is managed as before")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
