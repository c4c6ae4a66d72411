"""Keep freed host memory in the process so every merge does not page-fault its output in again.

A merge allocates one output tensor per weight, and glibc serves allocations above its mmap
threshold (128 KiB, adapting up to 32 MiB) with fresh ``mmap`` pages that ``free`` hands straight
back to the kernel. The next candidate's merge then faults every page in again: on this project's
CPU boxes that made a 64 MiB task-arithmetic merge 7× slower than the same arithmetic into a
reused buffer (105 ms vs 14 ms; benchmarks/README.md). Raising the mmap and trim thresholds makes
freed blocks stay in the heap for the next merge, which asks for the same sizes again.

The trade-off is that the process's resident size stays at its high-water mark instead of
shrinking between merges, which is what a worker that merges the same shapes all night needs.
Only glibc has ``mallopt``; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["retain_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


@functools.cache
def retain_freed_memory() -> bool:
    """Tune this process's glibc allocator for repeated same-size merges; True if it applied."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    # 1 GiB: above any single weight tensor we merge; 2 GiB − 1 is mallopt's largest int.
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
