"""Peak RSS per rank of hpc.homogenize's path (block read, operator, multigrid set-up,
a few PCG iterations) on a file cell; prints one JSON line on rank 0.

    mpirun -n P python tests/mpi/peak_memory.py cell.h5 [precision] [preconditioner]

``import_mb`` is each rank's peak RSS after importing Python, torch, mpi4py and the
solver and after a warm-up solve of an 8^3 cell in this process (which loads the
lazily initialised kernels: oneDNN convolutions, BLAS, the MPI transports), before
any of the problem's data exists (~0.4 GB here, the same on every rank whatever the
grid); ``peak_mb`` is the peak at the end. The problem's memory is their difference.
"""
import json
import sys

import numpy as np
from mpi4py import MPI

from microstructures.cell import Cell

from hpc.allocator import active_allocator
from hpc.memory import peak_rss_mb
from hpc.parallel import setup_parallel
from solver.homogenize import homogenize


def main():
    path = sys.argv[1]
    precision = sys.argv[2] if len(sys.argv) > 2 else "float64"
    pc = sys.argv[3] if len(sys.argv) > 3 else "multigrid"
    comm = MPI.COMM_WORLD
    warm = Cell(phases=(np.indices((8, 8, 8)).sum(0) % 3 > 0).astype(np.uint8), E=[0.0, 1.0], nu=[0.3, 0.3])
    homogenize(warm, rtol=1e-6, maxiter=3, precision=precision, preconditioner=pc)
    comm.Barrier()
    base = peak_rss_mb()
    domain, cell = setup_parallel(path, comm=comm)
    res = homogenize(cell, rtol=1e-12, maxiter=3, precision=precision, preconditioner=pc, domain=domain)
    peak = peak_rss_mb()
    peaks = comm.gather(peak, root=0)
    bases = comm.gather(base, root=0)
    if comm.rank == 0:
        print(json.dumps({"ranks": comm.size, "dims": list(domain.dims), "peak_mb": peaks,
                          "import_mb": bases, "C11": float(res.C[0, 0]),
                          "allocator": active_allocator()}))


if __name__ == "__main__":
    main()
