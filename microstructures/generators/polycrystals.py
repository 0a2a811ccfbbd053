"""Periodic Voronoi polycrystals: grains around random seeds, each grain one phase."""
from __future__ import annotations

import logging

import numpy as np
from scipy.spatial import cKDTree

from ..cell import Cell, CellError
from .grid import as_shape, as_triple, centres, check_materials, check_seed, jsonable

log = logging.getLogger(__name__)


def grain_counts(grains: int, fractions) -> np.ndarray:
    """Grains per phase, proportional to ``fractions`` (largest remainders), summing to ``grains``."""
    f = np.asarray(fractions, dtype=np.float64)
    exact = grains * f / f.sum()
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: grains - counts.sum()]] += 1
    return counts


def voronoi(grains: int = 16, E=(1.0, 10.0), nu=(0.3, 0.3), fractions=None, n=32, seed: int = 0,
            size=1.0, shift=0.0, name: str | None = None) -> Cell:
    """A periodic Voronoi tessellation of ``grains`` seeds mapped to len(E) phases.

    Seeds are uniform in the cell (``seed`` fixes them); a voxel belongs to the grain of
    the nearest seed under the periodic (minimum-image) distance. Grains are assigned to
    phases in proportion to ``fractions`` (default equal), in random order. Phase p has
    material E[p], nu[p] (E = 0: void grains). The voxel fraction of each phase is
    ``cell.params['phase_fractions']``.
    """
    E, nu = check_materials(E, nu)
    P = E.size
    grains = int(grains)
    if grains < 1:
        raise CellError(f"voronoi: grains must be >= 1, got {grains}")
    if fractions is None:
        fractions = np.ones(P)
    fractions = np.atleast_1d(np.asarray(fractions, dtype=np.float64))
    if fractions.shape != (P,) or not np.all(np.isfinite(fractions)) or np.any(fractions < 0) or fractions.sum() <= 0:
        raise CellError(f"voronoi: give one non-negative fraction per phase ({P}), got {fractions.tolist()}")
    shape = as_shape(n)
    size = np.asarray(as_triple(size, "size", positive=True))
    shift = as_triple(shift, "shift")
    rng = np.random.default_rng(check_seed(seed))
    seeds = rng.random((grains, 3)) * size
    counts = grain_counts(grains, fractions)
    grain_phase = rng.permutation(np.repeat(np.arange(P), counts))
    if np.any(counts == 0):
        log.warning("voronoi: %d grains leave phases %s without a grain", grains,
                    np.flatnonzero(counts == 0).tolist())
    u = [np.minimum(np.mod(x, 1.0) * s, np.nextafter(s, 0)) for x, s in zip(centres(shape, shift), size)]
    tree = cKDTree(np.minimum(seeds, np.nextafter(size, 0)), boxsize=size)  # needs [0, size)
    yz = np.stack(np.meshgrid(u[1], u[2], indexing="ij"), axis=-1).reshape(-1, 2)
    grain = np.empty(shape, dtype=np.int64)
    for i, x in enumerate(u[0]):  # one x-slab at a time keeps the query memory small
        pts = np.column_stack([np.full(len(yz), x), yz])
        grain[i] = tree.query(pts)[1].reshape(shape[1:])
    dtype = np.uint8 if P <= 256 else np.uint16
    phases = grain_phase[grain].astype(dtype)
    achieved = np.bincount(phases.ravel(), minlength=P) / phases.size
    params = jsonable({"grains": grains, "E": E, "nu": nu, "fractions": fractions / fractions.sum(),
                       "seed": int(seed), "n": list(shape), "shift": list(shift),
                       "grains_per_phase": counts, "phase_fractions": achieved})
    cell = Cell(phases, E=E, nu=nu, size=tuple(size), name=name or f"voronoi-{grains}grains-{P}phases",
                generator="voronoi", params=params)
    if not np.any(E[np.unique(phases)] > 0):
        raise CellError("voronoi: every grain drew a void phase; change seed or fractions")
    return cell
