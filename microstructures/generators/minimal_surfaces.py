"""Triply periodic minimal surface (TPMS) solids from their level-set approximations.

With x, y, z in [0, 2*pi) per period (nodal approximations, Schoen / von Schnering):

    P      cos x + cos y + cos z
    G      sin x cos y + sin z cos x + sin y cos z                     (gyroid)
    D      cos x cos y cos z - sin x sin y sin z                       (diamond)
    I-WP   2 (cos x cos y + cos y cos z + cos z cos x) - (cos 2x + cos 2y + cos 2z)
    F-RD   4 cos x cos y cos z - (cos 2x cos 2y + cos 2y cos 2z + cos 2z cos 2x)

The field T is evaluated at the voxel centres. A *network* solid is T <= c, a *sheet*
solid is |T| <= c; c is chosen on the sorted field values (generators.level) so that the
voxel volume fraction is the closest attainable to the target (voxels related by a
symmetry of T stay together, so the cell keeps the surface's symmetry; only where that
misses by more than ``tol`` is one such group split), and a CellError is raised if the
result is farther than ``tol`` (absolute, default 0.005) from the target. The cell holds
``periods`` unit cells of the surface per axis; phase 0 is void (E = 0), phase 1 solid.
"""
from __future__ import annotations

import logging

import numpy as np

from ..cell import Cell, CellError
from .grid import (VF_TOL, as_shape, as_triple, centres, check_fraction, check_material, check_periods,
                   check_tol, jsonable, periodic_noise, voxel_positions)
from .level import select

log = logging.getLogger(__name__)


def _p(c, s, c2):
    return c[0] + c[1] + c[2]


def _g(c, s, c2):
    return s[0] * c[1] + s[2] * c[0] + s[1] * c[2]


def _d(c, s, c2):
    return c[0] * c[1] * c[2] - s[0] * s[1] * s[2]


def _iwp(c, s, c2):
    return 2.0 * (c[0] * c[1] + c[1] * c[2] + c[2] * c[0]) - (c2[0] + c2[1] + c2[2])


def _frd(c, s, c2):
    return 4.0 * c[0] * c[1] * c[2] - (c2[0] * c2[1] + c2[1] * c2[2] + c2[2] * c2[0])


#: surface name -> implicit function of (cos, sin, cos 2*) per axis, each broadcastable
SURFACES = {"P": _p, "G": _g, "D": _d, "IWP": _iwp, "FRD": _frd}

_ALIASES = {"p": "P", "primitive": "P", "schwarz_p": "P", "g": "G", "gyroid": "G",
            "d": "D", "diamond": "D", "schwarz_d": "D", "iwp": "IWP", "i-wp": "IWP",
            "i_wp": "IWP", "frd": "FRD", "f-rd": "FRD", "f_rd": "FRD"}

FORMS = ("network", "sheet")


def surface_name(surface: str) -> str:
    """Canonical surface name (P, G, D, IWP, FRD) from a name or alias, e.g. 'gyroid'."""
    key = _ALIASES.get(str(surface).strip().lower())
    if key is None:
        raise CellError(f"unknown TPMS surface {surface!r}; choose from P, G (gyroid), D, IWP, FRD")
    return key


def tpms_field(surface: str, n=32, periods=1, shift=0.0) -> np.ndarray:
    """The implicit function T of ``surface`` at the voxel centres, float64 (n_x, n_y, n_z).

    ``shift`` (fraction of the cell, per axis) evaluates T at the centres plus shift.
    """
    fn = SURFACES[surface_name(surface)]
    shape = as_shape(n)
    periods = as_triple(periods, "periods", positive=True, integer=True)
    shift = as_triple(shift, "shift")
    c, s, c2 = [], [], []
    for axis, (u, p) in enumerate(zip(centres(shape, shift), periods)):
        x = 2.0 * np.pi * p * u
        bshape = [1, 1, 1]
        bshape[axis] = -1
        c.append(np.cos(x).reshape(bshape))
        s.append(np.sin(x).reshape(bshape))
        c2.append(np.cos(2.0 * x).reshape(bshape))
    return np.broadcast_to(fn(c, s, c2), shape).astype(np.float64)


def tpms(surface: str = "G", form: str = "network", vf: float = 0.3, n=32, periods=1,
         E: float = 1.0, nu: float = 0.3, size=1.0, shift=0.0, tol: float = VF_TOL,
         name: str | None = None) -> Cell:
    """A TPMS network or sheet cell with solid volume fraction ``vf`` (within ``tol``).

    surface: P, G (gyroid), D, IWP or FRD; form: 'network' (T <= c) or 'sheet' (|T| <= c);
    n: voxels per axis (int or 3 ints); periods: unit cells of the surface per cell axis;
    E, nu: the solid; size: physical cell size; shift: fraction of the cell added to the
    voxel-centre coordinates. The level c found is ``cell.params['level']``.
    """
    key = surface_name(surface)
    if form not in FORMS:
        raise CellError(f"unknown TPMS form {form!r}; choose 'network' or 'sheet'")
    vf = check_fraction(vf)
    tol = check_tol(tol)
    E, nu = check_material(E, nu)
    shape = as_shape(n)
    periods = as_triple(periods, "periods", positive=True, integer=True)
    check_periods(periods, shape)
    size = as_triple(size, "size", positive=True)
    shift = as_triple(shift, "shift")
    periods_arr = np.asarray(periods, dtype=np.float64)
    T = tpms_field(key, shape, periods, shift)
    f = np.abs(T) if form == "sheet" else T
    target = int(round(vf * f.size))
    sel = select(f, target)
    if abs(sel.fraction - vf) > tol:
        # too coarse a grid for the symmetric level sets: split the tie group (see level.py)
        # the noise is taken in surface-period coordinates, so the periods still tile exactly
        sel = select(f, target, lambda idx: periodic_noise(voxel_positions(idx, shape, shift) * periods_arr))
        log.info("TPMS %s %s: volume fraction reached by splitting a group of symmetric voxels; "
                 "the cell is not exactly symmetric (grid %s is coarse)", key, form, shape)
    level, achieved = sel.level, sel.fraction
    if abs(achieved - vf) > tol:
        raise CellError(f"TPMS {key} {form}: volume fraction {vf:g} not reachable within {tol:g} "
                        f"on a {'x'.join(map(str, shape))} grid (closest {achieved:.4f}); use a finer grid")
    phases = sel.mask.astype(np.uint8)
    log.info("TPMS %s %s: level %.6g, volume fraction %.5f (target %g)", key, form, level, achieved, vf)
    params = jsonable({"surface": key, "form": form, "vf": vf, "n": list(shape), "periods": list(periods),
                       "E": E, "nu": nu, "shift": list(shift), "tol": tol,
                       "level": level, "vf_achieved": achieved, "symmetric": not sel.split})
    name = name or f"tpms-{key}-{form}-vf{vf:g}"
    return Cell(phases, E=[0.0, E], nu=[nu, nu], size=size, name=name, generator="tpms", params=params)
