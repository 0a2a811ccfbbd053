"""Level-set thresholds that hit a target voxel count.

A generator builds a scalar field f on the voxel centres and sets solid = f <= level.
The voxel volume fraction is a step function of the level, jumping at the sorted field
values, so the level is found directly on the sorted values (an exact bisection): among
the admissible cut positions the one whose voxel count is closest to the target is taken,
and the level is placed in the middle of the gap there.

Admissible cuts lie between values that differ by more than a small tolerance
(``REL_GAP`` of the values' magnitude). Values equal in exact arithmetic but different by
rounding (voxels related by a symmetry of the cell, or by a periodic shift) therefore
fall on the same side of the level: generated cells keep the symmetries of their field.

Some fields have large groups of equal values: the distance to an axis-aligned strut is
the same for every voxel along it, so a strut lattice's volume fraction can only move in
steps of about n_struts * n / n^3. ``select`` can then split the one group that straddles
the target by secondary keys (lexicographically, with the same tie rule), e.g. the
distance to the nearest node, which fills the joints first like a small fillet, and, as
a last resort that gives up the cell's point symmetries, a fixed periodic noise.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np

#: Relative gap below which two values count as equal.
REL_GAP = 1e-9


@dataclasses.dataclass
class Selection:
    """mask: the selected voxels; level: f <= level is selected, except that with a split
    group (``split``) the voxels with f == level are selected only in part; count: #mask."""
    mask: np.ndarray
    level: float
    count: int
    split: bool = False

    @property
    def fraction(self) -> float:
        return self.count / self.mask.size


def _tol(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return REL_GAP * (float(np.abs(finite).max()) if finite.size else 0.0)


def _cuts(sorted_values: np.ndarray) -> np.ndarray:
    """Admissible cut positions 0 .. N in a sorted array (see the module docstring)."""
    with np.errstate(invalid="ignore"):
        gaps = np.diff(sorted_values) > _tol(sorted_values)
    return np.concatenate([[0], np.flatnonzero(gaps) + 1, [sorted_values.size]])


def _lexicographic(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order of rows of keys (m, q), sorted by column 0, then 1, ..., and the admissible cuts."""
    m = keys.shape[0]
    gid = np.zeros(m, dtype=np.int64)
    order = np.arange(m)
    new = np.ones(m, dtype=bool)
    for col in range(keys.shape[1]):
        k = keys[:, col]
        order = np.lexsort((k, gid))
        ks, gs = k[order], gid[order]
        with np.errstate(invalid="ignore"):
            new = np.concatenate([[True], (np.diff(gs) != 0) | (np.diff(ks) > _tol(k))])
        gid = np.empty(m, dtype=np.int64)
        gid[order] = np.cumsum(new) - 1
    return order, np.concatenate([np.flatnonzero(new), [m]])


def select(field: np.ndarray, count: int,
           secondary: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> Selection:
    """Voxels with the smallest ``field`` values, as close to ``count`` of them as ties allow.

    secondary: optional function of flat voxel indices returning keys, (m,) or (m, q),
    used to split the group of equal field values that straddles ``count`` (smallest
    keys first, compared lexicographically).
    """
    field = np.asarray(field, dtype=np.float64)
    flat = field.ravel()
    total = flat.size
    count = int(min(max(count, 0), total))
    order = np.argsort(flat, kind="stable")
    s = flat[order]
    cuts = _cuts(s)
    k = int(cuts[np.argmin(np.abs(cuts - count))])
    mask = np.zeros(total, dtype=bool)
    if k != count and secondary is not None:
        j = int(np.searchsorted(cuts, count, side="right"))
        lo, hi = int(cuts[j - 1]), int(cuts[j])
        members = order[lo:hi]
        keys = np.asarray(secondary(members), dtype=np.float64).reshape(len(members), -1)
        sub, sub_cuts = _lexicographic(keys)
        m = int(sub_cuts[np.argmin(np.abs(sub_cuts - (count - lo)))])
        if abs(lo + m - count) < abs(k - count):
            mask[order[:lo]] = True
            mask[members[sub[:m]]] = True
            return Selection(mask.reshape(field.shape), float(s[lo]), lo + m, split=True)
    mask[order[:k]] = True
    if k == 0:
        level = -np.inf
    elif k == total or not np.isfinite(s[k]):
        level = float(s[k - 1])
    else:
        level = float(0.5 * (s[k - 1] + s[k]))
    return Selection(mask.reshape(field.shape), level, k)
