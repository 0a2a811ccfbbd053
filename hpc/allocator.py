"""Run the solver's command-line tools (hpc.homogenize, hpc.evaluate) on tcmalloc when
it is installed.

The solver allocates and frees field-sized temporaries (tens of MB to GB) every
iteration. With glibc's malloc each of those above its mmap threshold (at most
32 MiB) is a fresh mapping: the kernel zero-fills it page by page on first touch, and
blocks below the threshold are kept on the heap after free, which inflates the resident
set of decomposed runs. tcmalloc reuses freed spans without those faults. Measured
(BENCHMARKS.md, "Memory allocator"; 96^3 multigrid-PCG, 2 threads): solve 40.4 s with
18.5 s of system time on glibc, 20.8 s with 0.9 s on tcmalloc, and a lower peak RSS. This is the
allocator swap the PyTorch CPU performance guide recommends.

``reexec_with_tcmalloc`` replaces the current process (same PID, before MPI is
initialised, so mpirun and srun see the same rank) by itself with tcmalloc preloaded.
``HPC_ALLOCATOR=system`` keeps glibc. Debian: ``apt-get install libtcmalloc-minimal4``
(scripts/setup_env.sh installs it).
"""
from __future__ import annotations

import glob
import os
import sys
from typing import Optional, Sequence

ENV = "HPC_ALLOCATOR"
_PATTERNS = ("/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc_minimal.so.4",
             "/usr/lib/libtcmalloc_minimal.so.4", "/usr/local/lib/libtcmalloc_minimal.so.4")


def find_tcmalloc() -> Optional[str]:
    """Path of libtcmalloc_minimal.so.4, or None."""
    for pat in _PATTERNS:
        hits = sorted(glob.glob(pat))
        if hits:
            return hits[0]
    return None


def active_allocator() -> str:
    """'tcmalloc' if this process has tcmalloc mapped, else 'system'."""
    try:
        with open("/proc/self/maps") as f:
            return "tcmalloc" if "tcmalloc" in f.read() else "system"
    except OSError:
        return "system"


def reexec_with_tcmalloc(args: Sequence[str]) -> None:
    """exec ``python *args`` (e.g. ``["-m", "hpc.homogenize", *sys.argv[1:]]`` or
    ``sys.argv`` for a script) with tcmalloc preloaded, unless it is already loaded,
    not installed, already tried (LD_PRELOAD names it) or HPC_ALLOCATOR=system.
    Returns only when nothing was done. Call it before MPI is initialised."""
    if os.environ.get(ENV, "tcmalloc").lower() == "system":
        return
    if "tcmalloc" in os.environ.get("LD_PRELOAD", "") or active_allocator() == "tcmalloc":
        return
    lib = find_tcmalloc()
    if lib is None:
        return
    env = dict(os.environ)
    env["LD_PRELOAD"] = (lib + " " + env.get("LD_PRELOAD", "")).strip()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args], env)
