"""Periodic strut topologies: named lattices in the unit cube and random periodic graphs.

A topology is a set of straight segments in fractional coordinates of one unit cell,
periodic with period 1 in x, y and z. Segments may cross the cell faces; segments that
are periodic images of each other are stored once. ``Topology.edges()`` gives the same
thing as a periodic graph (node i, node j, lattice shift of j), the form a graph network
wants.

Site names used below (cube of edge 1): corner (0,0,0); face centres (1/2,1/2,0) and
permutations; body centre (1/2,1/2,1/2); edge midpoints (1/2,0,0) and permutations;
tetrahedral sites (1/4 or 3/4)^3.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging

import numpy as np
from scipy.spatial import cKDTree

from ..cell import CellError
from .grid import check_seed

log = logging.getLogger(__name__)

_DIGITS = 9  # rounding of fractional coordinates when comparing sites and segments


@dataclasses.dataclass(frozen=True)
class Topology:
    """Segments (m, 2, 3) in unit-cell fractional coordinates, one per periodic image class."""
    name: str
    segments: np.ndarray
    description: str = ""

    @property
    def nodes(self) -> np.ndarray:
        """Distinct segment end points reduced to [0, 1)^3, (k, 3)."""
        ends = _wrap(self.segments.reshape(-1, 3))
        return np.unique(np.round(ends, _DIGITS), axis=0)

    def edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Periodic graph (i, j, shift): segment from nodes[i] to nodes[j] + shift."""
        nodes = self.nodes
        tree = cKDTree(nodes)
        ii, jj, shifts = [], [], []
        for a, b in self.segments:
            fa = np.floor(np.round(a, _DIGITS))
            _, i = tree.query(_wrap(a))
            _, j = tree.query(_wrap(b))
            ii.append(i)
            jj.append(j)
            shifts.append(np.round(b - nodes[j] - fa).astype(int))
        return np.array(ii), np.array(jj), np.array(shifts).reshape(-1, 3)

    def degrees(self) -> np.ndarray:
        """Number of struts meeting at each node (periodic)."""
        i, j, _ = self.edges()
        return np.bincount(np.concatenate([i, j]), minlength=len(self.nodes))

    @property
    def length(self) -> float:
        """Total strut length per unit cell (unit cube)."""
        return float(np.linalg.norm(self.segments[:, 1] - self.segments[:, 0], axis=1).sum())

    def __add__(self, other: "Topology") -> "Topology":
        return Topology(f"{self.name}+{other.name}",
                        unique_segments(np.concatenate([self.segments, other.segments])))


def _wrap(x: np.ndarray) -> np.ndarray:
    x = np.mod(np.round(x, _DIGITS), 1.0)
    return np.where(x >= 1.0, 0.0, x)


def unique_segments(segments) -> np.ndarray:
    """Remove zero-length segments and duplicates up to a lattice translation and reversal."""
    seg = np.asarray(segments, dtype=np.float64).reshape(-1, 2, 3)
    seen, out = set(), []
    for a, b in seg:
        if np.allclose(a, b):
            continue
        shift = np.floor(np.round(0.5 * (a + b), _DIGITS))
        a, b = a - shift, b - shift
        ka, kb = tuple(np.round(a, _DIGITS) + 0.0), tuple(np.round(b, _DIGITS) + 0.0)
        key = min(ka, kb) + max(ka, kb)
        if key not in seen:
            seen.add(key)
            out.append((a, b) if ka <= kb else (b, a))
    return np.array(out, dtype=np.float64).reshape(-1, 2, 3)


def by_distance(sites, distance: float, rtol: float = 1e-6) -> np.ndarray:
    """Segments joining every pair of periodic sites exactly ``distance`` apart."""
    sites = np.asarray(sites, dtype=np.float64).reshape(-1, 3)
    segs = []
    for shift in itertools.product((-1, 0, 1), repeat=3):
        d = np.linalg.norm(sites[None, :, :] + np.array(shift) - sites[:, None, :], axis=2)
        i, j = np.nonzero(np.abs(d - distance) <= rtol * distance)
        segs.extend(zip(sites[i], sites[j] + np.array(shift)))
    return unique_segments(segs)


# -- sites of the cubic cell ---------------------------------------------------------------
_CORNER = [(0, 0, 0)]
_FACE = [(0.5, 0.5, 0), (0.5, 0, 0.5), (0, 0.5, 0.5)]
_BODY = [(0.5, 0.5, 0.5)]
_EDGE_MID = [(0.5, 0, 0), (0, 0.5, 0), (0, 0, 0.5)]
_TET8 = list(itertools.product((0.25, 0.75), repeat=3))
_TET4 = [(0.25, 0.25, 0.25), (0.75, 0.75, 0.25), (0.75, 0.25, 0.75), (0.25, 0.75, 0.75)]
_S2, _S3 = np.sqrt(2.0), np.sqrt(3.0)


def _face_diagonals() -> np.ndarray:
    """Corner-to-face-centre struts lying in the cube faces (the 'FCC' strut lattice)."""
    segs = []
    for normal in range(3):
        u, v = [a for a in range(3) if a != normal]
        for corner in ((0, 0), (1, 0), (0, 1), (1, 1)):
            a = np.zeros(3)
            a[u], a[v] = corner
            b = np.zeros(3)
            b[u] = b[v] = 0.5
            segs.append((a, b))
    return unique_segments(segs)


def _z_struts() -> np.ndarray:
    return unique_segments([((0, 0, 0), (0, 0, 1))])


def _kelvin_sites() -> np.ndarray:
    """Vertices of the bitruncated cubic honeycomb (Kelvin foam) with cells on the BCC sites."""
    base = set()
    for perm in itertools.permutations((0.0, 0.25, 0.5)):
        for signs in itertools.product((-1, 1), repeat=3):
            base.add(tuple(s * p for s, p in zip(signs, perm)))
    verts = np.array(sorted(base))
    sites = np.concatenate([verts + 0.5, verts])  # cells centred at the body centre and corner
    return np.unique(_wrap(sites), axis=0)


def _builders() -> dict:
    sc = by_distance(_CORNER, 1.0)
    bcc = by_distance(_CORNER + _BODY, _S3 / 2)
    fcc = _face_diagonals()
    octet = by_distance(_CORNER + _FACE, _S2 / 2)
    cat = lambda *parts: unique_segments(np.concatenate(parts))  # noqa: E731
    return {
        "sc": (sc, "simple cubic: the cube edges"),
        "bcc": (bcc, "body-centred cubic: body centre to the 8 corners"),
        "fcc": (fcc, "face-centred cubic: the face diagonals"),
        "octet": (octet, "octet truss: FCC sites joined to their 12 nearest neighbours"),
        "octahedron": (by_distance(_FACE, _S2 / 2), "octahedra joining the face centres"),
        "kelvin": (by_distance(_kelvin_sites(), _S2 / 4),
                   "Kelvin foam (tetrakaidecahedron / truncated octahedron) edges on BCC cells"),
        "diamond": (by_distance(_CORNER + _FACE + _TET4, _S3 / 4),
                    "diamond cubic: 4-connected FCC plus tetrahedral sites"),
        "rhombic_dodecahedron": (by_distance(_BODY + _EDGE_MID + _TET8, _S3 / 4),
                                 "rhombic dodecahedral honeycomb (Voronoi cells of FCC) edges"),
        "cuboctahedron": (by_distance(_EDGE_MID, _S2 / 2),
                          "cuboctahedra: edge midpoints joined around each face"),
        "fbcc": (cat(fcc, bcc), "FCC face diagonals plus BCC body diagonals"),
        "sc_bcc": (cat(sc, bcc), "simple cubic plus BCC (the 'iso-truss' family)"),
        "octet_sc": (cat(octet, sc), "octet truss plus the cube edges"),
        "bccz": (cat(bcc, _z_struts()), "BCC plus struts along z"),
        "fccz": (cat(fcc, _z_struts()), "FCC face diagonals plus struts along z"),
    }


_CACHE: dict = {}
_ALIASES = {"simple_cubic": "sc", "cubic": "sc", "body_centred_cubic": "bcc", "face_centred_cubic": "fcc",
            "octet_truss": "octet", "tetrakaidecahedron": "kelvin", "truncated_octahedron": "kelvin",
            "rhombic-dodecahedron": "rhombic_dodecahedron", "sc+bcc": "sc_bcc", "octet+sc": "octet_sc",
            "fcc+bcc": "fbcc", "f2bcc": "fbcc"}


def topology_names() -> list[str]:
    """Names of the built-in strut topologies."""
    return list(_table())


def _table() -> dict:
    if not _CACHE:
        for name, (segs, desc) in _builders().items():
            _CACHE[name] = Topology(name, segs, desc)
    return _CACHE


def topology(name: str) -> Topology:
    """A built-in strut topology by name (see ``topology_names()``)."""
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    table = _table()
    if key not in table:
        raise CellError(f"unknown lattice topology {name!r}; choose from {', '.join(table)} or random")
    return table[key]


def random_graph(nodes: int = 16, k: int = 4, seed: int = 0, min_distance: float = 0.0) -> Topology:
    """A random periodic strut graph in the unit cube.

    ``nodes`` points uniform in [0, 1)^3 (re-drawn while closer than ``min_distance`` to
    an accepted one), each joined to its ``k`` nearest periodic neighbours (minimum image),
    the union taken symmetric. Every node has degree >= k >= 2. Deterministic in ``seed``.
    """
    nodes, k = int(nodes), int(k)
    if k < 2:
        raise CellError(f"random graph: k must be >= 2 so every node has degree >= 2, got {k}")
    if nodes < k + 1:
        raise CellError(f"random graph: need more nodes than k, got nodes={nodes}, k={k}")
    rng = np.random.default_rng(check_seed(seed))
    pts = []
    for _ in range(1000 * nodes):
        if len(pts) == nodes:
            break
        p = rng.random(3)
        if min_distance > 0 and pts:
            d = np.array(pts) - p
            d -= np.round(d)
            if np.min(np.linalg.norm(d, axis=1)) < min_distance:
                continue
        pts.append(p)
    if len(pts) < nodes:
        raise CellError(f"random graph: cannot place {nodes} nodes {min_distance:g} apart")
    pts = np.array(pts)
    tree = cKDTree(pts, boxsize=1.0)
    _, nbr = tree.query(pts, k=k + 1)
    segs = []
    for i in range(nodes):
        for j in nbr[i, 1:]:
            d = pts[j] - pts[i]
            segs.append((pts[i], pts[i] + d - np.round(d)))
    topo = Topology(f"random(nodes={nodes},k={k},seed={seed})", unique_segments(segs),
                    "random periodic k-nearest-neighbour graph")
    deg = topo.degrees()
    if deg.min() < 2:  # cannot happen for k >= 2; kept as a guard on the construction
        raise CellError("random graph: a node has degree < 2")
    log.info("random graph: %d nodes, %d struts, degree %d..%d", nodes, len(topo.segments), deg.min(), deg.max())
    return topo
