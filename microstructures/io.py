"""Reading and writing cells (docs/DESIGN.md section 4).

HDF5 schema::

    /phases          uint8 or uint16 (n_x, n_y, n_z), phase id per voxel
    /materials/E     float64 (P,)  Young's modulus per phase, 0 marks void
    /materials/nu    float64 (P,)  Poisson's ratio per phase, in (-1, 0.5)
    attrs            size (3,) float64, name, generator, params (JSON string)

A ``.npy`` file holds phase ids only; its materials must be given (E, nu). Every bad
input raises CellError with one line naming the file. Writes are atomic (temporary file
in the same directory, then rename). ``read_phases_block`` reads a periodic hyperslab
without loading the whole grid, for a rank of a distributed domain.

``percolates`` and ``write_vti`` live in percolation.py and vti.py and are re-exported
here for convenience.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
from typing import Sequence

import h5py
import numpy as np

from .atomic import atomic_output
from .cell import Cell, CellError
from .percolation import percolates  # noqa: F401  (re-export)
from .vti import write_vti  # noqa: F401  (re-export)

log = logging.getLogger(__name__)

__all__ = ["read_cell", "write_cell", "read_header", "read_npy_header", "read_phases_block", "phase_ids",
           "percolates", "write_vti"]


def _is_npy(path: str) -> bool:
    return path.lower().endswith(".npy")


def _check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise CellError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CellError(f"{path}: is a directory, not a cell file")
    if not os.access(path, os.R_OK):
        raise CellError(f"{path}: cannot read: permission denied")


def _open_h5(path: str) -> h5py.File:
    _check_exists(path)
    try:
        is_h5 = h5py.is_hdf5(path)
    except OSError as e:
        raise CellError(f"{path}: cannot read: {e}") from None
    if not is_h5:
        raise CellError(f"{path}: not an HDF5 file (a cell is .h5, or .npy phases with E and nu given)")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise CellError(f"{path}: cannot read: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _phases_dataset(f: h5py.File, path: str) -> h5py.Dataset:
    ds = f.get("phases")
    if not isinstance(ds, h5py.Dataset):
        raise CellError(f"{path}: no /phases dataset")
    if ds.ndim != 3:
        raise CellError(f"{path}: /phases must be 3-D (n_x, n_y, n_z), got shape {ds.shape}")
    if ds.size == 0:
        raise CellError(f"{path}: /phases is empty (shape {ds.shape})")
    if ds.dtype.kind not in "iub":
        raise CellError(f"{path}: /phases has dtype {ds.dtype}: phase ids must be integers (or a boolean mask)")
    return ds


def phase_ids(arr: np.ndarray) -> np.ndarray:
    """Phase ids as stored, except that a boolean mask (a common export of other tools)
    becomes uint8 ids: False -> phase 0, True -> phase 1."""
    return arr.astype(np.uint8) if arr.dtype.kind == "b" else arr


def _load_npy(path: str, mmap: bool) -> np.ndarray:
    """A .npy array (memory-mapped if ``mmap``), never unpickled; CellError otherwise."""
    _check_exists(path)
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CellError(f"{path}: not a .npy array file ({_one_line(e)})") from None
    if not isinstance(arr, np.ndarray):          # np.load opens a zip (.npz) archive whatever its name
        close = getattr(arr, "close", None)
        if close is not None:
            close()
        raise CellError(f"{path}: an .npz archive, not a .npy array: save the phases with numpy.save")
    if arr.dtype.kind not in "iub":
        raise CellError(f"{path}: phases have dtype {arr.dtype}: phase ids must be integers (or a boolean mask)")
    if arr.ndim != 3 or arr.size == 0:
        raise CellError(f"{path}: phases must be a non-empty 3-D array, got shape {arr.shape}")
    return arr


def read_npy_header(path) -> dict:
    """Shape and dtype of ``.npy`` phases (memory-mapped, nothing read); CellError if unusable."""
    path = os.fspath(path)
    arr = _load_npy(path, mmap=True)
    return {"shape": tuple(arr.shape), "dtype": arr.dtype}


def _attr_str(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _attr_str(value.item())
    return str(value)


def _numbers(value, path: str, what: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise CellError(f"{path}: {what} must be numbers, got {_attr_str(value)[:40]!r}") from None


def _header(f: h5py.File, path: str) -> dict:
    """Materials and attributes (no phases) of an open cell file."""
    mats = f.get("materials")
    E = nu = None
    if isinstance(mats, h5py.Group):
        if isinstance(mats.get("E"), h5py.Dataset):
            E = _numbers(mats["E"][()], path, "/materials/E")
        if isinstance(mats.get("nu"), h5py.Dataset):
            nu = _numbers(mats["nu"][()], path, "/materials/nu")
    size = (1.0, 1.0, 1.0)
    if "size" in f.attrs:
        s = _numbers(f.attrs["size"], path, "attribute size").ravel()
        if s.size == 1:
            s = np.repeat(s, 3)
        if s.size != 3:
            raise CellError(f"{path}: attribute size must have 3 entries, got {s.size}")
        size = tuple(float(v) for v in s)
    params = {}
    if "params" in f.attrs:
        raw = _attr_str(f.attrs["params"])
        try:
            params = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError:
            log.warning("%s: attribute params is not JSON; kept as text", path)
            params = {"text": raw}
        if not isinstance(params, dict):
            params = {"value": params}
    return {"E": E, "nu": nu, "size": size, "name": _attr_str(f.attrs.get("name", "")),
            "generator": _attr_str(f.attrs.get("generator", "")), "params": params}


def _materials(path: str, E_file, nu_file, E, nu) -> tuple[np.ndarray, np.ndarray]:
    """Materials given by the caller override the file's; at least one source is needed."""
    if (E is None) != (nu is None):
        raise CellError(f"{path}: give both E and nu, or neither")
    if E is not None:
        if E_file is not None:
            log.info("%s: materials given override the file's", path)
        E_file, nu_file = E, nu
    if E_file is None or nu_file is None:
        what = "a .npy file holds only phase ids" if _is_npy(path) else "no /materials/E and /materials/nu"
        raise CellError(f"{path}: {what}: give the materials (E and nu per phase)")
    try:
        E_arr = np.atleast_1d(np.asarray(E_file, dtype=np.float64))
        nu_arr = np.atleast_1d(np.asarray(nu_file, dtype=np.float64))
    except (TypeError, ValueError):
        raise CellError(f"{path}: materials must be numbers") from None
    if E_arr.ndim != 1 or nu_arr.ndim != 1 or E_arr.size == 0:
        raise CellError(f"{path}: materials/E and materials/nu must be 1-D, one value per phase")
    if E_arr.shape != nu_arr.shape:
        raise CellError(f"{path}: materials/E has {E_arr.size} values but materials/nu has {nu_arr.size}")
    return E_arr, nu_arr


def _validated(cell: Cell, path: str) -> Cell:
    try:
        return cell.validate()
    except CellError as e:
        raise CellError(f"{path}: {e}") from None


def read_cell(path, E: Sequence[float] | None = None, nu: Sequence[float] | None = None) -> Cell:
    """Read a cell from HDF5 (the schema above) or from ``.npy`` phases with E and nu given.

    E, nu: per-phase materials; required for ``.npy``, and override the file's for HDF5.
    The cell is validated (Cell.validate) before it is returned.
    """
    path = os.fspath(path)
    if _is_npy(path):
        phases = phase_ids(_load_npy(path, mmap=False))
        E_arr, nu_arr = _materials(path, None, None, E, nu)
        name = os.path.splitext(os.path.basename(path))[0]
        return _validated(Cell(phases, E_arr, nu_arr, name=name, generator="npy"), path)
    with _open_h5(path) as f:
        try:
            ds = _phases_dataset(f, path)
            head = _header(f, path)
            phases = phase_ids(ds[()])
        except (OSError, KeyError, RuntimeError) as e:
            raise CellError(f"{path}: cannot read: {_one_line(e)}") from None
    E_arr, nu_arr = _materials(path, head["E"], head["nu"], E, nu)
    cell = Cell(phases, E_arr, nu_arr, size=head["size"], name=head["name"], generator=head["generator"],
                params=head["params"])
    return _validated(cell, path)


def read_header(path) -> dict:
    """Shape, dtype, materials and attributes of an HDF5 cell, without reading /phases.

    Returns dict(shape, dtype, E, nu, size, name, generator, params); E and nu are None if
    the file has no materials.
    """
    path = os.fspath(path)
    with _open_h5(path) as f:
        ds = _phases_dataset(f, path)
        head = _header(f, path)
        head.update(shape=tuple(ds.shape), dtype=ds.dtype)
    return head


def _periodic_pieces(start: int, stop: int, n: int) -> list[tuple[slice, slice]]:
    """Split [start, stop) on a periodic axis of length n into (source, destination) slices."""
    pieces, pos = [], start
    while pos < stop:
        s = pos % n
        length = min(n - s, stop - pos)
        pieces.append((slice(s, s + length), slice(pos - start, pos - start + length)))
        pos += length
    return pieces


def read_phases_block(path, start: Sequence[int], stop: Sequence[int]) -> np.ndarray:
    """phases[start:stop] per axis, periodic (start may be < 0, stop > n), reading only that block.

    E.g. start = (i0 - 1, -1, -1), stop = (i1 + 1, n_y + 1, n_z + 1) gives a slab with a
    one-voxel periodic halo. HDF5 files are read by hyperslab; ``.npy`` files by memory map.
    """
    path = os.fspath(path)
    start, stop = _block_bounds(start, stop)
    if _is_npy(path):
        return phase_ids(_gather(_load_npy(path, mmap=True), start, stop))
    with _open_h5(path) as f:
        ds = _phases_dataset(f, path)
        try:
            return phase_ids(_gather(ds, start, stop))
        except (OSError, RuntimeError) as e:
            raise CellError(f"{path}: cannot read: {_one_line(e)}") from None


def _block_bounds(start, stop) -> tuple[tuple[int, ...], tuple[int, ...]]:
    try:
        start = tuple(int(v) for v in start)
        stop = tuple(int(v) for v in stop)
    except (TypeError, ValueError):
        raise CellError(f"block bounds must be 3 integers each, got {start!r}, {stop!r}") from None
    if len(start) != 3 or len(stop) != 3:
        raise CellError(f"block bounds must be 3 integers each, got {start!r}, {stop!r}")
    if any(b < a for a, b in zip(start, stop)):
        raise CellError(f"block stop {stop} is before start {start}")
    return start, stop


def _gather(source, start, stop) -> np.ndarray:
    out = np.empty(tuple(b - a for a, b in zip(start, stop)), dtype=source.dtype)
    if out.size == 0:
        return out
    axes = [_periodic_pieces(a, b, n) for a, b, n in zip(start, stop, source.shape)]
    for (sx, dx), (sy, dy), (sz, dz) in itertools.product(*axes):
        out[dx, dy, dz] = source[sx, sy, sz]
    return out


def _write_contents(f: h5py.File, cell: Cell, params_json: str, compression) -> None:
    """The datasets and attributes of a cell file (kept separate so tests can break it)."""
    phases = cell.phases
    dtype = np.uint8 if cell.n_phases <= 256 else np.uint16
    opts = {"compression": compression, "chunks": True} if compression else {}
    f.create_dataset("phases", data=phases.astype(dtype, copy=False), **opts)
    mats = f.create_group("materials")
    mats.create_dataset("E", data=np.asarray(cell.E, dtype=np.float64))
    mats.create_dataset("nu", data=np.asarray(cell.nu, dtype=np.float64))
    f.attrs["size"] = np.asarray(cell.size, dtype=np.float64)
    f.attrs["name"] = str(cell.name)
    f.attrs["generator"] = str(cell.generator)
    f.attrs["params"] = params_json


def write_cell(cell: Cell, path, compression: str | None = None) -> None:
    """Write ``cell`` to HDF5 at ``path`` atomically; the cell is validated first.

    compression: e.g. 'gzip' (chunked); default None keeps /phases contiguous, the fastest
    layout for hyperslab reads.
    """
    path = os.fspath(path)
    cell.validate()
    if cell.n_phases > 65536:
        raise CellError(f"{cell.n_phases} phases do not fit uint16 phase ids")
    try:
        params_json = cell.params_json()
    except (TypeError, ValueError) as e:
        raise CellError(f"cannot write {path}: params are not JSON serializable ({_one_line(e)})") from None
    with atomic_output(path) as tmp:
        try:
            with h5py.File(tmp, "w") as f:
                _write_contents(f, cell, params_json, compression)
        except (OSError, ValueError, TypeError) as e:
            raise CellError(f"cannot write {path}: {_one_line(e)}") from None
    log.info("wrote %s (%s)", path, cell.summary())

