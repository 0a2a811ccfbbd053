"""Time solver.homogenize on a gyroid-sheet cell on P ranks (run it under mpirun).

    OMP_NUM_THREADS=1 mpirun --allow-run-as-root -n P python bench/bench_mpi_homogenize.py \
        --n 64 --precision float32 --pc jacobi --rtol 1e-4

Prints one table row (rank 0): ranks, process grid, grid, precision, preconditioner,
iterations, setup / solve / total seconds, C11, plus the machine and versions.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "mpi"))

if __name__ == "__main__":          # on tcmalloc like hpc.homogenize, before MPI starts
    from hpc.allocator import reexec_with_tcmalloc
    reexec_with_tcmalloc(sys.argv)

import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

from cells import gyroid_cell  # noqa: E402
from hpc.parallel import run_collectively, setup_parallel  # noqa: E402
from solver import homogenize  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, nargs="+", default=[64])
    p.add_argument("--precision", default="float32")
    p.add_argument("--pc", default="jacobi")
    p.add_argument("--rtol", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--align", default="multigrid")
    p.add_argument("--save", help="write C and iterations (rank 0) to this .json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    comm = MPI.COMM_WORLD
    shape = tuple(a.n * 3 if len(a.n) == 1 else a.n)
    cell = gyroid_cell(shape)                       # every rank builds it; each keeps its block
    align = int(a.align) if a.align.isdigit() else a.align
    domain, local = setup_parallel(cell, comm, align=align)
    comm.Barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    res = homogenize(local, rtol=a.rtol, precision=a.precision, preconditioner=a.pc, domain=domain)
    comm.Barrier()
    wall = time.perf_counter() - t0
    cpu = comm.gather(time.process_time() - c0)   # per-rank CPU seconds: the work split
    if comm.rank == 0:
        d = domain.describe()
        print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}, {MPI.Get_library_version().splitlines()[0]}, "
              f"threads/rank {a.threads}, {time.strftime('%Y-%m-%d')}")
        print("ranks  dims     grid         prec     pc      iters(max)  setup_s  solve_s  total_s  cpu_s/rank(max)  C11")
        print(f"{comm.size:<6d} {'x'.join(map(str, d['dims'])):<8s} {'x'.join(map(str, shape)):<12s} "
              f"{a.precision:<8s} {a.pc:<7s} {max(res.iterations):<11d} {res.times['setup']:<8.2f} "
              f"{res.times['solve']:<8.2f} {wall:<8.2f} {max(cpu):<16.2f} {res.C[0, 0]:.6e}")
        if a.save:
            import json
            with open(a.save, "w") as f:
                json.dump({"C": res.C.tolist(), "iterations": res.iterations, "ranks": comm.size}, f)
        print(f"# load average {os.getloadavg()[0]:.1f} (other jobs share the cores)")


if __name__ == "__main__":
    run_collectively(main)
