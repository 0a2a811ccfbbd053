"""muGrid peer: C^H of one cell with muGrid's fused Q1 stiffness operator and CG with
a Fourier-space reference-material (Green) preconditioner.

Runs in its own venv (scripts/setup_mugrid.sh: muGrid needs numpy >= 2.1, the project
keeps Debian's numpy 1.24), so it imports nothing from this project. The main process
writes an .npz with

    phases  uint8 (n_x, n_y, n_z)      phase id per voxel
    lam, mu float64 (P,)               Lame parameters per phase (void already soft)
    size    float64 (3,)               cell size

and reads one JSON line from stdout.

Discretization (muGrid.IsotropicStiffnessOperator3D, FEMElement.q1): trilinear
8-node voxels with 2x2x2 Gauss quadrature, K_e = 2 mu_e G + lambda_e V, periodic,
one node per voxel -- the same K as solver/assembled.py. Right-hand side
f^i = -B^T C E^i (apply_macro_rhs), E^i the unit strain tensor of Voigt case i
(engineering shear: E_23 = E_32 = 1/2).

Preconditioners (muGrid.Preconditioners, Ladecky et al.):
  green         G = F^-1 Khat_ref(q)^+ F, Khat_ref the symbol of K with uniform
                reference Lame parameters (the volume means), q = 0 projected out;
                Appl. Math. Comput. 446 (2023) 127835.
  green-jacobi  M = J^1/2 G J^1/2 with J = diag(K)^-1 ("J-FFT"), muGrid's choice
                for high-contrast data.

Solver: muGrid.Solvers.conjugate_gradients, stopping on the true residual
||f - K u||_2 <= rtol ||f||_2, one load case after another (the API solves one
right-hand side). C^H column i = volume average of sigma = C : (E^i + sym grad u^i)
(average_stress), rows in Voigt order 11, 22, 33, 23, 13, 12: C^H_ji = <sigma_j>,
which with engineering-shear strain cases is the engineering-Voigt matrix directly.

    python bench/peers/mugrid_runner.py cell.npz [--rtol 1e-6] [--precond green-jacobi]
        [--precision float64] [--maxiter 5000] [--save-fields u.npy]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np

# Restated from solver/materials.py on purpose: this runner runs in muGrid's own venv
# (numpy >= 2.1), where the project's packages (torch, Debian numpy ABI) do not import.
VOIGT_PAIRS = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


def unit_strain(i: int) -> np.ndarray:
    a, b = VOIGT_PAIRS[i]
    e = np.zeros((3, 3))
    if a == b:
        e[a, a] = 1.0
    else:
        e[a, b] = e[b, a] = 0.5
    return e


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def solve(path: str, rtol: float, precond: str, precision: str, maxiter: int,
          save_fields: str | None = None) -> dict:
    import muGrid
    from muGrid.Preconditioners import (make_green_jacobi_preconditioner,
                                        make_reference_stiffness_preconditioner)
    from muGrid.Solvers import ConvergenceError, conjugate_gradients

    t0 = time.perf_counter()
    data = np.load(path)
    phases = data["phases"]
    lam_p, mu_p = data["lam"].astype(np.float64), data["mu"].astype(np.float64)
    size = data["size"].astype(np.float64)
    shape = tuple(int(s) for s in phases.shape)
    h = [float(s) / n for s, n in zip(size, shape)]
    vol = float(np.prod(size))
    dtype = {"float64": np.float64, "float32": np.float32}[precision]

    comm = muGrid.Communicator()
    element = muGrid.FEMElement.q1
    op = muGrid.IsotropicStiffnessOperator3D(h, element)
    engine = muGrid.FFTEngine(list(shape), comm, nb_ghosts_left=(1, 1, 1),
                              nb_ghosts_right=(1, 1, 1))
    fc = engine.real_space_collection

    def material(name, values):
        f = engine.real_space_field(name, components=(), dtype=dtype) if dtype != np.float64 \
            else fc.real_field(name)
        f.p[...] = values[phases].astype(dtype)
        engine.communicate_ghosts(f)
        return f

    lam = material("lambda", lam_p)
    mu = material("mu", mu_p)
    lam_ref, mu_ref = float(lam_p[phases].mean()), float(mu_p[phases].mean())
    if precond == "green-jacobi":
        prec = make_green_jacobi_preconditioner(
            engine, op, lam, mu, 3, reference_lambda=lam_ref, reference_mu=mu_ref,
            element=element, grid_spacing=h, dtype=dtype)
    elif precond == "green":
        prec = make_reference_stiffness_preconditioner(
            engine, nb_components=3, element=element, grid_spacing=h,
            lambda_ref=lam_ref, mu_ref=mu_ref, dtype=dtype)
    elif precond == "none":
        prec = None
    else:
        raise SystemExit(f"unknown preconditioner {precond!r}")
    rhs = engine.real_space_field("rhs", components=(3,), dtype=dtype)
    u = engine.real_space_field("u", components=(3,), dtype=dtype)

    def hessp(x, Ax):
        engine.communicate_ghosts(x)
        op.apply(x, lam, mu, Ax)

    t_setup = time.perf_counter() - t0
    C = np.zeros((6, 6))
    iterations, converged, errors = [], [], []
    fields = np.zeros((6, 3) + shape, dtype=np.float32) if save_fields else None
    for i in range(6):
        E = unit_strain(i)
        op.apply_macro_rhs(lam, mu, E.ravel().tolist(), rhs)
        rhs.s[...] *= -1.0
        u.p[...] = 0.0
        its = [0]

        def count(k, state, its=its):
            its[0] = k

        ok = True
        try:
            conjugate_gradients(comm, fc, rhs, u, hessp=hessp, prec=prec, rtol=rtol,
                                maxiter=maxiter, callback=count)
        except ConvergenceError as exc:     # record, keep going: the table says so
            ok = False
            errors.append(f"case {i}: {exc}")
        iterations.append(int(its[0]))
        converged.append(ok)
        engine.communicate_ghosts(u)
        sig = np.asarray(op.average_stress(u, lam, mu, E.ravel().tolist()),
                         dtype=np.float64).reshape(3, 3) / vol
        C[:, i] = [sig[a, b] for a, b in VOIGT_PAIRS]
        if fields is not None:
            fields[i] = np.asarray(u.p)
    t_solve = time.perf_counter() - t0 - t_setup
    if fields is not None:
        np.save(save_fields, fields)
    return {"solver": f"muGrid CG + {precond}", "iterations": iterations,
            "converged": all(converged), "errors": errors,
            "setup_s": t_setup, "solve_s": t_solve, "total_s": t_setup + t_solve,
            "peak_mb": peak_rss_mb(), "C": C.tolist(), "precision": precision,
            "reference": {"lambda": lam_ref, "mu": mu_ref},
            "version": getattr(muGrid, "__version__", "?"), "numpy": np.__version__,
            "python": sys.version.split()[0], "element": "q1 (trilinear hex, 2x2x2 Gauss)"}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cell")
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--precond", default="green-jacobi", choices=["green-jacobi", "green", "none"])
    ap.add_argument("--precision", default="float64", choices=["float64", "float32"])
    ap.add_argument("--maxiter", type=int, default=5000)
    ap.add_argument("--save-fields", default=None, help="write u (6, 3, nx, ny, nz) float32 .npy")
    a = ap.parse_args()
    print(json.dumps(solve(a.cell, a.rtol, a.precond, a.precision, a.maxiter, a.save_fields)))


if __name__ == "__main__":
    main()
