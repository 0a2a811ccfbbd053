"""Periodic distance fields of strut segments on the voxel grid.

The field of a set of segments s_m = [a_m, b_m] (fractional coordinates of the cell,
period 1) is

    f(x) = min_m  min_{L in Z^3}  dist(x, s_m + L) / w_m

with dist the Euclidean distance in physical units (fractional times the cell size) and
w_m a weight (1 for struts; node spheres are zero-length segments of weight
``node_ratio``). A strut of radius r is then {f <= r}: a capsule (cylinder with
hemispherical ends), or a flat-ended cylinder when ``caps=False``.

Vectorised per segment: each segment is evaluated on the box of voxels within the cutoff
of it (unwrapped coordinates, so the distance to that image is exact) and folded into the
periodic cell with scatter_min, which takes the minimum over the periodic images. Voxels
farther than the cutoff from every segment keep +inf.
"""
from __future__ import annotations

import math

import numpy as np

from .grid import scatter_min


def distance_field(shape, segments, size=(1.0, 1.0, 1.0), shift=(0.0, 0.0, 0.0),
                   weights=None, cutoff: float = math.inf, caps: bool = True) -> np.ndarray:
    """f(x) above at the voxel centres (+ shift), float64 (n_x, n_y, n_z); +inf beyond ``cutoff``.

    segments: (m, 2, 3) fractional end points (a zero-length segment is a point);
    weights: (m,) divisors of the distance, default 1; caps: False cuts struts flat at their ends.
    """
    shape = tuple(int(n) for n in shape)
    size = np.asarray(size, dtype=np.float64)
    shift = np.asarray(shift, dtype=np.float64)
    segments = np.asarray(segments, dtype=np.float64).reshape(-1, 2, 3)
    weights = np.ones(len(segments)) if weights is None else np.broadcast_to(weights, (len(segments),))
    # beyond the half diagonal of the cell every point is nearer to some image
    reach = 0.5 * float(np.linalg.norm(size))
    f = np.full(shape, np.inf)
    for (a, b), w in zip(segments, weights):
        cut = min(cutoff * w, reach + 1e-12 * reach) if math.isfinite(cutoff) else reach * (1 + 1e-12)
        if cut < 0:
            continue
        start, coords = [], []
        for ax, n in enumerate(shape):
            cf = cut / size[ax]
            lo, hi = min(a[ax], b[ax]) - cf, max(a[ax], b[ax]) + cf
            i0 = math.ceil((lo - shift[ax]) * n - 0.5)
            i1 = math.floor((hi - shift[ax]) * n - 0.5) + 1
            if i1 <= i0:
                break
            start.append(i0)
            x = ((np.arange(i0, i1) + 0.5) / n + shift[ax] - a[ax]) * size[ax]
            bshape = [1, 1, 1]
            bshape[ax] = -1
            coords.append(x.reshape(bshape))
        else:
            d2 = _segment_distance2(coords, (b - a) * size, caps)
            box = np.sqrt(d2) / w
            if math.isfinite(cutoff):
                box[box > cutoff] = np.inf
            scatter_min(f, box, start)
    return f


def _segment_distance2(p, ab, caps: bool) -> np.ndarray:
    """Squared distance of points p (3 broadcastable arrays, relative to a) to segment [0, ab]."""
    L2 = float(ab @ ab)
    if L2 == 0.0:
        return p[0] ** 2 + p[1] ** 2 + p[2] ** 2
    t = (p[0] * ab[0] + p[1] * ab[1] + p[2] * ab[2]) / L2
    if caps:
        np.clip(t, 0.0, 1.0, out=t)
    d2 = (p[0] - t * ab[0]) ** 2 + (p[1] - t * ab[1]) ** 2 + (p[2] - t * ab[2]) ** 2
    if not caps:
        d2[(t < 0.0) | (t > 1.0)] = np.inf
    return d2
