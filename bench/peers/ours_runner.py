"""Our solver as a benchmark peer: solver.homogenize (PCG on the matrix-free hex8
operator, the six load cases as one block) with the multigrid or Jacobi
preconditioner, float32 storage with float64 reductions by default.

    python bench/peers/ours_runner.py cell.npz [--precond multigrid|jacobi]
        [--precision float32] [--rtol 1e-6] [--threads 1] [--groups 1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cell")
    ap.add_argument("--precond", default="multigrid", choices=["multigrid", "jacobi"])
    ap.add_argument("--precision", default="float32", choices=["float32", "float64"])
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--maxiter", type=int, default=50000)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--groups", type=int, default=1, choices=[1, 2, 3, 6],
                    help="solve the six load cases in this many groups (less memory)")
    a = ap.parse_args()

    import torch

    from bench.peers.cellfile import read_cell
    from common import peak_rss_mb
    from solver import homogenize

    if a.threads:
        torch.set_num_threads(a.threads)
    cell, soft = read_cell(a.cell)
    res = homogenize(cell, rtol=a.rtol, precision=a.precision, preconditioner=a.precond,
                     soft=soft, maxiter=a.maxiter, groups=a.groups)
    print(json.dumps({
        "solver": f"ours PCG + {a.precond}", "iterations": [int(i) for i in res.iterations],
        "residuals": [float(r) for r in res.residuals], "converged": bool(res.converged),
        "setup_s": res.times["setup"], "solve_s": res.times["solve"],
        "total_s": res.times["total"], "peak_mb": peak_rss_mb(), "C": res.C.tolist(),
        "precision": a.precision, "error_estimate": float(res.error_estimate),
        "threads": torch.get_num_threads(), "groups": a.groups, "version": f"torch {torch.__version__}"}))


if __name__ == "__main__":
    from common import on_tcmalloc
    on_tcmalloc()
    main()
