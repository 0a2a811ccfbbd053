"""Strut lattices and hollow-strut (shell) lattices on a periodic topology.

Solid strut lattice: {f <= r}, f the periodic strut distance field (generators.struts),
r the strut radius. Shell lattice: hollow struts {r_in < f <= r_out}, wall thickness
t = r_out - r_in; where tubes meet, their hollows join.

The radius (or the inner radius) is found on the sorted field values
(generators.level), so the voxel volume fraction is the closest attainable to the target,
and a CellError is raised when that is farther than ``tol`` (0.005 absolute by default).
Radii are physical lengths (cell size units; with size 1 and periods 1, fractions of the
cell edge). Phase 0 is void (E = 0), phase 1 the solid.
"""
from __future__ import annotations

import itertools
import logging
import math

import numpy as np

from ..cell import Cell, CellError
from .grid import (VF_TOL, as_shape, as_triple, check_fraction, check_material, check_periods, check_tol,
                   jsonable, periodic_noise, voxel_positions)
from .level import Selection, select
from .struts import distance_field
from .topologies import Topology, random_graph, topology as named_topology

log = logging.getLogger(__name__)


def resolve_topology(topology, nodes: int = 16, k: int = 4, seed: int = 0) -> Topology:
    """A Topology from a name, 'random' (with nodes, k, seed) or a Topology itself."""
    if isinstance(topology, Topology):
        return topology
    if str(topology).strip().lower() == "random":
        return random_graph(nodes=nodes, k=k, seed=seed)
    return named_topology(topology)


def cell_segments(topo: Topology, periods) -> np.ndarray:
    """The topology tiled ``periods`` times, in fractional coordinates of the cell."""
    p = np.asarray(periods, dtype=np.float64)
    tiles = [topo.segments + np.array(m, dtype=np.float64) for m in itertools.product(*(range(int(q)) for q in p))]
    return np.concatenate(tiles) / p


def cell_nodes(topo: Topology, periods) -> np.ndarray:
    p = np.asarray(periods, dtype=np.float64)
    tiles = [topo.nodes + np.array(m, dtype=np.float64) for m in itertools.product(*(range(int(q)) for q in p))]
    return np.concatenate(tiles) / p


class _Field:
    """The strut distance field of one lattice, recomputed with a larger cutoff on demand."""

    def __init__(self, shape, topo, periods, size, shift, node_ratio, caps):
        self.shape, self.size, self.shift, self.caps = shape, size, shift, caps
        self.periods = np.asarray(periods, dtype=np.float64)
        segs = cell_segments(topo, periods)
        self.nodes = cell_nodes(topo, periods)
        weights = np.ones(len(segs))
        if node_ratio is not None:
            segs = np.concatenate([segs, np.stack([self.nodes, self.nodes], axis=1)])
            weights = np.concatenate([weights, np.full(len(self.nodes), float(node_ratio))])
        self.segments, self.weights = segs, weights
        self.length = float(np.linalg.norm((segs[:, 1] - segs[:, 0]) * size, axis=1).sum())
        self.voxel = max(s / n for s, n in zip(size, shape))
        self.reach = 0.5 * math.sqrt(sum(s * s for s in size))
        self.cutoff = 0.0
        self.values = None

    def radius_estimate(self, vf: float) -> float:
        """Strut radius if the struts did not overlap: vf |Omega| = pi r^2 L."""
        return math.sqrt(vf * np.prod(self.size) / (math.pi * max(self.length, 1e-300)))

    def at_least(self, cutoff: float) -> np.ndarray:
        """Field exact wherever it is <= cutoff (cutoff >= half the cell diagonal: everywhere)."""
        if self.values is None or cutoff > self.cutoff:
            exact = cutoff >= self.reach
            self.cutoff = math.inf if exact else cutoff
            self.values = distance_field(self.shape, self.segments, self.size, self.shift,
                                         self.weights, self.cutoff, self.caps)
        return self.values

    def node_distance(self, flat_index: np.ndarray) -> np.ndarray:
        """Periodic distance from the given voxel centres to the nearest node (tie-break)."""
        x = voxel_positions(flat_index, self.shape, self.shift)
        size = np.asarray(self.size)
        out = np.empty(len(x))
        for c in range(0, len(x), 4096):
            d = x[c:c + 4096, None, :] - self.nodes[None, :, :]
            d -= np.round(d)
            out[c:c + 4096] = np.sqrt((((d * size) ** 2).sum(axis=2)).min(axis=1))
        return out

    def select(self, count: int, guess: float, joints_first: bool = True, slack: int = 0) -> Selection:
        """The ``count`` voxels nearest the struts, enlarging the cutoff until that is exact.

        Ties (generators.level) go to the voxels nearest the nodes first (or last); if the
        count is still missed by more than ``slack`` voxels, by a fixed periodic noise.
        """
        sign = 1.0 if joints_first else -1.0

        def by_node(idx):
            return sign * self.node_distance(idx)

        def by_node_then_noise(idx):
            # the noise in unit-cell coordinates (positions times periods), so that the
            # unit cells of a cell with periods > 1 stay identical copies, as for TPMS
            x = voxel_positions(idx, self.shape, self.shift) * self.periods
            return np.stack([by_node(idx), periodic_noise(x)], axis=1)

        cutoff = max(guess, 2.0 * self.voxel)
        while True:
            f = self.at_least(cutoff)
            sel = select(f, count, by_node)
            if abs(sel.count - count) > slack:
                sel = select(f, count, by_node_then_noise)
            exact = np.isfinite(sel.level) and sel.count < np.count_nonzero(np.isfinite(f))
            if exact or math.isinf(self.cutoff) or count == 0:
                return sel
            cutoff *= 2.0


def _common(n, periods, size, shift, vf, E, nu):
    shape, periods = as_shape(n), as_triple(periods, "periods", positive=True, integer=True)
    check_periods(periods, shape)
    return (shape, periods, as_triple(size, "size", positive=True), as_triple(shift, "shift"),
            check_fraction(vf), *check_material(E, nu))


def _check_node_ratio(node_ratio):
    if node_ratio is None:
        return None
    node_ratio = float(node_ratio)
    if not (math.isfinite(node_ratio) and node_ratio > 0):
        raise CellError(f"node_ratio must be positive, got {node_ratio:g}")
    return node_ratio


def lattice(topology="octet", vf: float = 0.2, n=32, periods=1, E: float = 1.0, nu: float = 0.3,
            node_ratio: float | None = None, caps: bool = True, size=1.0, shift=0.0,
            tol: float = VF_TOL, nodes: int = 16, k: int = 4, seed: int = 0,
            name: str | None = None) -> Cell:
    """A strut lattice cell with solid volume fraction ``vf`` (within ``tol``).

    topology: a name from topology_names(), 'random' (random_graph(nodes, k, seed)) or a
    Topology; node_ratio: add node spheres of radius node_ratio * r; caps: hemispherical
    strut ends (False: flat cylinders). The radius found is ``cell.params['radius']``.
    """
    topo = resolve_topology(topology, nodes, k, seed)
    shape, periods, size, shift, vf, E, nu = _common(n, periods, size, shift, vf, E, nu)
    tol = check_tol(tol)
    node_ratio = _check_node_ratio(node_ratio)
    field = _Field(shape, topo, periods, size, shift, node_ratio, caps)
    N = int(np.prod(shape))
    target = int(round(vf * N))
    sel = field.select(target, 1.5 * field.radius_estimate(vf) + 2 * field.voxel, slack=int(tol * N))
    r, achieved = sel.level, sel.fraction
    if abs(achieved - vf) > tol:
        raise CellError(f"lattice {topo.name}: volume fraction {vf:g} not reachable within {tol:g} "
                        f"on a {'x'.join(map(str, shape))} grid (closest {achieved:.4f})")
    if r < field.voxel:
        log.warning("lattice %s: strut radius %.3g is below one voxel (%.3g): refine the grid",
                    topo.name, r, field.voxel)
    phases = sel.mask.astype(np.uint8)
    log.info("lattice %s: radius %.6g, volume fraction %.5f (target %g)", topo.name, r, achieved, vf)
    params = {"topology": topo.name, "vf": vf, "n": list(shape), "periods": list(periods), "E": E, "nu": nu,
              "node_ratio": node_ratio, "caps": bool(caps), "shift": list(shift), "tol": tol,
              "radius": r, "vf_achieved": achieved}
    if str(topology).strip().lower() == "random":
        params.update(nodes=int(nodes), k=int(k), seed=int(seed))
    return Cell(phases, E=[0.0, E], nu=[nu, nu], size=size, name=name or f"lattice-{topo.name}-vf{vf:g}",
                generator="lattice", params=jsonable(params))


def shell_lattice(topology="octet", vf: float = 0.1, n=32, outer_radius: float | None = None, periods=1,
                  E: float = 1.0, nu: float = 0.3, node_ratio: float | None = None, caps: bool = True,
                  size=1.0, shift=0.0, tol: float = VF_TOL, nodes: int = 16, k: int = 4, seed: int = 0,
                  name: str | None = None) -> Cell:
    """A hollow-strut lattice cell with solid volume fraction ``vf`` (within ``tol``).

    outer_radius: the tubes' outer radius; default: the radius of the solid lattice of
    volume fraction min(2 vf, (1 + vf)/2). The wall thickness is solved for ``vf``;
    ``cell.params`` holds 'outer_radius', 'inner_radius' and 'thickness'.
    """
    topo = resolve_topology(topology, nodes, k, seed)
    shape, periods, size, shift, vf, E, nu = _common(n, periods, size, shift, vf, E, nu)
    tol = check_tol(tol)
    node_ratio = _check_node_ratio(node_ratio)
    field = _Field(shape, topo, periods, size, shift, node_ratio, caps)
    N = int(np.prod(shape))
    if outer_radius is None:
        vf_out = min(2.0 * vf, 0.5 * (1.0 + vf))
        outer = field.select(int(round(vf_out * N)), 1.5 * field.radius_estimate(vf_out) + 2 * field.voxel,
                             slack=int(tol * N))
        r_out = outer.level
    else:
        r_out = float(outer_radius)
        if not (math.isfinite(r_out) and r_out > 0):
            raise CellError(f"outer_radius must be positive, got {outer_radius!r}")
        f = field.at_least(r_out * 1.01 + field.voxel)
        outer = Selection(f <= r_out, r_out, int(np.count_nonzero(f <= r_out)))
    count_out = outer.count
    target = int(round(vf * N))
    if count_out / N < vf - tol:
        raise CellError(f"shell lattice {topo.name}: outer radius {r_out:g} gives solid struts of volume "
                        f"fraction {count_out / N:.4f} < {vf:g}; increase outer_radius")
    # hollow: the voxels nearest the strut axes; ties hollowed away from the joints first
    hollow = field.select(count_out - target, r_out, joints_first=False, slack=int(0.5 * tol * N))
    solid = outer.mask & ~hollow.mask
    r_in, achieved = hollow.level, float(solid.mean())
    if abs(achieved - vf) > tol:
        raise CellError(f"shell lattice {topo.name}: volume fraction {vf:g} not reachable within {tol:g} "
                        f"on a {'x'.join(map(str, shape))} grid (closest {achieved:.4f})")
    thickness = r_out - max(r_in, 0.0)
    if thickness < field.voxel:
        log.warning("shell lattice %s: wall thickness %.3g is below one voxel (%.3g): refine the grid",
                    topo.name, thickness, field.voxel)
    phases = solid.astype(np.uint8)
    r_in = max(r_in, 0.0)
    log.info("shell lattice %s: outer radius %.6g, thickness %.6g, volume fraction %.5f (target %g)",
             topo.name, r_out, thickness, achieved, vf)
    params = {"topology": topo.name, "vf": vf, "n": list(shape), "periods": list(periods), "E": E, "nu": nu,
              "node_ratio": node_ratio, "caps": bool(caps), "shift": list(shift), "tol": tol,
              "outer_radius": r_out, "inner_radius": r_in, "thickness": thickness, "vf_achieved": achieved}
    if str(topology).strip().lower() == "random":
        params.update(nodes=int(nodes), k=int(k), seed=int(seed))
    return Cell(phases, E=[0.0, E], nu=[nu, nu], size=size, name=name or f"shell-{topo.name}-vf{vf:g}",
                generator="shell", params=jsonable(params))
