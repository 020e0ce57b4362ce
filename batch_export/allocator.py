"""Keep freed heap memory in the process instead of handing it back to the kernel at once.

A download receives its body as ~64-256 KiB ``bytes`` objects (one per socket read, made by
asyncio) that live for a moment and are freed in the order they came. With glibc's defaults
(``M_TRIM_THRESHOLD`` 128 KiB, raised dynamically to twice the largest freed mmap chunk) the
freed top of the heap is returned with ``brk`` over and over, and the next reads fault fresh,
zeroed pages in again: on the benchmark machine (a VM) that page-fault churn cost more system
time than writing the bytes to the page cache (profiled with ``perf``: ``__brk`` and
``exc_page_fault`` under ``memmove``; a 2 GiB download took 6.0-6.3 s with the defaults and
3.7-3.9 s with the settings below, see ``benchmarks/RESULTS.md``).

:func:`keep_freed_memory` sets a fixed trim threshold and mmap threshold with ``mallopt(3)``. It is
process-wide, so only the CLI calls it (the Python API leaves the host process's allocator
alone; a host may call it too). It does nothing where the C library is not glibc, or where the
operator already tunes glibc's allocator through ``GLIBC_TUNABLES`` or ``MALLOC_*_`` variables.
"""

from __future__ import annotations

import ctypes
import os
import platform

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

#: Free bytes at the top of the heap kept before trimming (bytes): above the few MiB of pieces
#: and socket reads that a run's downloads hold at once.
TRIM_THRESHOLD = 64 * 1024 * 1024
#: Allocations at least this large get their own mmap (bytes); below it they come from the
#: heap and are reused. A fixed value also stops glibc's dynamic adjustment.
MMAP_THRESHOLD = 4 * 1024 * 1024

# From glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(environ: dict[str, str] | None = None) -> bool:
    """Set glibc's trim and mmap thresholds (:data:`TRIM_THRESHOLD`, :data:`MMAP_THRESHOLD`).

    Args:
        environ: the environment to check for the operator's own settings (default ``os.environ``).

    Returns:
        True if both were set; False where it did nothing (not glibc, tuned by the operator,
        or ``mallopt`` refused).
    """
    env = os.environ if environ is None else environ
    if "GLIBC_TUNABLES" in env or any(name.startswith("MALLOC_") for name in env):
        return False
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    )
