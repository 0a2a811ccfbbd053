"""Process memory accounting for the benchmarks and the memory tests."""
from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """The process's peak resident set so far, MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
