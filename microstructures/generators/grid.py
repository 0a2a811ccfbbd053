"""Voxel grid helpers shared by the generators: argument checking, voxel-centre
coordinates, and the periodic scatter of a local field box into the cell.

Coordinates are fractional: the cell is [0, 1)^3 and voxel (i, j, k) has its centre at
((i + 1/2)/n_x, (j + 1/2)/n_y, (k + 1/2)/n_z) + shift. Physical lengths are
fractional coordinates times the cell size.
"""
from __future__ import annotations

import json
import math
from typing import Any, Sequence

import numpy as np

from ..cell import CellError, json_default

#: Default tolerance on the voxel volume fraction (absolute): |achieved - target| <= VF_TOL.
VF_TOL = 0.005


def as_shape(n) -> tuple[int, int, int]:
    """Grid shape from an int or a 3-sequence of ints, each >= 1."""
    vals = _as_seq(n, "n")
    out = []
    for v in vals:
        if isinstance(v, bool) or not float(v).is_integer() or v < 1:
            raise CellError(f"n must be a positive integer or three of them, got {n!r}")
        out.append(int(v))
    return tuple(out)


def as_triple(v, name: str, positive: bool = False, integer: bool = False) -> tuple:
    """Three floats (or ints) from a scalar or a 3-sequence; finite, optionally > 0."""
    vals = _as_seq(v, name)
    out = []
    for x in vals:
        try:
            x = float(x)
        except (TypeError, ValueError):
            raise CellError(f"{name} must be a number or three numbers, got {v!r}") from None
        if not math.isfinite(x) or (positive and x <= 0):
            kind = "positive finite" if positive else "finite"
            raise CellError(f"{name} must be {kind}, got {v!r}")
        if integer:
            if not x.is_integer():
                raise CellError(f"{name} must be an integer or three integers, got {v!r}")
            x = int(x)
        out.append(x)
    return tuple(out)


def _as_seq(v, name: str) -> list:
    if np.ndim(v) == 0:
        return [v] * 3
    vals = list(np.asarray(v).ravel()) if not isinstance(v, (list, tuple)) else list(v)
    if len(vals) != 3:
        raise CellError(f"{name} must be a scalar or have 3 entries, got {len(vals)}")
    return vals


def check_fraction(vf, name: str = "vf") -> float:
    """A volume fraction strictly between 0 and 1."""
    try:
        vf = float(vf)
    except (TypeError, ValueError):
        raise CellError(f"{name} must be a number in (0, 1), got {vf!r}") from None
    if not (0.0 < vf < 1.0):
        raise CellError(f"{name} must lie in (0, 1), got {vf:g}")
    return vf


def check_tol(tol) -> float:
    """A volume-fraction tolerance: finite, in [0, 1)."""
    try:
        tol = float(tol)
    except (TypeError, ValueError):
        raise CellError(f"tol must be a number, got {tol!r}") from None
    if not (math.isfinite(tol) and 0.0 <= tol < 1.0):
        raise CellError(f"tol must lie in [0, 1), got {tol:g}")
    return tol


def check_seed(seed) -> int:
    """A random seed: an integer >= 0."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        try:
            ok = float(seed).is_integer()
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise CellError(f"seed must be an integer >= 0, got {seed!r}")
    seed = int(seed)
    if seed < 0:
        raise CellError(f"seed must be an integer >= 0, got {seed}")
    return seed


def check_periods(periods: Sequence[int], shape: Sequence[int]) -> None:
    """At least two voxels per period along every axis: a finer pattern aliases on the
    grid (e.g. 5 periods on 8 voxels reproduce 3 periods exactly)."""
    for axis, (p, n) in enumerate(zip(periods, shape)):
        if n < 2 * p:
            raise CellError(f"{p} periods along {'xyz'[axis]} need at least {2 * p} voxels there "
                            f"(two per period), the grid has {n}: use a finer grid or fewer periods")


def check_material(E, nu, what: str = "solid") -> tuple[float, float]:
    """Young's modulus > 0 and Poisson ratio in (-1, 0.5) of one solid phase."""
    E, nu = float(E), float(nu)
    if not (math.isfinite(E) and E > 0):
        raise CellError(f"E of the {what} must be positive and finite, got {E:g}")
    if not (-1.0 < nu < 0.5):
        raise CellError(f"nu of the {what} must lie in (-1, 0.5), got {nu:g}")
    return E, nu


def centres(shape: Sequence[int], shift=(0.0, 0.0, 0.0)) -> list[np.ndarray]:
    """Fractional voxel-centre coordinates, one 1-D float64 array per axis."""
    return [(np.arange(n, dtype=np.float64) + 0.5) / n + s for n, s in zip(shape, shift)]


def scatter_min(field: np.ndarray, box: np.ndarray, start: Sequence[int]) -> None:
    """field[wrap(start + index)] = min(field, box), in place, periodic in every axis.

    ``box`` holds values for the unwrapped voxel indices start[a] .. start[a] + box.shape[a]
    - 1; an axis longer than the grid (a box that wraps onto itself) is first folded by a
    minimum over its periodic images, so each voxel is written once.
    """
    idx = []
    for axis, n in enumerate(field.shape):
        length = box.shape[axis]
        if length > n:
            k = -(-length // n)
            moved = np.moveaxis(box, axis, 0)
            pad = np.full((k * n - length,) + moved.shape[1:], np.inf, dtype=box.dtype)
            moved = np.concatenate([moved, pad], axis=0).reshape((k, n) + moved.shape[1:]).min(axis=0)
            box = np.moveaxis(moved, 0, axis)
            length = n
        idx.append((start[axis] + np.arange(length)) % n)
    sel = np.ix_(*idx)
    field[sel] = np.minimum(field[sel], box)


def jsonable(obj: Any) -> Any:
    """Generator parameters as plain JSON types (numpy scalars and arrays converted)."""
    return json.loads(json.dumps(obj, default=json_default))


def voxel_positions(flat_index: np.ndarray, shape: Sequence[int], shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Fractional centres (m, 3) of the voxels with the given C-order flat indices."""
    ijk = np.unravel_index(np.asarray(flat_index), tuple(shape))
    return np.stack([(i + 0.5) / n + s for i, n, s in zip(ijk, shape, shift)], axis=1)


_NOISE_K = np.array([[1, 2, 3], [-2, 1, 1], [3, -1, 2], [1, -3, -2], [2, 3, -1], [-1, -1, 3]], dtype=np.float64)
_NOISE_PHASE = np.array([0.31, 1.27, 2.93, 4.11, 5.47, 0.89])


def periodic_noise(x: np.ndarray) -> np.ndarray:
    """A fixed smooth periodic function of fractional positions x (m, 3), period 1.

    Used only to order voxels whose level-set values tie exactly (see generators.level): a
    sum of incommensurate Fourier modes, generic enough that distinct voxels rarely tie,
    and a function of position so a periodically shifted grid gets the same order.
    """
    arg = 2.0 * np.pi * (np.asarray(x) @ _NOISE_K.T) + _NOISE_PHASE
    return np.cos(arg) @ np.sqrt(np.arange(1.0, len(_NOISE_PHASE) + 1.0))


def check_materials(E, nu, what: str = "phase") -> tuple[np.ndarray, np.ndarray]:
    """Per-phase E >= 0 (0 = void) and nu in (-1, 0.5), equal lengths, some phase solid."""
    E = np.atleast_1d(np.asarray(E, dtype=np.float64))
    nu = np.atleast_1d(np.asarray(nu, dtype=np.float64))
    if nu.size == 1 and E.size > 1:
        nu = np.full(E.shape, nu[0])
    if E.ndim != 1 or E.shape != nu.shape:
        raise CellError(f"give one E and one nu per {what}: got {E.size} E and {nu.size} nu")
    if not (np.all(np.isfinite(E)) and np.all(np.isfinite(nu))):
        raise CellError("E and nu must be finite")
    for p, (e, v) in enumerate(zip(E, nu)):
        if e < 0:
            raise CellError(f"{what} {p}: E = {e:g} must be > 0 (or 0 for void)")
        if not (-1.0 < v < 0.5):
            raise CellError(f"{what} {p}: nu = {v:g} must lie in (-1, 0.5)")
    if not np.any(E > 0):
        raise CellError("every phase is void (E = 0): give at least one E > 0")
    return E, nu


def as_axis(axis) -> int:
    """Axis index 0, 1, 2 from an int or 'x', 'y', 'z'."""
    names = {"x": 0, "y": 1, "z": 2, "0": 0, "1": 1, "2": 2}
    key = str(axis).strip().lower()
    if key not in names:
        raise CellError(f"axis must be x, y, z (or 0, 1, 2), got {axis!r}")
    return names[key]
