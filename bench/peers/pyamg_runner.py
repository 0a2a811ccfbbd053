"""PyAMG peer: smoothed-aggregation AMG as the preconditioner of CG on the assembled
periodic hex8 system of solver/assembled.py (the same K and f^i as our solver).

System (docs/DESIGN.md s.2): K chi^i = f^i, i = 1..6, K singular with the three rigid
translations. The f^i are mean-free per component (a periodic divergence), CG is
started from 0, so the iterates stay in range(K) up to round-off; the solution is
projected mean-free afterwards, which leaves C^H unchanged.

Hierarchy: ``pyamg.smoothed_aggregation_solver(K, B)`` with B (3N, 6) the rigid-body
modes evaluated at the node coordinates -- translations and the three infinitesimal
rotations (-y, x, 0), (0, -z, y), (z, 0, -x) -- as the near-null space (Vanek, Mandel,
Brezina 1996). Rotations jump across the periodic wrap, so they are not in K's
kernel globally; they are the local low-energy modes an aggregate needs. Symmetric
block Gauss-Seidel pre/post smoothing (PyAMG's default) keeps the V-cycle symmetric,
as CG requires; the coarsest level is solved by a pseudo-inverse, which handles
the translation null space.

Stopping: pyamg.krylov.cg's default criterion ||f - K x||_2 < rtol ||f||_2, the same
as solver.pcg. C^H is the energy form (solver/operator.py ElasticityOperator.chom,
float64) on chi reshaped from dof 3*((i*n_y + j)*n_z + k) + c to (6, 3, n_x, n_y, n_z).

Memory: solver/assembled.assemble builds COO triplets for 576 entries per voxel
(about 28 bytes each plus the (n_vox, 24, 24) element stack), so the assembly, not
the hierarchy, sets the peak (about 5 GB at 64^3; 128^3 would need ~40 GB).

    python bench/peers/pyamg_runner.py cell.npz [--rtol 1e-6] [--maxiter 2000]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def rigid_body_modes(shape, h) -> np.ndarray:
    """(3N, 6) translations and infinitesimal rotations at the node coordinates
    x_ijk = (i h_x, j h_y, k h_z), dof 3*((i*n_y + j)*n_z + k) + c; centred on the
    cell so the rotations are well scaled against the translations."""
    nx, ny, nz = shape
    x, y, z = np.meshgrid(np.arange(nx) * h[0], np.arange(ny) * h[1], np.arange(nz) * h[2],
                          indexing="ij")
    x, y, z = (a.ravel() - a.mean() for a in (x, y, z))
    N = nx * ny * nz
    B = np.zeros((N, 3, 6))
    for c in range(3):
        B[:, c, c] = 1.0
    B[:, 0, 3], B[:, 1, 3] = -y, x          # rotation about z
    B[:, 1, 4], B[:, 2, 4] = -z, y          # rotation about x
    B[:, 0, 5], B[:, 2, 5] = z, -x          # rotation about y
    return B.reshape(3 * N, 6)


def assembly_bytes(n_vox: int) -> int:
    """Rough peak of solver/assembled.assemble: int64 rows and cols and float64 values
    of 576 COO triplets per voxel, the (n_vox, 24, 24) element stack and the CSR copy
    (measured about 2 KB per voxel at 32^3 ... 64^3 for all of it, times 2 for safety)."""
    return int(n_vox) * 576 * 8 * 4 * 2


def available_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def solve(cell, rtol: float = 1e-6, maxiter: int = 2000, soft: float = 1e-6,
          max_coarse: int = 300) -> dict:
    import pyamg
    import torch
    from pyamg.krylov import cg

    from solver.assembled import assemble
    from solver.operator import ElasticityOperator

    t0 = time.perf_counter()
    phases = np.asarray(cell.phases)
    shape = phases.shape
    need, have = assembly_bytes(phases.size), available_bytes()
    if need > 0.8 * have:
        raise MemoryError(f"assembling K for {shape} needs about {need / 2**30:.0f} GiB, "
                          f"{have / 2**30:.0f} GiB available: refusing")
    h = tuple(float(s) / n for s, n in zip(cell.size, shape))
    K, F, _ = assemble(phases, cell.E, cell.nu, h, soft)
    del _
    K.sort_indices()
    t_assemble = time.perf_counter() - t0
    B = rigid_body_modes(shape, h)
    ml = pyamg.smoothed_aggregation_solver(K, B=B, symmetry="symmetric", max_coarse=max_coarse)
    M = ml.aspreconditioner(cycle="V")
    t_setup = time.perf_counter() - t0
    n = K.shape[0]
    X = np.zeros((n, 6))
    iterations, residuals, info = [], [], []
    for i in range(6):
        b = F[:, i].copy()
        b.reshape(-1, 3)[...] -= b.reshape(-1, 3).mean(axis=0)   # exactly mean-free
        res = []
        x, flag = cg(K, b, x0=np.zeros(n), tol=rtol, maxiter=maxiter, M=M, residuals=res)
        x.reshape(-1, 3)[...] -= x.reshape(-1, 3).mean(axis=0)
        X[:, i] = x
        iterations.append(len(res) - 1)
        residuals.append(float(np.linalg.norm(b - K @ x) / np.linalg.norm(b)))
        info.append(int(flag))
    t_solve = time.perf_counter() - t0 - t_setup
    complexity = {"levels": len(ml.levels), "operator": float(ml.operator_complexity()),
                  "grid": float(ml.grid_complexity()),
                  "unknowns": [int(lv.A.shape[0]) for lv in ml.levels]}
    del ml, M, K, F
    chi = X.T.reshape(6, shape[0], shape[1], shape[2], 3).transpose(0, 4, 1, 2, 3)
    op = ElasticityOperator.from_phases(phases, cell.E, cell.nu, h, soft=soft, dtype=torch.float64)
    C = op.chom(torch.as_tensor(np.ascontiguousarray(chi))).numpy()
    return {"solver": "PyAMG SA + CG", "iterations": iterations, "residuals": residuals,
            "converged": all(f == 0 for f in info), "info": info,
            "setup_s": t_setup, "assemble_s": t_assemble, "solve_s": t_solve,
            "total_s": t_setup + t_solve, "C": C.tolist(), "precision": "float64",
            "hierarchy": complexity, "version": pyamg.__version__}


def main():
    from bench.peers.cellfile import read_cell
    from common import peak_rss_mb

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cell")
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--maxiter", type=int, default=2000)
    a = ap.parse_args()
    cell, soft = read_cell(a.cell)
    out = solve(cell, a.rtol, a.maxiter, soft)
    out["peak_mb"] = peak_rss_mb()
    print(json.dumps(out))


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), "bench"))
    main()
