"""Run under mpirun by tests/test_petsc.py: PETSc reference on named test cells.

    mpirun -n P python tests/mpi_petsc_check.py TASK [TASK ...]
    TASK = solve:CELL:PC:RTOL | matrix:CELL

Rank 0 prints one JSON line per task, with "task" and "ranks", and
{"C", "iterations", "reasons", "dims"} for ``solve``; {"max_abs_diff", "scale"} for
``matrix`` (the PETSc matrix, rows and columns mapped to the natural ordering with
the DMDA's AO, against solver/assembled.py's matrix).
The cells are built with numpy here (no dependency on microstructures.generators).
"""
from __future__ import annotations

import json
import sys

import numpy as np


def gyroid_cell(n: int = 14, level: float = 0.4):
    """Network gyroid G: sin x cos y + sin z cos x + sin y cos z <= level, voxel centres."""
    from microstructures.cell import Cell
    x = (np.arange(n) + 0.5) / n * 2.0 * np.pi
    X, Y, Z = np.meshgrid(x, x, x, indexing="ij")
    T = np.sin(X) * np.cos(Y) + np.sin(Z) * np.cos(X) + np.sin(Y) * np.cos(Z)
    return Cell((T <= level).astype(np.uint8), [0.0, 70e3], [0.3, 0.3], size=(1.0, 1.0, 1.0),
                name=f"gyroid{n}")


def lattice_cell(shape=(12, 13, 14), r: float = 0.18):
    """Strut lattice: struts along the cube edges (x, y, z) plus one body diagonal
    (anisotropic), radius r, a stiffer second solid phase in the nodes; void elsewhere."""
    from microstructures.cell import Cell
    c = [(np.arange(n) + 0.5) / n for n in shape]
    X, Y, Z = np.meshgrid(*c, indexing="ij")

    def d(a):                                    # periodic distance to the nearest integer
        return np.abs(a - np.round(a))
    strut = ((np.hypot(d(Y), d(Z)) <= r) | (np.hypot(d(X), d(Z)) <= r) | (np.hypot(d(X), d(Y)) <= r))
    P = np.stack([X, Y, Z], -1)
    t = P.sum(-1) / 3.0                          # projection on the (1,1,1) diagonal
    diag = np.linalg.norm(P - t[..., None], axis=-1) <= 0.7 * r
    node = (d(X) ** 2 + d(Y) ** 2 + d(Z) ** 2) <= (1.6 * r) ** 2
    ph = np.zeros(shape, dtype=np.uint8)
    ph[strut | diag] = 1
    ph[node] = 2
    return Cell(ph, [0.0, 1.0, 3.0], [0.3, 0.3, 0.25], size=(1.0, 1.1, 1.2), name="lattice")


CELLS = {"gyroid": gyroid_cell, "lattice": lattice_cell,
         "tiny": lambda: lattice_cell((3, 4, 5), r=0.3)}


def _solve(task, name, pc, rtol):
    from petsc4py import PETSc
    from solver.petsc_ref import petsc_homogenize
    res = petsc_homogenize(CELLS[name](), rtol=rtol, pc=pc)
    if PETSc.COMM_WORLD.getRank() == 0:
        print(json.dumps({"task": task, "ranks": res.domain["ranks"], "C": res.C.tolist(),
                          "iterations": res.iterations, "reasons": res.extra["converged_reason"],
                          "dims": res.domain["dims"]}), flush=True)


def _matrix(task, name):
    from petsc4py import PETSc
    from solver.assembled import assemble
    from solver.petsc_ref import PetscSystem
    cell = CELLS[name]()
    sysm = PetscSystem(cell)
    r0, r1 = sysm.A.getOwnershipRange()
    nat = sysm.natural_dof_indices()
    ao = sysm.dm.getAO()
    rows = []
    for k, r in enumerate(range(r0, r1)):
        cols, vals = sysm.A.getRow(r)
        rows.append((int(nat[k]), np.asarray(ao.petsc2app(np.asarray(cols, dtype=PETSc.IntType))),
                     np.asarray(vals)))
    allrows = PETSc.COMM_WORLD.tompi4py().gather(rows, root=0)
    if PETSc.COMM_WORLD.getRank() == 0:
        K, _, _ = assemble(cell.phases, cell.E, cell.nu, h=sysm.h)
        n = K.shape[0]
        A = np.zeros((n, n))
        for part in allrows:
            for i, cols, vals in part:
                A[i, cols] = vals
        print(json.dumps({"task": task, "ranks": PETSc.COMM_WORLD.getSize(),
                          "max_abs_diff": float(np.abs(A - K.toarray()).max()),
                          "scale": float(np.abs(K).max())}), flush=True)


if __name__ == "__main__":
    import os
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for task in sys.argv[1:]:
        mode, *args = task.split(":")
        if mode == "solve":
            _solve(task, args[0], args[1], float(args[2]))
        elif mode == "matrix":
            _matrix(task, args[0])
        else:
            raise SystemExit(f"unknown task {task!r}")
