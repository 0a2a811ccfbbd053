"""Process memory: peak RSS and giving freed field buffers back to the OS.

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB on
64-bit), after which blocks of that size come from the heap, and freed heap memory
is often kept by the process. For a solver that allocates and frees many
field-sized temporaries (tens to hundreds of MB) that inflates the resident set well
above what is live. ``fix_mmap_threshold`` sets a fixed threshold (which also
turns the dynamic adjustment off), so every field-sized block is its own mapping
and is unmapped on free. Measured effect: tests/mpi/peak_memory.py, BENCHMARKS.md.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import resource

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def fix_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Serve allocations >= ``nbytes`` by mmap (returned to the OS on free). Returns
    False where the C library has no mallopt (not glibc): then nothing changes."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, int(nbytes)) == 1
    ok &= mallopt(M_TRIM_THRESHOLD, int(2 * nbytes)) == 1
    return bool(ok)


def peak_rss_mb() -> float:
    """The process's peak resident set so far, MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
