"""Periodic non-overlapping spherical or ellipsoidal inclusions (or pores) in a matrix.

Centres are placed by random sequential addition (RSA): uniform random trial centres,
accepted when the new inclusion (semi-axes enlarged by 1 % plus half the ``gap``)
overlaps no accepted one under the periodic minimum-image distance. Ellipsoid overlap
is decided exactly with the Perram-Wertheim contact function

    F(A, B) = max_{0<=l<=1} l (1 - l) r^T [(1 - l) A + l B]^-1 r,   overlap iff F < 1,

A = Q diag(a^2) Q^T the shape matrix of an ellipsoid (x^T A^-1 x <= 1) and r the vector
between the centres (J. W. Perram and M. S. Wertheim, J. Comput. Phys. 58, 1985).

Each voxel then gets rho(x) = min_i |diag(a_i)^-1 Q_i^T (x - c_i)| (1 on the surface of
inclusion i), and the inclusions are {rho <= s}, the common scale s found on the sorted
rho values (generators.level) so the inclusion voxel fraction is the closest attainable
to the target; the inclusions at that scale are checked again not to overlap.

Phase 0 is the matrix, phase 1 the inclusions; E[p] = 0 makes phase p void (pores: E =
(E_m, 0); floating inclusions in void: E = (0, E_i)). ``vf`` is the fraction of phase 1.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from ..cell import Cell, CellError
from ..percolation import periodic_cluster_count
from .grid import (VF_TOL, as_shape, as_triple, check_fraction, check_materials, check_seed, check_tol,
                   jsonable, periodic_noise, scatter_min, voxel_positions)
from .level import select

log = logging.getLogger(__name__)

SHAPES = ("sphere", "ellipsoid")
_PLACE_MARGIN = 0.01  # inclusions are placed 1 % larger than nominal


def random_rotations(rng: np.random.Generator, count: int) -> np.ndarray:
    """Uniformly random rotation matrices (count, 3, 3), from normalized Gaussian quaternions."""
    q = rng.normal(size=(count, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], axis=-1),
        np.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], axis=-1),
        np.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], axis=-1),
    ], axis=1)


def shape_matrices(rot: np.ndarray, semi: np.ndarray) -> np.ndarray:
    """A = Q diag(a^2) Q^T for each rotation Q (k, 3, 3) and semi-axes a (3,) or (k, 3)."""
    semi = np.broadcast_to(semi, (len(rot), 3))
    return np.einsum("kij,kj,klj->kil", rot, semi ** 2, rot)


def contact_function(r: np.ndarray, A: np.ndarray, B: np.ndarray, iters: int = 32) -> np.ndarray:
    """Perram-Wertheim F for pairs (r (k,3), A (k,3,3), B (k,3,3)); F < 1 means overlap.

    F(l) is concave in l on [0, 1], so a golden-section search finds its maximum.
    """
    def F(lam):
        C = (1.0 - lam)[:, None, None] * A + lam[:, None, None] * B
        x = np.linalg.solve(C, r[:, :, None])[:, :, 0]
        return lam * (1.0 - lam) * (r * x).sum(axis=1)

    g = (math.sqrt(5.0) - 1.0) / 2.0
    lo, hi = np.zeros(len(r)), np.ones(len(r))
    x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
    f1, f2 = F(x1), F(x2)
    for _ in range(iters):
        left = f1 > f2  # the maximum lies in [lo, x2]
        hi = np.where(left, x2, hi)
        lo = np.where(left, lo, x1)
        x2n = np.where(left, x1, lo + g * (hi - lo))
        x1n = np.where(left, hi - g * (hi - lo), x2)
        f1, f2 = np.where(left, np.nan, f2), np.where(left, f1, np.nan)  # the kept point's value moves
        x1, x2 = x1n, x2n
        f1 = np.where(np.isnan(f1), F(x1), f1)
        f2 = np.where(np.isnan(f2), F(x2), f2)
    return np.maximum(f1, f2)


def _min_image(d: np.ndarray, size: np.ndarray) -> np.ndarray:
    return d - size * np.round(d / size)


def _overlaps(d: np.ndarray, A: np.ndarray, B: np.ndarray, inner: np.ndarray, inner_b: float,
              outer: np.ndarray, outer_b: float) -> bool:
    """Whether ellipsoid B at the origin overlaps any of the ellipsoids A at offsets -d.

    Bounding spheres (outer radii) and inscribed spheres (inner radii) settle most pairs;
    the contact function decides the rest.
    """
    dist = np.linalg.norm(d, axis=1)
    if np.any(dist < inner + inner_b):
        return True
    near = np.flatnonzero(dist < outer + outer_b)
    if near.size == 0:
        return False
    return bool(np.any(contact_function(d[near], A[near], np.broadcast_to(B, (near.size, 3, 3))) < 1.0))


def rsa_centres(rng: np.random.Generator, A: np.ndarray, semi: np.ndarray, size: np.ndarray,
                max_attempts: int) -> np.ndarray:
    """Random sequential addition of ellipsoids (shape matrices A (k,3,3), semi-axes (3,)) in the periodic box."""
    count = len(A)
    inner, outer = np.full(count, semi.min()), np.full(count, semi.max())
    centres = np.empty((count, 3))
    placed = 0
    for _ in range(int(max_attempts)):
        if placed == count:
            break
        c = rng.random(3) * size
        if placed and _overlaps(_min_image(centres[:placed] - c, size), A[:placed], A[placed],
                                inner[:placed], inner[placed], outer[:placed], outer[placed]):
            continue
        centres[placed] = c
        placed += 1
    if placed < count:
        raise CellError(f"inclusions: placed only {placed} of {count} after {max_attempts} attempts; "
                        "lower vf or the inclusion size (random sequential addition jams near vf 0.38 for spheres)")
    return centres


def any_overlap(centres: np.ndarray, A: np.ndarray, semi: np.ndarray, size: np.ndarray) -> bool:
    """Whether two of the periodic ellipsoids overlap (minimum-image pairs)."""
    inner, outer = np.full(len(A), semi.min()), np.full(len(A), semi.max())
    return any(_overlaps(_min_image(centres[:i] - centres[i], size), A[:i], A[i], inner[:i], inner[i],
                         outer[:i], outer[i]) for i in range(1, len(centres)))


def inclusions(vf: float = 0.2, n=32, radius: float | None = None, count: int | None = None,
               shape: str = "sphere", axes=(1.0, 1.0, 1.0), aligned: bool = False,
               E=(1.0, 10.0), nu=(0.3, 0.3), seed: int = 0, gap: float = 0.0, size=1.0, shift=0.0,
               tol: float = VF_TOL, max_attempts: int = 200_000, name: str | None = None) -> Cell:
    """Matrix (phase 0) with non-overlapping periodic inclusions (phase 1) of fraction ``vf``.

    radius: equivalent-sphere radius (physical units), default 0.1 of the smallest cell
    edge; or give ``count`` instead. shape 'ellipsoid': semi-axes proportional to ``axes``
    with the volume of that sphere, randomly oriented unless ``aligned``. gap: least
    clearance between inclusions at placement (physical units); inclusions closer than about
    a voxel can touch in the voxel image: a warning is logged when fewer separate inclusions
    than were placed come out (``params['clusters']``), and a gap of a voxel or two keeps
    them apart. The radius must be at least one voxel. Deterministic in ``seed``.
    ``cell.params`` holds the count and the final equivalent 'radius' and 'semi_axes'.
    """
    vf = check_fraction(vf)
    if shape not in SHAPES:
        raise CellError(f"inclusions: unknown shape {shape!r}; choose sphere or ellipsoid")
    E, nu = check_materials(E, nu)
    if E.size != 2:
        raise CellError(f"inclusions: give two materials (matrix, inclusion), got {E.size}")
    grid = as_shape(n)
    size = np.asarray(as_triple(size, "size", positive=True))
    shift = as_triple(shift, "shift")
    seed = check_seed(seed)
    h = float(np.max(size / np.asarray(grid)))          # the largest voxel edge
    gap = float(gap)
    if not (math.isfinite(gap) and gap >= 0):
        raise CellError(f"inclusions: gap must be >= 0, got {gap:g}")
    tol = check_tol(tol)
    volume = float(np.prod(size))
    ratios = np.asarray(as_triple(axes, "axes", positive=True)) if shape == "ellipsoid" else np.ones(3)
    ratios = ratios / np.prod(ratios) ** (1.0 / 3.0)
    if radius is not None and count is not None:
        raise CellError("inclusions: give radius or count, not both")
    if count is not None:
        count = int(count)
        if count < 1:
            raise CellError(f"inclusions: count must be >= 1, got {count}")
    else:
        r = 0.1 * float(size.min()) if radius is None else float(radius)
        if not (math.isfinite(r) and r > 0):
            raise CellError(f"inclusions: radius must be positive, got {radius!r}")
        count = max(1, int(round(vf * volume / (4.0 / 3.0 * math.pi * r ** 3))))
    # the equivalent radius that gives vf exactly with this count
    r0 = (vf * volume / (count * 4.0 / 3.0 * math.pi)) ** (1.0 / 3.0)
    semi = r0 * ratios
    if float(semi.min()) < h:
        raise CellError(f"inclusions: {count} inclusion(s) of semi-axes {np.round(semi, 4).tolist()} are below "
                        f"one voxel ({h:.3g}); use a finer grid or fewer, larger inclusions")
    a_max = float(semi.max())
    # pairs are checked under the minimum image only: an inclusion must be shorter than half the cell
    limit = float(size.min()) / (2.0 if count == 1 else 4.0)
    if a_max * (1.0 + _PLACE_MARGIN) + 0.5 * gap >= limit:
        raise CellError(f"inclusions: {count} inclusion(s) of semi-axes {np.round(semi, 4).tolist()} are too "
                        f"large for the cell (largest semi-axis must stay below {limit:.3g}); use more, smaller ones")
    rng = np.random.default_rng(seed)
    rot = (np.broadcast_to(np.eye(3), (count, 3, 3)) if (aligned or shape == "sphere")
           else random_rotations(rng, count))
    place_semi = semi * (1.0 + _PLACE_MARGIN) + 0.5 * gap
    centres = rsa_centres(rng, shape_matrices(rot, place_semi), place_semi, size, max_attempts)

    # rho is exact up to 1 + margin: room for the volume-fraction scale s (voxelization error ~ h / r)
    margin = 0.1 + 2.0 * h / float(semi.min())
    bound = a_max * (1.0 + margin)
    rho = np.full(grid, np.inf)
    for c, Q in zip(centres, rot):
        start, coords = [], []
        for ax, nax in enumerate(grid):
            lo = (c[ax] - bound) / size[ax] - shift[ax]
            hi = (c[ax] + bound) / size[ax] - shift[ax]
            i0, i1 = math.ceil(lo * nax - 0.5), math.floor(hi * nax - 0.5) + 1
            start.append(i0)
            coords.append(((np.arange(i0, i1) + 0.5) / nax + shift[ax]) * size[ax] - c[ax])
        d = np.stack(np.meshgrid(*coords, indexing="ij"), axis=-1)
        y = (d @ Q) / semi  # body frame: y_k = (Q^T d)_k / a_k
        box = np.sqrt((y * y).sum(axis=-1))
        box[box > 1.0 + margin] = np.inf
        scatter_min(rho, box, start)

    target = int(round(vf * rho.size))
    sel = select(rho, target)
    if abs(sel.fraction - vf) > tol:
        sel = select(rho, target, lambda idx: periodic_noise(voxel_positions(idx, grid, shift)))
    if abs(sel.fraction - vf) > tol:
        raise CellError(f"inclusions: volume fraction {vf:g} not reachable within {tol:g} on a "
                        f"{'x'.join(map(str, grid))} grid (closest {sel.fraction:.4f}); use a finer grid")
    scale = sel.level
    final = semi * scale
    if not (scale <= 1.0 + margin) or (scale > 1.0 + _PLACE_MARGIN and
                                       any_overlap(centres, shape_matrices(rot, final), final, size)):
        raise CellError(f"inclusions: hitting vf {vf:g} on this grid needs inclusions {scale:.3g} times their "
                        "nominal size, and they would overlap; use a finer grid, a lower vf or a larger gap")
    phases = sel.mask.astype(np.uint8)
    separate = periodic_cluster_count(sel.mask)
    if separate < count:
        log.warning("inclusions: the %d %ss form %d separate clusters in the voxel image: some touch; "
                    "a gap of a voxel or two keeps them apart", count, shape, separate)
    log.info("inclusions: %d %ss, radius %.4g, fraction %.5f (target %g)", count, shape, r0 * scale,
             sel.fraction, vf)
    params = jsonable({"vf": vf, "n": list(grid), "shape": shape, "count": count, "axes": ratios,
                       "aligned": bool(aligned), "E": E, "nu": nu, "seed": int(seed), "gap": gap,
                       "shift": list(shift), "tol": tol, "radius": r0 * scale, "semi_axes": final,
                       "vf_achieved": sel.fraction, "clusters": separate})
    return Cell(phases, E=E, nu=nu, size=tuple(size), name=name or f"inclusions-{shape}-vf{vf:g}",
                generator="inclusions", params=params)
