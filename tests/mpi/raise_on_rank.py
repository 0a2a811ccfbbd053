"""Run under mpirun by tests/test_mpi_domain.py: rank 1 raises while the other ranks
wait in collectives (a reduction, as PCG would); run_collectively must end them all.

    mpirun -n 4 python tests/mpi/raise_on_rank.py
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

from hpc.domain import MPIDomain  # noqa: E402
from hpc.parallel import run_collectively  # noqa: E402


def main():
    comm = MPI.COMM_WORLD
    dom = MPIDomain((8, 8, 8), comm)
    dom.barrier()
    if dom.rank == 1:
        time.sleep(0.5)
        raise ValueError("boom on purpose in rank 1")
    for _ in range(1000):       # the others wait here for rank 1 forever
        dom.sum(torch.ones(3, dtype=torch.float64))
    return 0


if __name__ == "__main__":
    run_collectively(main)
    sys.exit(0)
