"""Many cells at once: ``python -m hpc.batch cells/*.h5 -o results.csv`` (issue 4 item 6).

Each cell is one dask.distributed task that reads the cell inside the worker
(``microstructures.io.read_cell``), runs ``solver.homogenize`` and returns one table row.
The client collects the rows into one table (CSV or HDF5, chosen by the extension of
``-o``), one row per cell, rewritten atomically (temporary file + rename) as cells
finish, at most every ``--flush-seconds`` and at the end, so an interrupted run keeps
what was done.

Columns (``COLUMNS``): the cell (path, name, shape, volume fraction of the non-void
phases, input sha256), ``status`` (ok / unconverged / failed) with ``error`` (one line),
C^H as its 21 upper-triangle entries ``C11 C12 .. C16 C22 .. C66`` (Voigt 11, 22, 33, 23,
13, 12, engineering shear; docs/DESIGN.md section 2), the engineering constants E1 E2 E3 G23
G13 G12 nu12 nu13 nu23, the solve (iterations and true relative residual, maxima over the
six load cases; converged; the estimated relative C^H error; times; settings) and the
dask worker that ran it.

Failures: any exception in a task (a corrupt file -> CellError, a solver error, a worker
that died) is retried ``--retries`` times (dask's ``retries=``); if it still fails the
cell gets a row with status ``failed`` and the one-line error, and the other cells go on.

Reruns: a cell whose path and input sha256 match a row with status ``ok`` in the
existing table is skipped; failed and unconverged cells are run again. Rows of cells not
named in this run are kept. The skip test does not look at the solver settings: after
changing --rtol, use --force or another table.

Clusters: a LocalCluster of ``--workers`` processes by default; ``--slurm`` submits
dask workers as Slurm jobs with dask-jobqueue's SLURMCluster (``--queue``, ``--cores``,
``--memory``, ``--walltime``, ``--jobs``, ``--prologue`` lines such as the venv
activation, ``--skip-directive=--mem`` where the site allocates memory by core,
``--interface``); ``--scheduler ADDRESS`` uses a running
scheduler. Each worker runs one cell at a time with ``--threads-per-worker`` torch
threads (a dask resource ``cells=1`` per worker on the clusters we start).

Exit status: 0 every cell ok (or skipped), 3 some cell did not converge (none failed),
4 some cell failed, 2 bad usage (no input files, unknown table extension).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import glob
import json
import logging
import math
import os
import socket
import sys
import time
from typing import Iterable, Optional, Sequence

import h5py
import numpy as np

log = logging.getLogger("hpc.batch")

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_UNCONVERGED, EXIT_CELLS_FAILED = 0, 1, 2, 3, 4

VOIGT = ("11", "22", "33", "23", "13", "12")
#: upper triangle of the 6x6 Voigt matrix, row-major: C11 C12 .. C16 C22 .. C66
C_COLUMNS = tuple(f"C{i + 1}{j + 1}" for i in range(6) for j in range(i, 6))
ENGINEERING = ("E1", "E2", "E3", "G23", "G13", "G12", "nu12", "nu13", "nu23")

_STR, _FLOAT, _INT = "str", "float", "int"
COLUMNS: dict = {
    "path": _STR, "name": _STR, "status": _STR, "error": _STR, "shape": _STR,
    "volume_fraction": _FLOAT,
    **{c: _FLOAT for c in C_COLUMNS},
    **{c: _FLOAT for c in ENGINEERING},
    "iterations_max": _INT, "converged": _INT, "residual_max": _FLOAT, "chom_error_estimate": _FLOAT,
    "time_read": _FLOAT, "time_setup": _FLOAT, "time_solve": _FLOAT, "time_total": _FLOAT,
    "rtol": _FLOAT, "precision": _STR, "preconditioner": _STR,
    "input_sha256": _STR, "worker": _STR,
}
MISSING = {_STR: "", _FLOAT: math.nan, _INT: -1}
TABLE_EXTENSIONS = (".csv", ".h5", ".hdf5")
OK, UNCONVERGED, FAILED = "ok", "unconverged", "failed"
MALLOC_TRIM = 128 << 20      # bytes; see local_cluster


# --------------------------------------------------------------------------- rows

def empty_row(**values) -> dict:
    row = {c: MISSING[t] for c, t in COLUMNS.items()}
    row.update(values)
    return row


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line (CellError messages already name the file)."""
    msg = " ".join(str(exc).split())
    from microstructures.cell import CellError
    if isinstance(exc, CellError) and msg:
        return msg
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def upper_triangle(C: np.ndarray) -> dict:
    return {f"C{i + 1}{j + 1}": float(C[i, j]) for i in range(6) for j in range(i, 6)}


def row_matrix(row: dict) -> np.ndarray:
    """The symmetric 6x6 C^H of a table row."""
    C = np.empty((6, 6))
    for i in range(6):
        for j in range(i, 6):
            C[i, j] = C[j, i] = float(row[f"C{i + 1}{j + 1}"])
    return C


def homogenize_cell(path: str, options: dict, threads: int = 1) -> dict:
    """The dask task: read ``path`` and homogenize it; one table row. Raises on failure
    (so that dask retries it); the client turns the final exception into a failed row."""
    import torch
    from hpc.results import sha256_of
    from microstructures.io import read_cell
    from solver.homogenize import homogenize

    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(int(threads))
    t0 = time.perf_counter()
    sha = sha256_of(path)
    cell = read_cell(path)
    t_read = time.perf_counter() - t0
    res = homogenize(cell, **options)
    eng = res.engineering
    try:
        from distributed import get_worker
        worker = get_worker().address
    except (ImportError, ValueError):
        worker = socket.gethostname()
    return empty_row(
        path=path, name=cell.name, status=OK if res.converged else UNCONVERGED,
        shape="x".join(map(str, cell.shape)), volume_fraction=float(np.mean(cell.solid_mask)),
        **upper_triangle(res.C), **{k: eng[k] for k in ENGINEERING},
        iterations_max=int(max(res.iterations)), converged=int(bool(res.converged)),
        residual_max=float(max(res.residuals)), chom_error_estimate=float(res.error_estimate),
        time_read=t_read, time_setup=res.times["setup"], time_solve=res.times["solve"],
        time_total=t_read + res.times["total"], rtol=res.rtol, precision=res.precision,
        preconditioner=res.preconditioner, input_sha256=sha, worker=worker)


def _failed_row_facts(path: str, options: dict) -> dict:
    """What a failed cell's row can still say: the settings asked for, and the cell's name
    and shape when its header reads (an unusable material, say, fails only in the solve)."""
    out = {k: options[k] for k in ("precision", "preconditioner") if isinstance(options.get(k), str)}
    try:
        from microstructures.io import read_header, read_npy_header
        head = read_npy_header(path) if path.lower().endswith(".npy") else read_header(path)
        out["shape"] = "x".join(map(str, head["shape"]))
        out["name"] = head.get("name") or os.path.splitext(os.path.basename(path))[0]
    except Exception:  # noqa: BLE001 - an unreadable file keeps the row's blanks
        out["name"] = os.path.splitext(os.path.basename(path))[0]
    return out


# --------------------------------------------------------------------------- table I/O

def table_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in TABLE_EXTENSIONS:
        raise ValueError(f"{path}: the table must end in .csv, .h5 or .hdf5")
    return "csv" if ext == ".csv" else "hdf5"


def _typed(value, kind):
    if kind == _STR:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    if kind == _INT:
        return int(value) if value not in ("", None) else -1
    return float(value) if value not in ("", None) else math.nan


def write_table(path: str, rows: Sequence[dict]) -> None:
    """Write ``rows`` atomically: CSV (floats with 17 significant digits) or HDF5 (one
    dataset per column, strings UTF-8; attrs: columns, convention)."""
    from microstructures.atomic import atomic_output
    from hpc.results import CONVENTION
    fmt = table_format(path)
    with atomic_output(path) as tmp:
        if fmt == "csv":
            with open(tmp, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(list(COLUMNS))
                for r in rows:
                    w.writerow([repr(float(r[c])) if t == _FLOAT else r[c] for c, t in COLUMNS.items()])
        else:
            with h5py.File(tmp, "w") as f:
                for c, t in COLUMNS.items():
                    vals = [r[c] for r in rows]
                    if t == _STR:
                        f.create_dataset(c, data=np.array(vals, dtype=object), dtype=h5py.string_dtype())
                    else:
                        f.create_dataset(c, data=np.array(vals, dtype=np.float64 if t == _FLOAT else np.int64))
                f.attrs["columns"] = json.dumps(list(COLUMNS))
                f.attrs["convention"] = CONVENTION
                f.attrs["rows"] = len(rows)


def read_table(path: str) -> list:
    """Rows (dicts with typed values) of a table written by ``write_table``."""
    if table_format(path) == "csv":
        with open(path, newline="") as fh:
            return [{c: _typed(r.get(c, ""), COLUMNS.get(c, _STR)) for c in r} for r in csv.DictReader(fh)]
    with h5py.File(path, "r") as f:
        cols = json.loads(f.attrs["columns"])
        data = {c: f[c][()] for c in cols}
    n = len(data[cols[0]]) if cols else 0
    return [{c: _typed(data[c][i], COLUMNS.get(c, _STR)) for c in cols} for i in range(n)]


# --------------------------------------------------------------------------- inputs

def expand_inputs(patterns: Iterable[str], exclude: Iterable[str] = ()) -> list:
    """Absolute paths, in order, without duplicates; arguments that are not files are
    taken as glob patterns (so a job script can pass 'cells/*.h5' quoted). A pattern's
    matches leave out the paths in ``exclude`` (the output table) and hpc.homogenize's
    result files (*.result.h5), which are not cells; a file named as such is kept."""
    skip = {os.path.abspath(e) for e in exclude}
    out, seen = [], set()
    for p in patterns:
        if os.path.exists(p):
            matches = [p]
        else:
            matches = [m for m in sorted(glob.glob(p))
                       if os.path.abspath(m) not in skip and not m.endswith(".result.h5")]
        for m in matches:
            a = os.path.abspath(m)
            if a not in seen:
                seen.add(a)
                out.append(a)
    return out


def _sha_or_empty(path: str) -> str:
    from hpc.results import sha256_of
    try:
        return sha256_of(path)
    except OSError:
        return ""


# --------------------------------------------------------------------------- the run

@dataclasses.dataclass
class BatchSummary:
    """What a run did. ``submitted``: paths sent to the workers (a rerun of a finished
    table submits only the failed and unconverged cells)."""
    total: int = 0
    skipped: int = 0
    ok: int = 0
    unconverged: int = 0
    failed: int = 0
    submitted: list = dataclasses.field(default_factory=list)
    failures: dict = dataclasses.field(default_factory=dict)
    wall: float = 0.0

    @property
    def exit_status(self) -> int:
        if self.failed:
            return EXIT_CELLS_FAILED
        return EXIT_UNCONVERGED if self.unconverged else EXIT_OK

    def line(self) -> str:
        return (f"{self.total} cells: {self.ok} ok, {self.unconverged} unconverged, {self.failed} failed, "
                f"{self.skipped} skipped (done before) in {self.wall:.1f} s")


def run_batch(paths: Sequence[str], output: str, client, options: Optional[dict] = None,
              retries: int = 2, threads: int = 1, resources: Optional[dict] = None,
              progress: bool = False, flush_seconds: float = 5.0, force: bool = False) -> BatchSummary:
    """Homogenize ``paths`` on the dask ``client``'s workers into the table ``output``.

    ``options`` are keyword arguments of ``solver.homogenize`` (rtol, precision,
    preconditioner, maxiter, ...); ``resources`` is passed to ``client.submit`` (e.g.
    {'cells': 1} to run one cell per worker at a time); ``force`` recomputes cells that
    are already ok in the table (e.g. after changing rtol).
    """
    from distributed import as_completed

    t0 = time.time()
    options = dict(options or {})
    table_format(output)
    paths = [os.path.abspath(p) for p in paths]
    rows = {}                                                # path -> row, table order
    if os.path.exists(output):
        for r in read_table(output):
            rows[r["path"]] = r
    summary = BatchSummary(total=len(paths))
    shas = {p: _sha_or_empty(p) for p in paths}
    todo = []
    for p in paths:
        old = rows.get(p)
        if not force and old is not None and old["status"] == OK and shas[p] and old["input_sha256"] == shas[p]:
            summary.skipped += 1
        else:
            todo.append(p)
    log.info("%d cells: %d done before (skipped), %d to run", len(paths), summary.skipped, len(todo))
    summary.submitted = list(todo)
    if not todo:
        summary.wall = time.time() - t0
        return summary

    futures = {}
    for i, p in enumerate(todo):
        key = f"homogenize-{shas[p][:16] or i}-{os.path.basename(p)}-{i}"
        fut = client.submit(homogenize_cell, p, options, threads, key=key, retries=retries, pure=False,
                            resources=resources)
        futures[fut] = p

    bar = None
    if progress:
        from tqdm import tqdm
        tty = sys.stderr.isatty()
        bar = tqdm(total=len(todo), unit="cell", desc="homogenize", file=sys.stderr,
                   mininterval=0.1 if tty else 10.0, dynamic_ncols=tty)
    last_flush = time.time()
    try:
        for fut in as_completed(list(futures)):
            p = futures[fut]
            if fut.status == "finished":
                row = fut.result()
                if row["status"] == OK:
                    summary.ok += 1
                else:
                    summary.unconverged += 1
                    log.warning("%s: not converged (max residual %.2e)", p, row["residual_max"])
            else:
                try:
                    exc = fut.exception()
                    err = one_line(exc)
                except Exception as e:  # cancelled future, lost scheduler
                    err = one_line(e)
                row = empty_row(path=p, status=FAILED, error=err, input_sha256=shas[p],
                                rtol=options.get("rtol", math.nan), **_failed_row_facts(p, options))
                summary.failed += 1
                summary.failures[p] = err
                log.warning("failed after %d retries: %s", retries, err if p in err else f"{p}: {err}")
            rows[p] = row
            fut.release()
            if bar is not None:
                bar.set_postfix(ok=summary.ok, failed=summary.failed, refresh=False)
                bar.update(1)
            if time.time() - last_flush >= flush_seconds:
                write_table(output, list(rows.values()))
                last_flush = time.time()
    finally:
        if bar is not None:
            bar.close()
        write_table(output, list(rows.values()))
    summary.wall = time.time() - t0
    return summary


# --------------------------------------------------------------------------- clusters

class _DropComputeFailed(logging.Filter):
    def filter(self, record):
        return not str(record.msg).startswith("Compute Failed")


def _quiet_failures_plugin():
    """Worker plugin: a failed cell is reported once, by the client, with its one-line
    error, instead of a traceback per attempt in every worker's log (use -v for those)."""
    from distributed import WorkerPlugin

    class QuietFailures(WorkerPlugin):
        def setup(self, worker):
            lg = logging.getLogger("distributed.worker")
            if not any(type(f).__name__ == "_DropComputeFailed" for f in lg.filters):
                lg.addFilter(_DropComputeFailed())

    return QuietFailures()


def local_cluster(workers: int, threads: int):
    """One process per worker, one cell at a time each (resource cells=1)."""
    import dask
    from distributed import LocalCluster
    # distributed spawns workers with MALLOC_TRIM_THRESHOLD_=65536, which makes numpy code
    # that allocates many mid-sized arrays ~2x slower (measured on the cell generators);
    # 128 MiB keeps memory returned to the OS without that cost
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": MALLOC_TRIM}):
        return LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                            resources={"cells": 1}, dashboard_address=None,
                            env={"OMP_NUM_THREADS": str(threads)})


def slurm_cluster(args):
    """dask-jobqueue SLURMCluster: each job runs cores/threads worker processes."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise RuntimeError("--slurm needs dask-jobqueue: pip install dask-jobqueue") from None
    processes = max(1, args.cores // args.threads_per_worker)
    kw = dict(cores=args.cores, processes=processes, memory=args.memory, walltime=args.walltime,
              worker_extra_args=["--resources", "cells=1"],
              job_script_prologue=[f"export OMP_NUM_THREADS={args.threads_per_worker}"] + list(args.prologue or []))
    if args.queue:
        kw["queue"] = args.queue
    if args.account:
        kw["account"] = args.account
    if args.skip_directive:
        kw["job_directives_skip"] = list(args.skip_directive)
    if args.interface:
        kw["interface"] = args.interface
    cluster = SLURMCluster(**kw)
    cluster.scale(jobs=args.jobs)
    log.info("Slurm job script:\n%s", cluster.job_script())
    return cluster


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hpc.batch",
        description="Homogenize many cells with dask.distributed; one table row per cell.",
        epilog="Exit status: 0 every cell ok (or skipped as done before), 3 some cell not converged "
               "(none failed), 4 some cell failed (its row has status=failed and the error), "
               "2 bad usage, 1 other error. A rerun skips cells whose path and sha256 match an ok row.")
    p.add_argument("cells", nargs="+", help="cell files (.h5) or glob patterns (quoted)")
    p.add_argument("-o", "--output", default="results.csv", help="table: .csv or .h5 (default results.csv)")
    g = p.add_argument_group("cluster")
    g.add_argument("--workers", type=int, default=None, help="LocalCluster worker processes (default: cores)")
    g.add_argument("--threads-per-worker", type=int, default=1, help="torch threads per cell (default 1)")
    g.add_argument("--scheduler", default=None, help="address of a running dask scheduler")
    g.add_argument("--slurm", action="store_true", help="start workers as Slurm jobs (dask-jobqueue)")
    g.add_argument("--queue", default=None, help="Slurm partition (--slurm)")
    g.add_argument("--account", default=None, help="Slurm account (--slurm)")
    g.add_argument("--cores", type=int, default=8, help="cores per Slurm job (--slurm, default 8)")
    g.add_argument("--memory", default="16GB", help="memory per Slurm job (--slurm, default 16GB)")
    g.add_argument("--walltime", default="01:00:00", help="walltime per Slurm job (--slurm)")
    g.add_argument("--jobs", type=int, default=1, help="Slurm jobs to start (--slurm, default 1)")
    g.add_argument("--prologue", action="append", help="shell line run before each Slurm worker (repeatable), "
                   "e.g. 'source .venv/bin/activate'")
    g.add_argument("--skip-directive", action="append", metavar="FLAG",
                   help="leave this #SBATCH flag out of the worker jobs (repeatable), e.g. --mem on "
                        "clusters that allocate memory by core (--slurm)")
    g.add_argument("--interface", default=None, help="network interface the scheduler and workers use (--slurm)")
    g.add_argument("--retries", type=int, default=2, help="retries of a failed cell (default 2)")
    g.add_argument("--force", action="store_true", help="recompute cells already ok in the table "
                   "(the skip test is path + sha256 only, not the solver settings)")
    g.add_argument("--flush-seconds", type=float, default=5.0, help="rewrite the table at most this often")
    s = p.add_argument_group("solver (as python -m hpc.homogenize)")
    s.add_argument("--rtol", type=float, default=1e-6)
    s.add_argument("--ctol", type=float, default=None)
    s.add_argument("--maxiter", type=int, default=20000)
    s.add_argument("--precision", choices=["float64", "float32"], default="float64")
    s.add_argument("--preconditioner", "--pc", choices=["jacobi", "multigrid"], default="multigrid",
                   help="PCG preconditioner (default multigrid)")
    s.add_argument("--soft", type=float, default=1e-6)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="more log output")
    return p


def bad_options(args) -> Optional[str]:
    """Why the solver options or the table ``-o`` cannot be used, or None: checked before
    the cluster starts, as python -m hpc.homogenize checks its flags (a bad table found
    after the solves would lose them)."""
    from microstructures.atomic import unwritable
    for name in ("rtol", "ctol", "soft"):
        v = getattr(args, name)
        if v is not None and not (v > 0 and math.isfinite(v)):
            return f"--{name} must be a positive number, got {v}"
        if name in ("rtol", "ctol") and v is not None and v >= 1:
            return f"--{name} {v:g} asks for no accuracy at all (a relative tolerance below 1, e.g. 1e-6)"
    if args.maxiter < 1:
        return f"--maxiter must be >= 1, got {args.maxiter}"
    why = unwritable(args.output)
    if why:
        return why
    if os.path.exists(args.output):
        try:
            rows = read_table(args.output)
            lacking = sorted({"path", "status", "input_sha256"} - set(rows[0])) if rows else []
            if lacking:
                raise KeyError(f"no column {', '.join(lacking)}")
        except Exception as exc:  # csv, h5py and json errors of a file that is not our table
            return (f"{args.output} exists and is not a table written by hpc.batch "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                    f"move it or name another -o")
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)
    log.setLevel(logging.INFO)
    import dask
    if not args.verbose:   # before distributed is imported: it configures its loggers then
        dask.config.set({"logging": {"distributed": "warning"}})
    try:
        table_format(args.output)
    except ValueError as e:
        log.error("error: %s", e)
        return EXIT_USAGE
    named = [c for c in args.cells if not glob.has_magic(c) and not os.path.exists(c)]
    if named:
        log.error("error: %s: no such file", named[0])
        return EXIT_USAGE
    paths = expand_inputs(args.cells, exclude=[args.output])
    missing = [c for c in args.cells if not glob.glob(c) and not os.path.exists(c)]
    for m in missing:
        log.warning("warning: %s matches no file", m)
    if not paths:
        log.error("error: no input cells")
        return EXIT_USAGE
    if args.retries < 0 or args.threads_per_worker < 1:
        log.error("error: --retries must be >= 0 and --threads-per-worker >= 1")
        return EXIT_USAGE
    why = bad_options(args)
    if why:
        log.error("error: %s", why)
        return EXIT_USAGE
    options = dict(rtol=args.rtol, ctol=args.ctol, maxiter=args.maxiter, precision=args.precision,
                   preconditioner=args.preconditioner, soft=args.soft)
    from distributed import Client
    with contextlib.ExitStack() as stack:
        resources = {"cells": 1}
        if args.scheduler:
            client = stack.enter_context(Client(args.scheduler))
            resources = None          # we do not know the workers' resources
        else:
            if args.slurm:
                cluster = stack.enter_context(slurm_cluster(args))
            else:
                workers = args.workers or max(1, (os.cpu_count() or 1) // args.threads_per_worker)
                cluster = stack.enter_context(local_cluster(workers, args.threads_per_worker))
            client = stack.enter_context(Client(cluster))
        log.info("dask scheduler %s", client.scheduler.address)
        if not args.verbose:
            client.register_plugin(_quiet_failures_plugin(), name="hpc-batch-quiet-failures")
        summary = run_batch(paths, args.output, client, options, retries=args.retries,
                            threads=args.threads_per_worker, resources=resources,
                            progress=not args.quiet,
                            flush_seconds=args.flush_seconds, force=args.force)
    log.info("%s -> %s", summary.line(), args.output)
    for p, err in summary.failures.items():
        log.info("failed: %s", err if p in err else f"{p}: {err}")
    return summary.exit_status


if __name__ == "__main__":
    sys.exit(main())
