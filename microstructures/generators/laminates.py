"""Periodic laminates: flat layers normal to one axis, one phase per layer."""
from __future__ import annotations

import logging

import numpy as np

from ..cell import Cell, CellError
from .grid import VF_TOL, as_axis, as_shape, as_triple, centres, check_materials, check_tol, jsonable

log = logging.getLogger(__name__)


def laminate(fractions=(0.5, 0.5), E=(1.0, 10.0), nu=(0.3, 0.3), axis="z", n=32, periods=1,
             size=1.0, shift=0.0, tol: float = VF_TOL, name: str | None = None) -> Cell:
    """Layers normal to ``axis``: layer k has thickness fractions[k] of a period and phase k.

    The stack repeats ``periods`` times along the axis. A voxel belongs to the layer that
    holds its centre, so the voxel fractions are multiples of 1/n_axis per period; a
    warning is logged when one is farther than ``tol`` from the request. The achieved
    fractions are ``cell.params['fractions_achieved']``.
    """
    f = np.atleast_1d(np.asarray(fractions, dtype=np.float64))
    if f.ndim != 1 or f.size < 1 or not np.all(np.isfinite(f)) or np.any(f <= 0):
        raise CellError(f"laminate fractions must be positive numbers, got {fractions!r}")
    if abs(f.sum() - 1.0) > 1e-6:
        raise CellError(f"laminate fractions must sum to 1, got {f.sum():g}")
    E, nu = check_materials(E, nu, "layer")
    if E.size != f.size:
        raise CellError(f"give one E and nu per layer: {f.size} layers, {E.size} materials")
    ax = as_axis(axis)
    shape = as_shape(n)
    periods = int(as_triple(periods, "periods", positive=True, integer=True)[0])
    if shape[ax] < 2 * periods:
        raise CellError(f"{periods} periods along {'xyz'[ax]} need at least {2 * periods} voxels there "
                        f"(two per period), the grid has {shape[ax]}: use a finer grid or fewer periods")
    tol = check_tol(tol)
    size = as_triple(size, "size", positive=True)
    shift = as_triple(shift, "shift")
    u = centres(shape, shift)[ax] * periods
    u = np.round(u - np.floor(u), 12) % 1.0
    bounds = np.cumsum(f)[:-1]
    layer = np.searchsorted(bounds, u, side="right").astype(np.uint8 if f.size <= 256 else np.uint16)
    bshape = [1, 1, 1]
    bshape[ax] = -1
    phases = np.ascontiguousarray(np.broadcast_to(layer.reshape(bshape), shape))
    achieved = np.bincount(layer, minlength=f.size) / layer.size
    worst = float(np.max(np.abs(achieved - f)))
    if worst > tol:
        log.warning("laminate: layer fractions %s on %d voxels per axis are off by up to %.4f from %s",
                    np.round(achieved, 4).tolist(), shape[ax], worst, f.tolist())
    params = jsonable({"fractions": f, "E": E, "nu": nu, "axis": "xyz"[ax], "n": list(shape),
                       "periods": periods, "shift": list(shift), "fractions_achieved": achieved})
    return Cell(phases, E=E, nu=nu, size=size, name=name or f"laminate-{'xyz'[ax]}-{f.size}layers",
                generator="laminate", params=params)
