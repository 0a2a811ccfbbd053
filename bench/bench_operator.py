"""Throughput of the matrix-free operator apply (issue 3 item 3) next to the machine's
measured matrix-multiply rate, and the per-rank numbers the scaling model uses.

    python bench/bench_operator.py --n 32 64 128 [--threads 1 2] [--write]

FLOPs are counted for the factored element form k_e = G^T S_e G used by the apply
(G: 25 x 24): 2 * (25 * 24 * 2) = 2400 per voxel and load case, six cases at once.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, machine_line, markdown_table, update_section  # noqa: E402

FLOP_PER_VOXEL_CASE = 2 * 25 * 24 * 2


def timeit(fn, reps):
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def matmul_rate(dtype=torch.float32, n=2048):
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / timeit(lambda: a @ b, 5) / 1e9


def main():
    from microstructures.generators import tpms
    from solver.operator import ElasticityOperator
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    rows = []
    for th in a.threads:
        torch.set_num_threads(th)
        mm = matmul_rate()
        for n in a.n:
            cell = tpms("G", "sheet", vf=0.25, n=n)
            for dt in (torch.float32, torch.float64):
                if dt == torch.float64 and n > 64:
                    continue
                op = ElasticityOperator.from_phases(cell.phases, cell.E, cell.nu, (1.0 / n,) * 3, dtype=dt)
                u = op.rhs()
                reps = max(2, int(2e7 / n ** 3))
                t_apply = timeit(lambda: op.apply(u), reps)
                t_ghost = timeit(lambda: op.domain.ghost(u, hi=1), reps)
                t_dot = timeit(lambda: op.dot(u, u), reps)
                gf = FLOP_PER_VOXEL_CASE * 6 * n ** 3 / t_apply / 1e9
                rows.append([th, n, str(dt).replace("torch.", ""), f"{t_apply * 1e3:.1f}",
                             f"{6 * n ** 3 / t_apply / 1e6:.1f}", f"{gf:.1f}", f"{mm:.0f}",
                             f"{100 * gf / mm:.0f}%", f"{t_ghost * 1e3:.1f}", f"{t_dot * 1e3:.2f}"])
                print(rows[-1], flush=True)
    m = machine()
    table = markdown_table(["threads", "n", "dtype", "apply ms (6 cases)", "Mvoxel-cases/s", "GFLOP/s",
                            "sgemm GFLOP/s", "of sgemm", "ghost ms", "dot ms"], rows)
    text = (f"## Operator apply throughput (matrix-free hex8, six load cases)\n\n"
            f"Machine: {machine_line(m)}.\n"
            f"Command: `python bench/bench_operator.py --n {' '.join(map(str, a.n))} --threads "
            f"{' '.join(map(str, a.threads))} --write`. GFLOP/s counts {FLOP_PER_VOXEL_CASE} flop per "
            f"voxel and load case (k_e = G^T S_e G, G 25x24); sgemm is a 2048^2 float32 matmul in "
            f"the same process and thread count.\n\n{table}\n")
    print(text)
    if a.write:
        update_section(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "BENCHMARKS.md"), "bench-operator", text)


if __name__ == "__main__":
    from common import on_tcmalloc
    on_tcmalloc()
    main()
