"""Set-up and tear-down around a distributed solve: block reading, field gathering and
collective error handling. The numerics themselves only see the Domain.

* ``setup_parallel(path_or_cell, comm)`` -> (domain, local cell): on one rank the
  ``SerialDomain`` and the whole cell; on more, an ``MPIDomain`` and a Cell whose
  ``phases`` is only the rank's block, read as a hyperslab (each rank opens the file
  read-only and reads its own block; no rank ever holds the whole grid). Validation
  is collective: every rank raises the same ``CellError`` or none does, so no rank is
  left waiting in a collective.
* ``gather_field(domain, x)`` -> the global field on rank 0 (None elsewhere).
* ``run_collectively(fn, ...)``: an exception on any rank prints ``rank R: message``
  and aborts the whole job (MPI_Abort), so no rank hangs in a collective.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback

import numpy as np
import torch

from microstructures.cell import Cell, CellError
from solver.domain import SerialDomain

log = logging.getLogger(__name__)

_GATHER_TAG = 1 << 14


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError:
        raise ImportError("mpi4py is not installed: install openmpi-bin python3-mpi4py "
                          "(or pip install mpi4py) to run distributed") from None
    return MPI


def _default_comm(comm):
    if comm is not None:
        return comm
    return _mpi().COMM_WORLD


# -- reading --------------------------------------------------------------------------
def _read_meta(path, E=None, nu=None, size=None):
    """(global shape, phases dtype, E, nu, size) of a cell file without reading phases:
    microstructures.io's readers, so a file is accepted or refused (one CellError line)
    exactly as in a serial run: HDF5 recognised by its content, ``.npy`` by its name."""
    from microstructures.io import read_header, read_npy_header
    if path.lower().endswith(".npy"):
        head = read_npy_header(path)
        if E is None or nu is None:
            raise CellError(f"{path}: a .npy file holds only phase ids: give the materials (E and nu per phase)")
    else:
        head = read_header(path)
        E = head["E"] if E is None else E
        nu = head["nu"] if nu is None else nu
        if E is None or nu is None:
            raise CellError(f"{path}: no /materials/E and /materials/nu: give the materials (E and nu per phase)")
        size = head["size"] if size is None else size
    dtype = np.dtype(np.uint8) if head["dtype"].kind == "b" else head["dtype"]   # a mask: ids 0 and 1
    return tuple(head["shape"]), dtype, E, nu, (1.0, 1.0, 1.0) if size is None else size


def read_block(path: str, start, stop) -> np.ndarray:
    """phases[start:stop] (3-D hyperslab) of a cell file: only that block is read."""
    from microstructures.io import read_phases_block
    return np.asarray(read_phases_block(path, tuple(start), tuple(stop)))


def _collective(comm, fn, *args, **kwargs):
    """Run fn on every rank; if it raised anywhere, raise on every rank (CellError with
    the first failing rank's message if that was a CellError, else RuntimeError)."""
    try:
        out, err = fn(*args, **kwargs), None
    except Exception as exc:  # noqa: BLE001 - re-raised below on every rank
        out, err = None, (isinstance(exc, CellError), f"{type(exc).__name__}: {exc}", str(exc))
    errs = comm.allgather(err)
    for r, e in enumerate(errs):
        if e is not None:
            is_cell, full, msg = e
            if is_cell:
                raise CellError(msg)
            raise RuntimeError(f"rank {r}: {full}")
    return out


def _validate_global(comm, local: np.ndarray, E, nu, size, dtype):
    """Cell.validate on the globally used phase ids (same answer on every rank)."""
    if np.dtype(dtype).kind not in "iu":
        raise CellError(f"phases must be integer phase ids, got dtype {dtype}")
    MPI = _mpi()
    # no rank may raise before the last collective: decide on global values only
    ext = np.array([int(local.max()), -int(local.min())] if local.size else [-1, 0], dtype=np.int64)
    gext = np.empty_like(ext)
    comm.Allreduce(ext, gext, op=MPI.MAX)
    if gext[1] > 0:
        raise CellError(f"phase ids must be >= 0, found {-int(gext[1])}")
    present = np.zeros(int(gext[0]) + 1, dtype=np.int32)
    if local.size:
        present[np.unique(local)] = 1
    allp = np.empty_like(present)
    comm.Allreduce(present, allp, op=MPI.MAX)
    used = np.flatnonzero(allp).astype(dtype)
    Cell(phases=used.reshape(-1, 1, 1), E=E, nu=nu, size=size).validate()


def setup_parallel(path_or_cell, comm=None, dims=None, align="multigrid", E=None, nu=None, size=None):
    """(domain, local cell) for this process.

    ``path_or_cell``: an HDF5 cell file (docs/DESIGN.md s.4), a ``.npy`` phase array (give
    ``E`` and ``nu``), or an in-memory Cell (every rank holds it; each keeps its
    block). ``comm`` defaults to MPI.COMM_WORLD. With one rank: (SerialDomain, whole
    validated cell). With more: (MPIDomain(global shape, comm, dims, align), Cell
    whose ``phases`` is the rank's block ``domain.local_slice`` and whose E, nu and
    size are the global ones). ``E``, ``nu``, ``size`` override the file's values.
    ``align`` defaults to "multigrid": blocks aligned so that solver.multigrid's
    levels stay on the same process grid (hpc.domain.multigrid_alignment); align=1
    gives the plain "first n % p blocks one larger" split (best balance for Jacobi
    when n is not a multiple of the rank count).
    Raises CellError on every rank alike for an invalid cell.
    """
    if comm is None:
        try:
            comm = _default_comm(None)
        except ImportError:
            comm = None
    nranks = 1 if comm is None else comm.Get_size()
    if isinstance(path_or_cell, Cell):
        full = path_or_cell
        E = full.E if E is None else E
        nu = full.nu if nu is None else nu
        size = full.size if size is None else size
        shape, dtype = tuple(full.phases.shape), full.phases.dtype
        if nranks == 1:
            cell = Cell(phases=full.phases, E=E, nu=nu, size=size, name=full.name,
                        generator=full.generator, params=dict(full.params)).validate()
            return SerialDomain(cell.shape), cell
        meta = (shape, dtype, E, nu, size)
        if len(shape) != 3 or min(shape) < 1:
            raise CellError(f"phases must be a non-empty 3-D array, got shape {shape}")
        reader = lambda lo, hi: np.array(full.phases[tuple(slice(a, b) for a, b in zip(lo, hi))])  # noqa: E731
        name, generator, params = full.name, full.generator, dict(full.params)
    else:
        path = os.fspath(path_or_cell)
        if nranks == 1:
            shape, dtype, E, nu, size = _read_meta(path, E, nu, size)
            phases = read_block(path, (0, 0, 0), shape)
            cell = Cell(phases=phases, E=E, nu=nu, size=size, name=os.path.basename(path)).validate()
            return SerialDomain(cell.shape), cell
        meta = _collective(comm, _read_meta, path, E, nu, size)
        reader = lambda lo, hi: read_block(path, lo, hi)  # noqa: E731
        name, generator, params = os.path.basename(path), "", {}
    shape, dtype, E, nu, size = meta
    from .domain import MPIDomain
    def make_domain():
        try:
            return MPIDomain(shape, comm, dims=dims, align=align)
        except ValueError as e:           # no process grid fits the cell: bad input, one line
            raise CellError(str(e)) from None
    domain = _collective(comm, make_domain)
    stop = tuple(s + n for s, n in zip(domain.local_start, domain.local_shape))
    phases = _collective(comm, reader, domain.local_start, stop)
    _collective(comm, _validate_global, domain.comm, phases, E, nu, size, dtype)
    cell = Cell(phases=phases, E=E, nu=nu, size=size, name=name, generator=generator, params=params)
    log.info("%r", domain)
    return domain, cell


# -- writing ----------------------------------------------------------------------------
def gather_field(domain, x_local: torch.Tensor, root: int = 0):
    """The global field (..., n_x, n_y, n_z) on rank ``root`` (a CPU tensor of
    x_local's dtype), None on the other ranks. Serial domains return x_local."""
    if getattr(domain, "size", 1) == 1:
        return x_local
    comm = domain.comm
    lead = tuple(x_local.shape[:-3])
    xl = x_local.detach().to("cpu").contiguous().numpy().reshape((-1,) + tuple(x_local.shape[-3:]))
    if domain.rank != root:
        for i in range(xl.shape[0]):   # one message per leading index: counts stay < 2**31
            comm.Send(np.ascontiguousarray(xl[i]), dest=root, tag=_GATHER_TAG)
        return None
    full = np.empty((xl.shape[0],) + tuple(domain.global_shape), dtype=xl.dtype)
    for r in range(domain.size):
        start, shp = domain.block(r)
        sl = tuple(slice(s, s + n) for s, n in zip(start, shp))
        if r == root:
            full[(slice(None),) + sl] = xl
            continue
        buf = np.empty(shp, dtype=xl.dtype)
        for i in range(xl.shape[0]):
            comm.Recv(buf, source=r, tag=_GATHER_TAG)
            full[(i,) + sl] = buf
    return torch.from_numpy(full.reshape(lead + tuple(domain.global_shape)))


def scatter_field(domain, x_full, lead, dtype, device, root: int = 0) -> torch.Tensor:
    """Each rank's block (*lead, l_x, l_y, l_z) of the global field ``x_full`` (a numpy
    array (*lead, n_x, n_y, n_z) on rank ``root``, ignored elsewhere): the reverse of
    gather_field. Serial domains return x_full as a tensor."""
    if getattr(domain, "size", 1) == 1:
        return torch.as_tensor(np.asarray(x_full)).to(dtype=dtype, device=device)
    comm = domain.comm
    lead = tuple(int(v) for v in lead)
    m = int(np.prod(lead))
    mine = np.empty((m,) + tuple(domain.local_shape), dtype=np.float64)
    if domain.rank == root:
        full = np.asarray(x_full, dtype=np.float64).reshape((m,) + tuple(domain.global_shape))
        for r in range(domain.size):
            start, shp = domain.block(r)
            sl = (slice(None),) + tuple(slice(s, s + n) for s, n in zip(start, shp))
            if r == root:
                mine[...] = full[sl]
                continue
            for i in range(m):         # one message per leading index: counts stay < 2**31
                comm.Send(np.ascontiguousarray(full[(i,) + sl[1:]]), dest=r, tag=_GATHER_TAG + 1)
    else:
        for i in range(m):
            comm.Recv(mine[i], source=root, tag=_GATHER_TAG + 1)
    return torch.from_numpy(mine.reshape(lead + tuple(domain.local_shape))).to(dtype=dtype, device=device)


# -- errors -----------------------------------------------------------------------------
def run_collectively(fn, *args, comm=None, **kwargs):
    """fn(*args, **kwargs), ending every rank if it raises on any one.

    On more than one rank an exception (not SystemExit: a collective exit status is
    the caller's to give) prints ``rank R: Type: message`` on stderr and calls
    comm.Abort(1): Open MPI then kills all ranks (including those waiting in a
    collective) and mpirun exits non-zero. On one rank the exception propagates."""
    try:
        comm = _default_comm(comm)
    except ImportError:
        comm = None
    try:
        return fn(*args, **kwargs)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure must end the job
        if comm is None or comm.Get_size() == 1:
            raise
        rank = comm.Get_rank()
        log.debug("rank %d traceback:\n%s", rank, traceback.format_exc())
        sys.stderr.write(f"rank {rank}: {type(exc).__name__}: {exc}\n")
        sys.stderr.flush()
        comm.Abort(1)
