"""Halo exchange vs operator apply under MPI (is overlapping them worth it? docs/scaling.md).

    OMP_NUM_THREADS=1 mpirun -n 2 python bench/bench_halo.py --n 128

Times, on the rank's block of an n^3 gyroid sheet (float32, six load cases): one
operator apply, Domain.ghost (one high-side layer), Domain.accumulate (minus a clone of
its input, which accumulate modifies in place), a plain clone of the ghosted block
(the local-copy part of both) and one dot product.
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests", "mpi"))

if __name__ == "__main__":          # on tcmalloc like hpc.homogenize, before MPI starts
    from hpc.allocator import reexec_with_tcmalloc
    reexec_with_tcmalloc(sys.argv)

import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

from cells import gyroid_cell  # noqa: E402
from hpc.domain import MPIDomain  # noqa: E402
from solver.operator import ElasticityOperator  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_flush_denormal(True)
    comm, n = MPI.COMM_WORLD, a.n
    cell = gyroid_cell((n, n, n))
    dom = MPIDomain((n, n, n), comm=comm)
    op = ElasticityOperator.from_phases(cell.phases[dom.local_slice], cell.E, cell.nu, (1 / n,) * 3,
                                        domain=dom, dtype=torch.float32)
    u = op.rhs()
    ug = dom.ghost(u, hi=1)

    def T(fn):
        fn()
        comm.Barrier()
        t = time.perf_counter()
        for _ in range(a.reps):
            fn()
        comm.Barrier()
        return (time.perf_counter() - t) / a.reps * 1e3

    t_apply = T(lambda: op.apply(u))
    t_ghost = T(lambda: dom.ghost(u, hi=1))
    t_clone = T(lambda: ug.clone())
    t_acc = T(lambda: dom.accumulate(ug.clone(), hi=1)) - t_clone
    t_dot = T(lambda: op.dot(u, u))
    if comm.rank == 0:
        print(f"ranks {comm.size} dims {list(dom.dims)} n {n}: apply {t_apply:.1f} ms, ghost {t_ghost:.1f} ms, "
              f"accumulate {t_acc:.1f} ms, clone of the ghosted block {t_clone:.1f} ms, dot {t_dot:.2f} ms")


if __name__ == "__main__":
    main()
