"""Whether the solid of a periodic cell connects opposite faces (percolates), per axis.

The solid (E > 0) voxels are labelled into face-connected (6-neighbour) components of
the non-periodic array; components touching across the periodic faces are then joined
in a graph whose edges carry the lattice shift of the crossing (+e_x, ...). Walking each
periodic cluster assigns every component an integer offset; an edge that closes a cycle
with a non-zero net shift w means the cluster wraps around the period: it is infinite in
the tiled structure along w, so it connects the opposite faces of every axis where w is
non-zero. Face connectivity is used because Q1 elements that share only an edge or a
corner transmit load through a hinge, not a load path worth counting.
"""
from __future__ import annotations

from collections import defaultdict, deque

import numpy as np
from scipy import ndimage

from .cell import Cell


def _clusters(cell):
    """Winding vectors per periodic solid cluster: {root label: [w, ...]} (integer
    3-vectors: the net lattice shift of each independent cycle that closes in the
    cluster), from the walk described in the module docstring."""
    mask = cell.solid_mask if isinstance(cell, Cell) else np.asarray(cell, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f"percolates: need a 3-D mask, got shape {mask.shape}")
    labels, _ = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, 1))
    graph = defaultdict(list)  # label -> [(neighbour label, shift)]
    for axis in range(3):
        hi = np.take(labels, -1, axis=axis).ravel()
        lo = np.take(labels, 0, axis=axis).ravel()
        both = (hi > 0) & (lo > 0)
        if not np.any(both):
            continue
        shift = np.zeros(3, dtype=np.int64)
        shift[axis] = 1
        for a, b in np.unique(np.stack([hi[both], lo[both]], axis=1), axis=0):
            graph[int(a)].append((int(b), shift))   # from the high face of a into b, one period on
            graph[int(b)].append((int(a), -shift))
    offset: dict[int, np.ndarray] = {}
    clusters = {}
    for root in graph:
        if root in offset:
            continue
        offset[root] = np.zeros(3, dtype=np.int64)
        windings = []
        queue = deque([root])
        while queue:
            u = queue.popleft()
            for v, s in graph[u]:
                if v not in offset:
                    offset[v] = offset[u] + s
                    queue.append(v)
                else:
                    w = offset[u] + s - offset[v]
                    if w.any():
                        windings.append(w)
        clusters[root] = windings
    return clusters


def periodic_cluster_count(mask) -> int:
    """Number of face-connected clusters of a 3-D boolean mask on the periodic grid
    (components that touch across a periodic face are one cluster)."""
    mask = np.asarray(mask, dtype=bool)
    labels, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(3, 1))
    parent = list(range(n + 1))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for axis in range(3):
        hi = np.take(labels, -1, axis=axis).ravel()
        lo = np.take(labels, 0, axis=axis).ravel()
        both = (hi > 0) & (lo > 0)
        for a, b in np.unique(np.stack([hi[both], lo[both]], axis=1), axis=0):
            ra, rb = find(int(a)), find(int(b))
            if ra != rb:
                parent[ra] = rb
    return len({find(i) for i in range(1, n + 1)})


def connectivity(cell) -> tuple[tuple[bool, bool, bool], int]:
    """(percolates(cell), spanning_rank(cell)) from one labelling of the solid."""
    clusters = _clusters(cell)
    wraps = np.zeros(3, dtype=bool)
    best = 0
    for windings in clusters.values():
        if windings:
            W = np.array(windings, dtype=np.int64)
            wraps |= (W != 0).any(axis=0)
            best = max(best, int(np.linalg.matrix_rank(W.astype(np.float64))))
    return tuple(bool(w) for w in wraps), best


def percolates(cell) -> tuple[bool, bool, bool]:
    """(x, y, z): whether a connected solid component wraps around the period in each axis
    (not necessarily the same component for every axis: see ``spanning_rank``).

    ``cell``: a Cell (solid = E > 0) or a boolean solid mask (n_x, n_y, n_z).
    """
    return connectivity(cell)[0]


def spanning_rank(cell) -> int:
    """The largest dimension (0-3) of the lattice of periods that one face-connected
    solid cluster wraps around: 3 when a single cluster spans the cell in three
    independent directions (a load-bearing 3-D solid); 1 for rods, 2 for plates, and
    also less than 3 for separate rods along x, y and z, which percolate along every
    axis but leave the shear between them to the void."""
    return connectivity(cell)[1]
