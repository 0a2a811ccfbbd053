"""PETSc as a benchmark peer: solver.petsc_ref.petsc_homogenize (the same hex8
periodic system assembled on a DMDA, CG with GAMG or Jacobi, float64), one rank.
GAMG runs with petsc_ref.GAMG_DEFAULTS (Chebyshev bounds that survive contrast
1e-6); every load case's converged reason is checked there.

    python bench/peers/petsc_runner.py cell.npz [--pc gamg|jacobi] [--rtol 1e-6]
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
    ap.add_argument("--pc", default="gamg")
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--maxiter", type=int, default=20000)
    a = ap.parse_args()

    from bench.peers.cellfile import read_cell
    from common import peak_rss_mb
    from solver.petsc_ref import petsc_homogenize

    cell, soft = read_cell(a.cell)
    res = petsc_homogenize(cell, rtol=a.rtol, pc=a.pc, soft=soft, maxiter=a.maxiter)
    print(json.dumps({
        "solver": f"PETSc CG + {a.pc}", "iterations": [int(i) for i in res.iterations],
        "residuals": [float(r) for r in res.residuals], "converged": bool(res.converged),
        "setup_s": res.times["setup"], "solve_s": res.times["solve"],
        "total_s": res.times["total"], "peak_mb": peak_rss_mb(), "C": res.C.tolist(),
        "precision": res.precision, "reasons": res.extra.get("converged_reason"),
        "version": f"PETSc {res.extra.get('petsc_version')}"}))


if __name__ == "__main__":
    main()
