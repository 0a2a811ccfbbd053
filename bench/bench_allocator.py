"""glibc malloc vs tcmalloc for the same solve (why the CLI runs on tcmalloc).

    python bench/bench_allocator.py --n 96 [--preconditioner multigrid] [--write]

Runs bench_jacobi.py's single case (gyroid sheet VF 0.2, float32, rtol 1e-6) in a
fresh process per allocator and reports wall, user and system CPU time (the kernel's
page zeroing of fresh mappings shows up as system time) and peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from common import allocator_env, machine, machine_line, markdown_table, update_section  # noqa: E402


def run(alloc: str, n: int, pc: str, threads: int) -> dict:
    env = allocator_env(alloc, threads)
    cmd = [sys.executable, os.path.join(HERE, "bench_jacobi.py"), "--one", "gyroid-sheet-0.20", str(n),
           "--precision", "float32", "--preconditioner", pc]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"{alloc} run failed:\n{out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r.update(alloc=alloc, wall=wall, user=r1.ru_utime - r0.ru_utime, sys=r1.ru_stime - r0.ru_stime)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[96])
    ap.add_argument("--preconditioner", default="multigrid", choices=["multigrid", "jacobi"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    a = ap.parse_args()
    rows = []
    for n in a.n:
        for alloc in ("system", "tcmalloc"):
            r = run(alloc, n, a.preconditioner, a.threads)
            rows.append(r)
            print(f"n={n} {alloc:9s} wall {r['wall']:.1f} s solve {r['solve_s']:.1f} s user {r['user']:.1f} s "
                  f"sys {r['sys']:.1f} s peak {r['peak_mb']:.0f} MB it {max(r['iterations'])}", flush=True)
    m = machine()
    table = markdown_table(
        ["n", "allocator", "iterations", "setup s", "solve s", "process wall s", "user CPU s", "system CPU s",
         "peak RSS MB"],
        [[r["n"], "glibc malloc" if r["alloc"] == "system" else "tcmalloc", max(r["iterations"]),
          f"{r['setup_s']:.2f}", f"{r['solve_s']:.1f}", f"{r['wall']:.1f}", f"{r['user']:.1f}", f"{r['sys']:.1f}",
          f"{r['peak_mb']:.0f}"] for r in rows])
    text = (f"## Memory allocator: glibc malloc vs tcmalloc ({a.preconditioner}-PCG, float32, {a.threads} threads)\n\n"
            f"Machine: {machine_line(m)} (the table's rows set their own allocator).\n"
            f"Command: `python bench/bench_allocator.py --n {' '.join(map(str, a.n))} --preconditioner "
            f"{a.preconditioner} --write` (gyroid sheet VF 0.2, rtol 1e-6, six load cases, a fresh process "
            f"per row).\n\n{table}\n\n"
            "With glibc every field-sized temporary above its mmap threshold (at most 32 MiB) is a new "
            "mapping that the kernel zero-fills page by page (system time); tcmalloc reuses freed spans. "
            "The command-line tools therefore re-run themselves on tcmalloc when it is installed "
            "(hpc/allocator.py; `HPC_ALLOCATOR=system` to opt out) and record the allocator in the result.\n")
    print(text)
    if a.write:
        update_section(os.path.join(os.path.dirname(HERE), "BENCHMARKS.md"), "bench-allocator", text)


if __name__ == "__main__":
    main()
