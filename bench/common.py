"""Shared helpers for the benchmark scripts: machine facts, peak memory, tables."""
from __future__ import annotations

import datetime
import os
import subprocess
import sys

from hpc.memory import peak_rss_mb  # noqa: F401  (re-exported for the bench scripts)


def machine() -> dict:
    import numpy
    import torch
    from hpc.results import cpu_model
    cpu = cpu_model()
    mem = ""
    try:
        with open("/proc/meminfo") as fh:
            mem = f"{int(fh.readline().split()[1]) / 2**20:.0f} GiB"
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = ""
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "cpu": cpu, "cores": os.cpu_count(), "memory": mem,
            "python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__,
            "torch_threads": torch.get_num_threads(), "commit": commit}


def machine_line(m: dict) -> str:
    from hpc.allocator import active_allocator
    return (f"{m['date']}; {m['cpu']}, {m['cores']} cores, {m['memory']}; Python {m['python']}, "
            f"torch {m['torch']} ({m['torch_threads']} threads), numpy {m['numpy']}, "
            f"allocator {active_allocator()}; commit {m['commit']}")


def on_tcmalloc() -> None:
    """Re-run this bench script on tcmalloc, as the command-line tools run
    (hpc.allocator; HPC_ALLOCATOR=system to measure glibc malloc instead)."""
    from hpc.allocator import reexec_with_tcmalloc
    reexec_with_tcmalloc(sys.argv)


def allocator_env(alloc: str, threads: int) -> dict:
    """Environment of a child process that runs on ``alloc`` ('system' = glibc malloc, or
    'tcmalloc', preloaded) with ``threads`` OpenMP threads, and does not re-run itself."""
    from hpc.allocator import find_tcmalloc
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env.update(OMP_NUM_THREADS=str(threads), HPC_ALLOCATOR="system")   # no re-exec in the child
    if alloc == "tcmalloc":
        lib = find_tcmalloc()
        if lib is None:
            raise SystemExit("tcmalloc not found: apt-get install libtcmalloc-minimal4")
        env["LD_PRELOAD"] = lib
    return env


def markdown_table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def update_section(path: str, marker: str, text: str) -> None:
    """Replace the block between <!-- marker --> and <!-- /marker --> in path (or append)."""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    body = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in body and end in body:
        body = body[:body.index(start)] + block + body[body.index(end) + len(end):]
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(body)
    os.replace(tmp, path)
