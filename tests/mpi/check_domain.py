"""Run under mpirun by tests/test_mpi_domain.py: every MPIDomain check for one rank count.

    mpirun -n P python tests/mpi/check_domain.py OUT.json CELL.h5 BAD.h5 [--mg]

Every rank checks its own block against a serial oracle built from the global arrays
(each rank can rebuild them from the seeds); rank 0 writes a JSON report:

* halo[...]: ghost(x, lo, hi) == the periodic wrap of the global array (exact), and
  accumulate(y) == the periodic fold of every rank's ghosted y (rebuilt from seeds),
  and <ghost(x), y> == <x, accumulate(y)>, for 1-D/2-D/3-D process grids, uneven and
  tiny blocks, lo/hi in 0..2; ok = all ranks agree it passed;
* operator: ElasticityOperator.apply (both forms) / diagonal / rhs on the block == serial;
* gather: gather_field of a block field == the global field; setup_parallel reads the
  right hyperslab of the HDF5 file;
* bad_cell: the collective CellError message (every rank must raise the same);
* chom: C^H, iterations of solver.homogenize on the distributed cell (Jacobi; with
  --mg also multigrid), for the HDF5 cell and a random three-phase cell, and C^H after
  a fixed 25 iterations (the iterates themselves must agree).
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

from mpi4py import MPI  # noqa: E402

from cells import random_three_phase_cell  # noqa: E402
from hpc.domain import MPIDomain  # noqa: E402
from hpc.parallel import gather_field, run_collectively, setup_parallel  # noqa: E402
from microstructures.cell import CellError  # noqa: E402
from solver import ElasticityOperator, SerialDomain, homogenize  # noqa: E402

torch.set_num_threads(1)
comm = MPI.COMM_WORLD
P = comm.size
# Iteration counts are compared across rank counts: rtol 1e-6 keeps the stopping test
# in CG's smooth regime. Near 1e-8 the 1e-6 void contrast makes the residual history
# sensitive to rounding (the three shear cases of the cubic gyroid already differ by
# ~2% there in serial), so a 1-ulp change of the summation order can move a count by 1.
RTOL = 1e-6


def process_grids(p):
    """1-D, 2-D and 3-D process grids for p ranks (plus Compute_dims' choice)."""
    grids = {tuple(MPI.Compute_dims(p, 3))}
    for d in itertools.product(range(1, p + 1), repeat=3):
        if np.prod(d) == p:
            grids.add(d)
    one = sorted(g for g in grids if sum(v > 1 for v in g) <= 1)
    two = sorted(g for g in grids if sum(v > 1 for v in g) == 2)[:2]
    three = sorted(g for g in grids if sum(v > 1 for v in g) == 3)[:1]
    return sorted(set(one + two + three) | {tuple(MPI.Compute_dims(p, 3))})


def wrap_ref(X, start, shape, lo, hi):
    """X (..., n) periodic-wrapped onto the ghosted block of (start, shape)."""
    idx = [np.arange(s - lo, s + n + hi) % N for s, n, N in zip(start, shape, X.shape[-3:])]
    return X[(Ellipsis,) + np.ix_(*idx)]


def check_halo(dims, gshape, lead, dtype, lo, hi):
    dom = MPIDomain(gshape, comm, dims=dims)
    rng = np.random.default_rng(7)
    X = rng.standard_normal(lead + gshape).astype(dtype)
    x = torch.from_numpy(X[(Ellipsis,) + dom.local_slice].copy())
    g = dom.ghost(x, lo, hi).numpy()
    ok = np.array_equal(g, wrap_ref(X, dom.local_start, dom.local_shape, lo, hi))
    # accumulate: fold of every rank's ghosted y, rebuilt from per-rank seeds
    ys = {}
    Y = np.zeros(lead + gshape, dtype=np.float64)
    for r in range(dom.size):
        st, sh = dom.block(r)
        yr = np.random.default_rng(100 + r).standard_normal(lead + tuple(n + lo + hi for n in sh))
        ys[r] = yr
        idx = [np.arange(s - lo, s + n + hi) % N for s, n, N in zip(st, sh, gshape)]
        # unbuffered add over the periodic index grid (indices repeat when wrapping)
        ii = np.ix_(*idx)
        full_idx = np.broadcast_arrays(*ii)
        flat = np.ravel_multi_index([a.ravel() for a in full_idx], gshape)
        Yf = Y.reshape(lead + (-1,))
        np.add.at(Yf, (Ellipsis, flat), yr.reshape(lead + (-1,)))
    y = torch.from_numpy(ys[dom.rank].astype(dtype))
    a = dom.accumulate(y, lo, hi).numpy()
    ref = Y[(Ellipsis,) + dom.local_slice]
    tol = 1e-12 if dtype == np.float64 else 1e-5
    err_acc = float(np.abs(a - ref).max() / max(1.0, np.abs(ref).max()))
    ok = ok and err_acc < tol
    # adjointness <ghost(x), y> = <x, accumulate(y)>
    # (relative to ||ghost(x)|| ||y||: the dot itself may cancel)
    yl = y.numpy().astype(np.float64)
    s = dom.sum(torch.tensor([np.sum(g.astype(np.float64) * yl), np.sum(x.numpy().astype(np.float64) * a),
                              np.sum(g.astype(np.float64) ** 2), np.sum(yl ** 2)], dtype=torch.float64))
    adj = abs(float(s[0] - s[1])) / float((s[2] * s[3]).sqrt())
    ok = ok and adj < (1e-14 if dtype == np.float64 else 1e-6)
    return bool(comm.allreduce(int(not ok)) == 0), float(comm.allreduce(adj, op=MPI.MAX))


def check_operator(gshape, dims):
    cell = random_three_phase_cell(gshape, seed=3)
    h = tuple(s / n for s, n in zip(cell.size, gshape))
    dom = MPIDomain(gshape, comm, dims=dims)
    op_s = ElasticityOperator.from_phases(cell.phases, cell.E, cell.nu, h)
    op_d = ElasticityOperator.from_phases(cell.phases[dom.local_slice], cell.E, cell.nu, h, domain=dom)
    U = torch.from_numpy(np.random.default_rng(5).standard_normal((6, 3) + gshape))
    sl = (slice(None), slice(None)) + dom.local_slice
    errs = []
    Ul = U[sl].contiguous()
    for ys, yd in ((op_s.apply(U), op_d.apply(Ul)), (op_s.apply(U), op_d._apply_gather(Ul)),
                   (op_s.diagonal(), op_d.diagonal()),
                   (op_s.rhs(), op_d.rhs())):
        errs.append(float((yd - ys[sl]).abs().max() / ys.abs().max()))
    err = comm.allreduce(max(errs), op=MPI.MAX)
    cs = op_s.mean_stiffness()
    cd = op_d.mean_stiffness()
    err = max(err, float((cs - cd).abs().max() / cs.abs().max()))
    return err


def main():
    out_path, cell_h5, bad_h5 = sys.argv[1:4]
    use_mg = "--mg" in sys.argv
    import time
    t0 = time.perf_counter()
    report = {"ranks": P, "halo": [], "times": {}}
    # -- halo exchange ---------------------------------------------------------------
    for dims in process_grids(P):
        shapes = [tuple(max(2 * d + 1, 3) for d in dims),           # uneven, blocks of 2-3
                  tuple(d + 1 if d > 1 else 1 for d in dims)]       # tiny: blocks of 1-2, or 1 cell
        for gshape, (lo, hi) in itertools.product(shapes, [(0, 1), (1, 1), (2, 0), (2, 2), (1, 2)]):
            for lead, dtype in (((2, 3), np.float64), ((), np.float32)):
                ok, adj = check_halo(dims, gshape, lead, dtype, lo, hi)
                report["halo"].append({"dims": list(dims), "shape": list(gshape), "lo": lo, "hi": hi,
                                       "lead": list(lead), "dtype": np.dtype(dtype).name,
                                       "ok": ok, "adjoint_rel": adj})
    report["times"]["halo"] = time.perf_counter() - t0
    # -- operator ------------------------------------------------------------------------
    report["operator"] = [{"dims": list(d), "rel_err": check_operator((9, 7, 8), d)}
                          for d in process_grids(P)[:3]]
    report["times"]["operator"] = time.perf_counter() - t0
    # -- reading the block, gathering ---------------------------------------------------------
    import h5py
    with h5py.File(cell_h5, "r") as f:
        full = f["phases"][()]
    domain, cell = setup_parallel(cell_h5, comm)
    ok = np.array_equal(cell.phases, full[domain.local_slice]) if P > 1 else np.array_equal(cell.phases, full)
    X = torch.from_numpy(np.random.default_rng(9).standard_normal((2, 3) + full.shape))
    xl = X[(slice(None), slice(None)) + domain.local_slice].contiguous()
    G = gather_field(domain, xl)
    if domain.rank == 0:
        ok = ok and G is not None and torch.equal(G, X)
    elif G is not None:
        ok = False
    report["gather_ok"] = bool(comm.allreduce(int(not ok)) == 0)
    report["describe"] = domain.describe()
    # -- collective validation: the bad phase id sits in the last rank's block only
    try:
        setup_parallel(bad_h5, comm)
        msg = None
    except CellError as exc:
        msg = str(exc)
    msgs = comm.allgather(msg)
    report["bad_cell"] = {"messages_equal": len(set(msgs)) == 1, "message": msgs[0]}
    # -- C^H on the HDF5 cell (setup_parallel) and on a random three-phase cell ------------
    chom = {}
    runs = [("h5_jacobi", "jacobi", None)]
    if use_mg:
        runs.append(("h5_mg", "multigrid", None))
    for name, pc, _ in runs:
        res = homogenize(cell, rtol=RTOL, domain=domain, preconditioner=pc)
        chom[name] = {"C": res.C.tolist(), "iterations": res.iterations}
        report["times"][name] = time.perf_counter() - t0
    rc = random_three_phase_cell((10, 9, 8), seed=11)
    dom3 = MPIDomain(rc.phases.shape, comm)   # also on one rank: the MPI path's local wrap
    rc.phases = rc.phases[dom3.local_slice]
    res = homogenize(rc, rtol=RTOL, domain=dom3)
    chom["random3"] = {"C": res.C.tolist(), "iterations": res.iterations}
    # a fixed number of iterations: the iterates themselves must agree
    res = homogenize(cell, rtol=1e-30, maxiter=25, domain=domain)
    chom["h5_25its"] = {"C": res.C.tolist(), "iterations": res.iterations}
    report["chom"] = chom
    report["times"]["end"] = time.perf_counter() - t0
    if comm.rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    try:
        run_collectively(main, comm=comm)
    except Exception:  # one rank: show the traceback
        traceback.print_exc()
        sys.exit(1)
