"""Side-by-side comparison of our solvers and PETSc on one cell.

    python -m hpc.compare cell.h5 [--rtol 1e-6] [--precision float32|float64]
                          [--solvers jacobi,multigrid,petsc-gamg,petsc-jacobi]
                          [--ranks N] [--launcher "mpirun -n {ranks}"] [--json]

Each solver runs in a fresh subprocess (``python -m hpc.compare --one SOLVER cell.h5``)
so that the peak memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, the process
peak; summed over ranks for the MPI rows) belongs to that solver alone. The PETSc rows
run on ``--ranks`` MPI ranks through ``--launcher``; ours run on one process.

Every row's C^H is compared with the tightest solution: one more solve at
``--reference-rtol`` (1e-10) with the best available solver (multigrid, then
petsc-gamg, then jacobi), as ||C - C_ref||_F / ||C_ref||_F. A solver that cannot
run here (e.g. petsc4py missing) is a row marked
``unavailable`` with the reason; a solver that fails is a row marked ``failed``.
Exit status: 0 if no row failed, 1 otherwise, 2 on bad input.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import resource
import re
import shlex
import subprocess
import sys
import time

import numpy as np

log = logging.getLogger(__name__)

SOLVERS = ("jacobi", "multigrid", "petsc-gamg", "petsc-jacobi")
#: reference solver preference (tightest solve)
REFERENCE_ORDER = ("multigrid", "petsc-gamg", "jacobi", "petsc-jacobi")
DEFAULT_LAUNCHER = "mpirun -n {ranks}"


class InputError(Exception):
    pass


# -- one solver in this process (the --one child) ---------------------------------------
def _petsc_world():
    """(rank, size, mpi4py comm) of PETSc.COMM_WORLD (MPI is initialized by petsc4py)."""
    from petsc4py import PETSc
    comm = PETSc.COMM_WORLD.tompi4py()
    return comm.rank, comm.size, comm


def read_cell_file(path):
    """The cell at ``path``: microstructures.io.read_cell if present, else h5py (docs/DESIGN.md s.4)."""
    try:
        from microstructures.io import read_cell
    except ImportError:
        read_cell = None
    if read_cell is not None:
        return read_cell(path)
    import h5py
    from microstructures.cell import Cell
    with h5py.File(path, "r") as f:
        size = np.broadcast_to(np.asarray(f.attrs.get("size", (1.0, 1.0, 1.0)), dtype=np.float64).ravel(), (3,))
        return Cell(f["phases"][()], f["materials/E"][()], f["materials/nu"][()], size=tuple(size))


def _unavailable(solver: str):
    """None if ``solver`` can run in this environment, else the reason (one line)."""
    try:
        if solver == "multigrid":
            mod = importlib.import_module("solver.multigrid")
            if not hasattr(mod, "build_multigrid"):
                return "solver.multigrid has no build_multigrid yet"
        elif solver.startswith("petsc"):
            importlib.import_module("petsc4py.PETSc")
    except ImportError as exc:
        hint = " (apt-get install python3-petsc4py openmpi-bin)" if solver.startswith("petsc") else ""
        return f"{type(exc).__name__}: {exc}{hint}"
    return None


def run_one(solver: str, cell_path: str, rtol: float, precision: str) -> dict:
    """Run one solver on the cell in this process; returns its row (all ranks agree)."""
    if solver not in SOLVERS:
        raise InputError(f"unknown solver {solver!r} (choose from {', '.join(SOLVERS)})")
    reason = _unavailable(solver)
    if reason is not None:
        return {"solver": solver, "ranks": 1, "rtol": rtol, "status": "unavailable", "reason": reason}
    rank, size, comm = _petsc_world() if solver.startswith("petsc") else (0, 1, None)
    row = {"solver": solver, "ranks": size, "rtol": rtol, "status": "ok", "rank": rank}
    t0 = time.perf_counter()
    try:
        if solver.startswith("petsc"):
            from solver.petsc_ref import petsc_homogenize
            res = petsc_homogenize(cell_path, rtol=rtol, pc=solver.split("-", 1)[1])
            row["converged_reason"] = res.extra["converged_reason"]
        else:
            from solver.homogenize import homogenize
            cell = read_cell_file(cell_path)
            res = homogenize(cell, rtol=rtol, precision=precision, preconditioner=solver)
            if not res.converged:
                raise RuntimeError(f"PCG did not converge: relative residuals {res.residuals}")
    except InputError:
        raise
    except Exception as exc:                      # a failing solver is a table row
        row.update(status="failed", reason=f"{type(exc).__name__}: {exc}".splitlines()[0])
        log.debug("solver %s failed", solver, exc_info=True)
        if comm is not None and size > 1:
            # the other ranks may be inside a collective this one will never join: report
            # the row from here and end the job (an allreduce below would hang forever)
            print(json.dumps({**row, "wall_s": time.perf_counter() - t0}), flush=True)
            comm.Abort(1)
    else:
        row.update(precision=res.precision, iterations=int(max(res.iterations)),
                   iterations_cases=list(res.iterations), residuals=list(res.residuals),
                   setup_s=res.times["setup"], solve_s=res.times["solve"], total_s=res.times["total"],
                   C=np.asarray(res.C).tolist(), domain=res.domain)
    row["wall_s"] = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0   # KiB -> MiB (Linux)
    if comm is not None:
        row["peak_mb"] = comm.allreduce(peak)
        row["peak_mb_max_rank"] = comm.allreduce(peak, op=_mpi_max())
    else:
        row["peak_mb"] = row["peak_mb_max_rank"] = peak
    return row


def _mpi_max():
    from mpi4py import MPI
    return MPI.MAX


# -- the driver ------------------------------------------------------------------------
def _child_command(solver, cell, rtol, precision, ranks, launcher):
    cmd = [sys.executable, "-m", "hpc.compare", "--one", solver, cell, "--rtol", repr(rtol),
           "--precision", precision]
    if solver.startswith("petsc") and ranks > 1:
        cmd = shlex.split(launcher.format(ranks=ranks)) + cmd
    return cmd


def spawn_one(solver, cell, rtol, precision, ranks=1, launcher=DEFAULT_LAUNCHER, timeout=None) -> dict:
    """Run ``--one`` in a fresh subprocess (under the launcher for PETSc with ranks > 1)."""
    cmd = _child_command(solver, cell, rtol, precision, ranks, launcher)
    log.info("running %s", " ".join(shlex.quote(c) for c in cmd))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"solver": solver, "ranks": ranks, "rtol": rtol, "status": "failed",
                "reason": f"{type(exc).__name__}: {exc}"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    return {"solver": solver, "ranks": ranks, "rtol": rtol, "status": "failed",
            "reason": f"exit {p.returncode}: {failure_line(p.stderr or p.stdout)}"}


def failure_line(text: str) -> str:
    """The line of a failed child's output that says why: the child's own last error
    line ('error: ...', a traceback's 'XError: ...'); else the launcher's (an Open MPI
    failure comes in a box of dashes whose last line says nothing, and its closing box
    follows the child's message); else the last line that is not decoration."""
    lines = [ln.strip() for ln in (text or "").splitlines()]
    lines = [ln for ln in lines if ln and set(ln) - set("-=*# ")]
    launcher = ("mpirun", "srun", "prterun", "orterun", "primary job", "--------")
    own = [ln for ln in lines if not ln.lower().startswith(launcher)
           and (ln.lower().startswith("error") or re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln))]
    theirs = [ln for ln in lines if "error" in ln.lower() or ln.lower().startswith(launcher[:2])]
    return (own or theirs or lines or ["no output"])[-1]


def compare(cell, solvers=SOLVERS, rtol=1e-6, precision="float64", ranks=1,
            launcher=DEFAULT_LAUNCHER, reference_rtol=1e-10, timeout=None) -> dict:
    """Rows for ``solvers`` plus the reference solve; adds ``dC`` to every ok row."""
    rows = [spawn_one(s, cell, rtol, precision, ranks, launcher, timeout) for s in solvers]
    reference = None
    for s in REFERENCE_ORDER:
        if _unavailable(s) is not None:
            continue
        reference = spawn_one(s, cell, reference_rtol, "float64", ranks, launcher, timeout)
        if reference["status"] == "ok":
            break
    if reference is not None and reference["status"] == "ok":
        Cref = np.asarray(reference["C"])
        for r in rows:
            if r["status"] == "ok":
                r["dC"] = float(np.linalg.norm(np.asarray(r["C"]) - Cref) / np.linalg.norm(Cref))
    return {"cell": cell, "rtol": rtol, "precision": precision, "rows": rows, "reference": reference}


def format_table(report: dict) -> str:
    cols = ("solver", "ranks", "prec", "iters", "setup s", "solve s", "total s", "peak MB", "dC^H rel")
    lines = [f"cell {report['cell']}  rtol {report['rtol']:g}",
             "{:<13} {:>5} {:>7} {:>6} {:>8} {:>8} {:>8} {:>8} {:>9}".format(*cols)]
    for r in report["rows"]:
        if r["status"] != "ok":
            lines.append(f"{r['solver']:<13} {r.get('ranks', ''):>5} {r['status']}: {r.get('reason', '')}")
            continue
        prec = "f32" if r.get("precision") == "float32" else "f64"
        dC = f"{r['dC']:.2e}" if "dC" in r else "n/a"
        lines.append(f"{r['solver']:<13} {r['ranks']:>5} {prec:>7} {r['iterations']:>6} "
                     f"{r['setup_s']:>8.3f} {r['solve_s']:>8.3f} {r['total_s']:>8.3f} "
                     f"{r['peak_mb']:>8.1f} {dC:>9}")
    ref = report.get("reference")
    if ref is None:
        lines.append("reference: no solver available")
    elif ref["status"] != "ok":
        lines.append(f"reference: {ref['solver']} failed: {ref.get('reason', '')}")
    else:
        lines.append(f"reference: {ref['solver']} at rtol {ref['rtol']:g} ({ref['iterations']} iterations, "
                     f"{ref['total_s']:.2f} s); dC^H = ||C - C_ref||_F / ||C_ref||_F; "
                     "peak MB = ru_maxrss of a fresh process, summed over ranks")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpc.compare", description=__doc__.splitlines()[0])
    p.add_argument("cell", help="cell file (HDF5, docs/DESIGN.md section 4)")
    p.add_argument("--rtol", type=float, default=1e-6, help="relative residual of every solver (default 1e-6)")
    p.add_argument("--precision", choices=("float32", "float64"), default="float64",
                   help="storage precision of our solvers (PETSc is float64; default float64)")
    p.add_argument("--solvers", default=",".join(SOLVERS),
                   help=f"comma-separated subset of {','.join(SOLVERS)}")
    p.add_argument("--ranks", type=int, default=int(os.environ.get("RANKS", "1")),
                   help="MPI ranks for the PETSc rows (env RANKS)")
    p.add_argument("--launcher", default=os.environ.get("COMPARE_LAUNCHER", DEFAULT_LAUNCHER),
                   help="MPI launcher template, {ranks} is replaced (env COMPARE_LAUNCHER); as root add "
                        "--allow-run-as-root")
    p.add_argument("--reference-rtol", type=float, default=1e-10,
                   help="rtol of the multigrid reference the rows are compared with (default 1e-10)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per solver run")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--one", metavar="SOLVER", help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def check_cell(path) -> None:
    """InputError unless ``path`` is a valid cell file (what every solver row would read)."""
    from microstructures.cell import CellError
    from microstructures.io import read_cell
    try:
        read_cell(path).validate()
    except CellError as exc:
        msg = str(exc)
        raise InputError(msg if path in msg else f"{path}: {msg}") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if not os.path.exists(args.cell):
            raise InputError(f"{args.cell}: no such file")
        if args.one:
            row = run_one(args.one, args.cell, args.rtol, args.precision)
            if row.pop("rank", 0) == 0:
                print(json.dumps(row), flush=True)
            return 0
        solvers = [s.strip() for s in args.solvers.split(",") if s.strip()]
        bad = [s for s in solvers if s not in SOLVERS]
        if bad:
            raise InputError(f"unknown solver(s) {', '.join(bad)} (choose from {', '.join(SOLVERS)})")
        if args.ranks < 1:
            raise InputError(f"--ranks must be >= 1, got {args.ranks}")
        for name in ("rtol", "reference_rtol", "timeout"):
            v = getattr(args, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise InputError(f"--{name.replace('_', '-')} must be a positive number, got {v}")
        check_cell(args.cell)                  # once here, not once per solver subprocess
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = compare(args.cell, solvers, args.rtol, args.precision, args.ranks, args.launcher,
                     args.reference_rtol, args.timeout)
    print(json.dumps(report) if args.json else format_table(report), flush=True)
    return 1 if any(r["status"] == "failed" for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
