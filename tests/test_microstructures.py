"""Generators, level selection, strut distance fields and percolation (microstructures/)."""
import itertools
import math

import numpy as np
import pytest

from microstructures import (Cell, CellError, default_cell, inclusions, laminate, lattice, percolates, spanning_rank,
                             random_graph, shell_lattice, topology, topology_names, tpms, voronoi)
from microstructures.generators import tpms_field
from microstructures.generators.level import select
from microstructures.generators.particles import contact_function, shape_matrices
from microstructures.generators.struts import distance_field

TOL = 0.005  # the generators' volume-fraction contract (absolute)
SURFACES = ["P", "G", "D", "IWP", "FRD"]


def shifted_by_voxels(make, n, k):
    """The generator's cell with coordinates shifted by k = (kx, ky, kz) voxels, and the
    unshifted cell rolled by -k: equal iff the geometry is periodic across the faces."""
    shift = tuple(ki / n for ki in k)
    return make(shift=shift).phases, np.roll(make(shift=(0.0, 0.0, 0.0)).phases, [-ki for ki in k], axis=(0, 1, 2))


def periodic_components(mask):
    """Number of face-connected components of a mask on the 3-torus, by a plain flood
    fill with wrapped indices (an oracle independent of the library's labelling)."""
    mask = np.asarray(mask, dtype=bool)
    seen = np.zeros_like(mask)
    shape, count = mask.shape, 0
    steps = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count += 1
        seen[start] = True
        stack = [start]
        while stack:
            i, j, k = stack.pop()
            for di, dj, dk in steps:
                q = ((i + di) % shape[0], (j + dj) % shape[1], (k + dk) % shape[2])
                if mask[q] and not seen[q]:
                    seen[q] = True
                    stack.append(q)
    return count


def test_periodic_cluster_count_equals_a_flood_fill():
    rng = np.random.default_rng(3)
    from microstructures.percolation import periodic_cluster_count
    for shape, p in (((6, 7, 5), 0.2), ((9, 4, 8), 0.3), ((5, 5, 5), 0.45)):
        mask = rng.random(shape) < p
        assert periodic_cluster_count(mask) == periodic_components(mask) > 1
    slab = np.zeros((6, 6, 6), bool)
    slab[0] = slab[-1] = True                   # two faces: one cluster across the periodic face
    assert periodic_cluster_count(slab) == 1


# -- TPMS ------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["network", "sheet"])
@pytest.mark.parametrize("surface", SURFACES)
def test_tpms_hits_volume_fraction(surface, form):
    cell = tpms(surface, form=form, vf=0.25, n=32, E=2.0, nu=0.25)
    assert abs(cell.volume_fraction - 0.25) <= TOL
    assert cell.shape == (32, 32, 32) and cell.phases.dtype == np.uint8
    assert list(cell.E) == [0.0, 2.0] and cell.nu[1] == 0.25
    assert cell.generator == "tpms" and cell.params["surface"] == surface and cell.params["form"] == form
    assert cell.params["vf_achieved"] == pytest.approx(cell.volume_fraction)
    cell.validate()


def test_tpms_aliases_and_errors():
    assert tpms("gyroid", vf=0.3, n=16).params["surface"] == "G"
    with pytest.raises(CellError, match="unknown TPMS surface"):
        tpms("Q", vf=0.3, n=16)
    with pytest.raises(CellError, match=r"vf must lie in \(0, 1\)"):
        tpms("P", vf=1.2, n=16)
    with pytest.raises(CellError, match="n must be a positive integer"):
        tpms("P", vf=0.3, n=0)
    with pytest.raises(CellError, match="nu of the solid"):
        tpms("P", vf=0.3, n=16, nu=0.5)


@pytest.mark.parametrize("surface", SURFACES)
def test_tpms_field_is_periodic(surface):
    # the implicit function at x + 2*pi (one full cell) equals itself
    T = tpms_field(surface, (12, 10, 8))
    for axis in range(3):
        shift = [0.0, 0.0, 0.0]
        shift[axis] = 1.0
        np.testing.assert_allclose(tpms_field(surface, (12, 10, 8), shift=shift), T, atol=1e-12)


@pytest.mark.parametrize("surface,form", [("G", "sheet"), ("D", "network"), ("IWP", "network")])
def test_tpms_cell_is_periodic_under_voxel_shift(surface, form):
    def make(shift):
        return tpms(surface, form=form, vf=0.3, n=24, shift=shift)
    for k in [(1, 0, 0), (0, 1, 0), (0, 0, 1), (3, -2, 5)]:
        shifted, rolled = shifted_by_voxels(make, 24, k)
        np.testing.assert_array_equal(shifted, rolled)


def test_tpms_periods_tile_the_unit_cell():
    two = tpms("G", form="sheet", vf=0.2, n=32, periods=2)
    one = tpms("G", form="sheet", vf=0.2, n=16)
    np.testing.assert_array_equal(two.phases, np.tile(one.phases, (2, 2, 2)))


@pytest.mark.parametrize("make", [lambda p, n: lattice("kelvin", vf=0.1, n=n, periods=p),
                                  lambda p, n: shell_lattice("octet", vf=0.3, n=n, periods=p),
                                  lambda p, n: shell_lattice("kelvin", vf=0.1, n=n, periods=p)])
def test_lattice_periods_are_identical_unit_cells(make):
    """Ties of the strut distance split by a noise in unit-cell coordinates: every one of the
    2 x 2 x 2 unit cells is the same (the noise once ran in cell coordinates and these
    three differed by 9-88 voxels)."""
    ph = make(2, 24).phases
    blocks = [ph[i:i + 12, j:j + 12, k:k + 12] for i in (0, 12) for j in (0, 12) for k in (0, 12)]
    for b in blocks[1:]:
        np.testing.assert_array_equal(b, blocks[0])


@pytest.mark.parametrize("form", ["network", "sheet"])
@pytest.mark.parametrize("surface", ["P", "D"])
def test_tpms_full_cubic_permutation_symmetry(surface, form):
    ph = tpms(surface, form=form, vf=0.3, n=32).phases
    for perm in itertools.permutations(range(3)):
        np.testing.assert_array_equal(np.transpose(ph, perm), ph)
    # P is even in each coordinate; D changes sign of its sin-term under one flip, not under two
    np.testing.assert_array_equal(ph[::-1] if surface == "P" else ph[::-1, ::-1], ph)


@pytest.mark.parametrize("form", ["network", "sheet"])
def test_gyroid_cyclic_symmetry(form):
    # G(x, y, z) = G(y, z, x); a transposition maps the gyroid to its mirror image
    ph = tpms("G", form=form, vf=0.3, n=32).phases
    np.testing.assert_array_equal(np.transpose(ph, (1, 2, 0)), ph)
    np.testing.assert_array_equal(np.transpose(ph, (2, 0, 1)), ph)
    assert not np.array_equal(np.transpose(ph, (1, 0, 2)), ph)


def test_default_cell():
    cell = default_cell()
    assert cell.shape == (32, 32, 32)
    assert abs(cell.volume_fraction - 0.2) <= TOL
    assert list(cell.E) == [0.0, 1.0] and list(cell.nu) == [0.3, 0.3]
    assert cell.params["surface"] == "G" and cell.params["form"] == "sheet"
    np.testing.assert_array_equal(default_cell().phases, cell.phases)  # deterministic


# -- level selection -------------------------------------------------------------------------

def test_select_keeps_tied_values_together():
    f = np.array([0.0, 1.0, 1.0 + 1e-15, 1.0 - 1e-15, 2.0, 3.0]).reshape(1, 2, 3)
    sel = select(f, 2)  # cuts at 1 or 4 voxels; the tie group of three 1.0s stays whole
    assert sel.count in (1, 4)
    assert sel.mask.ravel()[1:4].all() or not sel.mask.ravel()[1:4].any()
    assert select(f, 5).count == 5 and select(f, 5).level == pytest.approx(2.5)


def test_select_splits_a_tie_group_by_the_secondary_key():
    f = np.ones((1, 1, 10))
    sel = select(f, 3, secondary=lambda idx: -idx.astype(float))  # prefer high indices
    assert sel.count == 3 and sel.split
    np.testing.assert_array_equal(np.flatnonzero(sel.mask.ravel()), [7, 8, 9])


# -- strut lattices --------------------------------------------------------------------------

def test_at_least_ten_named_topologies():
    assert len(topology_names()) >= 10
    for name in ["sc", "bcc", "fcc", "octet", "kelvin", "diamond", "rhombic_dodecahedron", "fbcc",
                 "octet_sc", "sc_bcc", "cuboctahedron"]:
        assert name in topology_names()


@pytest.mark.parametrize("name,degrees", [("sc", {6}), ("bcc", {8}), ("octet", {12}), ("kelvin", {4}),
                                          ("diamond", {4}), ("rhombic_dodecahedron", {4, 8}),
                                          ("cuboctahedron", {8}), ("fcc", {4, 12})])
def test_topology_node_degrees(name, degrees):
    assert set(topology(name).degrees().tolist()) == degrees


def test_topology_edges_reproduce_segments():
    topo = topology("kelvin")
    i, j, shift = topo.edges()
    ends = np.stack([topo.nodes[i], topo.nodes[j] + shift], axis=1)
    np.testing.assert_allclose(np.linalg.norm(ends[:, 1] - ends[:, 0], axis=1), math.sqrt(2) / 4)
    assert topo.length == pytest.approx(24 * math.sqrt(2) / 4)


def test_random_graph_is_seeded_and_every_node_has_degree_two():
    a, b, c = random_graph(12, k=2, seed=3), random_graph(12, k=2, seed=3), random_graph(12, k=2, seed=4)
    np.testing.assert_array_equal(a.segments, b.segments)
    assert not np.array_equal(a.nodes, c.nodes)
    assert a.degrees().min() >= 2 and len(a.nodes) == 12
    with pytest.raises(CellError, match="k must be >= 2"):
        random_graph(12, k=1)


@pytest.mark.parametrize("name", topology_names() + ["random"])
def test_lattice_hits_volume_fraction(name):
    cell = lattice(name, vf=0.2, n=32, E=3.0, nu=0.2)
    assert abs(cell.volume_fraction - 0.2) <= TOL
    assert cell.params["radius"] > 0 and cell.generator == "lattice"
    assert list(cell.E) == [0.0, 3.0]


def test_lattice_options_and_errors():
    cell = lattice("octet", vf=0.3, n=24, periods=2, node_ratio=1.5, caps=False)
    assert abs(cell.volume_fraction - 0.3) <= TOL
    with pytest.raises(CellError, match="unknown lattice topology"):
        lattice("nonesuch", vf=0.2, n=16)
    with pytest.raises(CellError, match="node_ratio"):
        lattice("sc", vf=0.2, n=16, node_ratio=-1)


@pytest.mark.parametrize("name", ["sc", "octet", "kelvin", "random"])
def test_lattice_is_periodic_under_voxel_shift(name):
    def make(shift):
        return lattice(name, vf=0.2, n=24, shift=shift, nodes=8, k=3, seed=5)
    for k in [(1, 0, 0), (0, 1, 0), (0, 0, 1), (2, -3, 5)]:
        shifted, rolled = shifted_by_voxels(make, 24, k)
        np.testing.assert_array_equal(shifted, rolled)


@pytest.mark.parametrize("name", ["sc", "bcc"])
def test_struts_through_a_corner_node_appear_on_both_faces(name):
    # the node sits at the cell corner: each strut leaving it crosses the faces, so the cell
    # is mirror-symmetric about every face, and the face layers carry the same strut sections
    ph = lattice(name, vf=0.2, n=24).phases
    for axis in range(3):
        np.testing.assert_array_equal(np.flip(ph, axis), ph)
        assert np.take(ph, 0, axis=axis).any()
    assert percolates(Cell(ph, [0, 1], [0.3, 0.3])) == (True, True, True)


def test_distance_field_matches_brute_force_over_periodic_images():
    rng = np.random.default_rng(0)
    shape, size, shift = (7, 6, 5), np.array([1.0, 1.2, 0.8]), np.array([0.03, -0.02, 0.05])
    segs = np.concatenate([rng.random((4, 1, 3)), rng.random((4, 1, 3)) * 1.6 - 0.3], axis=1)
    segs[1, 1] = segs[1, 0]  # a point
    got = distance_field(shape, segs, size, shift)
    u = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) / n + s for n, s in zip(shape, shift)], indexing="ij"), -1)
    ref = np.full(shape, np.inf)
    for a, b in segs:
        for L in itertools.product((-2, -1, 0, 1, 2), repeat=3):
            p = (u - a - np.array(L)) * size
            ab = (b - a) * size
            t = np.clip((p @ ab) / max(ab @ ab, 1e-300), 0, 1)[..., None]
            ref = np.minimum(ref, np.linalg.norm(p - t * ab, axis=-1))
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
    cut = distance_field(shape, segs, size, shift, cutoff=0.15)
    np.testing.assert_allclose(cut[ref <= 0.15], ref[ref <= 0.15], rtol=1e-12)
    assert np.all(np.isinf(cut[ref > 0.15]))


# -- shell lattices --------------------------------------------------------------------------

@pytest.mark.parametrize("name,outer", [("octet", None), ("sc", 0.2), ("kelvin", None), ("random", None)])
def test_shell_lattice_hits_volume_fraction(name, outer):
    cell = shell_lattice(name, vf=0.12, n=32, outer_radius=outer, nodes=8, k=3)
    assert abs(cell.volume_fraction - 0.12) <= TOL
    p = cell.params
    assert 0 < p["thickness"] <= p["outer_radius"] and p["inner_radius"] >= 0
    if outer is not None:
        assert p["outer_radius"] == outer
        # hollow: every solid voxel lies in the solid lattice of the outer radius, which is fuller
        solid = distance_field((32,) * 3, topology(name).segments) <= outer
        assert np.all(solid[cell.solid_mask]) and solid.mean() > cell.volume_fraction + 0.05


def test_shell_lattice_outer_radius_too_small():
    with pytest.raises(CellError, match="increase outer_radius"):
        shell_lattice("sc", vf=0.3, n=16, outer_radius=0.05)


# -- inclusions, laminates, polycrystals ------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(vf=0.2), dict(vf=0.3, radius=0.08),
                                dict(vf=0.15, shape="ellipsoid", axes=(2.5, 1, 1), radius=0.08),
                                dict(vf=0.1, shape="ellipsoid", axes=(2, 1, 0.5), aligned=True, count=30)])
def test_inclusions_hit_volume_fraction(kw):
    cell = inclusions(n=32, seed=1, **kw)
    frac = float((cell.phases == 1).mean())
    assert abs(frac - kw["vf"]) <= TOL
    assert cell.params["count"] >= 1 and cell.generator == "inclusions"


def test_inclusions_do_not_overlap_and_are_seeded():
    cell = inclusions(vf=0.15, n=32, radius=0.1, gap=2 / 32, seed=2)
    assert periodic_components(cell.phases == 1) == cell.params["count"]
    np.testing.assert_array_equal(inclusions(vf=0.15, n=32, radius=0.1, gap=2 / 32, seed=2).phases, cell.phases)
    assert not np.array_equal(inclusions(vf=0.15, n=32, radius=0.1, gap=2 / 32, seed=3).phases, cell.phases)


def test_inclusions_are_periodic_under_voxel_shift():
    def make(shift):
        return inclusions(vf=0.2, n=24, radius=0.12, seed=4, shift=shift)
    shifted, rolled = shifted_by_voxels(make, 24, (1, -2, 3))
    np.testing.assert_array_equal(shifted, rolled)


def test_pores_and_errors():
    cell = inclusions(vf=0.2, n=24, E=(1.0, 0.0))
    assert abs(cell.volume_fraction - 0.8) <= TOL
    with pytest.raises(CellError, match="radius or count"):
        inclusions(vf=0.2, radius=0.1, count=3)
    with pytest.raises(CellError, match="too large"):
        inclusions(vf=0.4, count=2, n=16)
    with pytest.raises(CellError, match="placed only"):
        inclusions(vf=0.45, radius=0.05, n=32, max_attempts=2000)


def test_contact_function_oracles():
    # identical spheres touch at distance 2a; crossed 2:1:1 ellipsoids along x touch at a_1 + b_2 = 3
    S = shape_matrices(np.eye(3)[None], np.ones(3))
    assert contact_function(np.array([[2.0, 0, 0]]), S, S)[0] == pytest.approx(1.0, abs=1e-9)
    Rz = np.array([[[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]])
    A, B = shape_matrices(np.eye(3)[None], np.array([2.0, 1, 1])), shape_matrices(Rz, np.array([2.0, 1, 1]))
    assert contact_function(np.array([[3.0, 0, 0]]), A, B)[0] == pytest.approx(1.0, abs=1e-7)
    assert contact_function(np.array([[2.9, 0, 0]]), A, B)[0] < 1 < contact_function(np.array([[3.1, 0, 0]]), A, B)[0]


def test_laminate():
    cell = laminate((0.25, 0.75), E=(1.0, 10.0), nu=(0.3, 0.2), axis="y", n=(4, 16, 8), periods=2)
    assert cell.shape == (4, 16, 8)
    layer = cell.phases[0, :, 0]
    np.testing.assert_array_equal(layer, [0, 0, 1, 1, 1, 1, 1, 1] * 2)
    assert np.all(cell.phases == layer[None, :, None])
    assert cell.params["fractions_achieved"] == [0.25, 0.75]
    with pytest.raises(CellError, match="sum to 1"):
        laminate((0.3, 0.3))
    with pytest.raises(CellError, match="one E and nu per layer"):
        laminate((0.5, 0.5), E=(1, 2, 3), nu=(0.3, 0.3, 0.3))


def test_voronoi_polycrystal():
    cell = voronoi(12, E=(1.0, 5.0, 20.0), nu=(0.3, 0.25, 0.2), n=20, seed=7)
    assert cell.n_phases == 3 and set(np.unique(cell.phases)) == {0, 1, 2}
    assert cell.params["grains_per_phase"] == [4, 4, 4]
    assert sum(cell.params["phase_fractions"]) == pytest.approx(1.0)
    np.testing.assert_array_equal(voronoi(12, E=(1.0, 5.0, 20.0), nu=(0.3, 0.25, 0.2), n=20, seed=7).phases,
                                  cell.phases)

    def make(shift):
        return voronoi(12, E=(1.0, 5.0), nu=(0.3, 0.3), n=20, seed=7, shift=shift)
    shifted, rolled = shifted_by_voxels(make, 20, (1, 2, -3))
    np.testing.assert_array_equal(shifted, rolled)


# -- percolation -----------------------------------------------------------------------------

def _mask_cell(mask):
    return Cell(mask.astype(np.uint8), [0.0, 1.0], [0.3, 0.3])


def test_percolation_gyroid_and_isolated_sphere():
    assert percolates(default_cell()) == (True, True, True)
    sphere = inclusions(vf=0.05, count=1, n=16, E=(0.0, 1.0))
    assert percolates(sphere) == (False, False, False)


def test_percolation_of_simple_shapes():
    n = 8
    layer = np.zeros((n, n, n), bool)
    layer[:, :, 2:4] = True  # a slab normal to z
    assert percolates(layer) == (True, True, False)
    rod = np.zeros((n, n, n), bool)
    rod[:, 3, 3] = True  # a straight rod along x
    assert percolates(_mask_cell(rod)) == (True, False, False)
    stair = np.zeros((n, n, n), bool)
    for i in range(n):  # a face-connected staircase winding along (1, 1, 0)
        stair[i, i, 0] = stair[(i + 1) % n, i, 0] = True
    assert percolates(stair) == (True, True, False)
    hook = np.zeros((n, n, n), bool)  # touches both x faces, at different places: no wrap
    hook[0:n - 1, 1, 1] = True
    hook[n - 2, 1:4, 1] = True
    hook[n - 2:n, 3, 1] = True
    assert not hook[0][hook[-1]].any()
    assert percolates(hook) == (False, False, False)
    assert percolates(np.zeros((n, n, n), bool)) == (False, False, False)
    # spanning rank: the dimension of the periods one cluster wraps around
    assert [spanning_rank(m) for m in (rod, stair, layer, hook)] == [1, 1, 2, 0]
    assert spanning_rank(default_cell()) == 3 and spanning_rank(np.zeros((n, n, n), bool)) == 0
    frame = np.zeros((n, n, n), bool)              # three rods through one node: one 3-D cluster
    frame[:, 0, 0] = frame[0, :, 0] = frame[0, 0, :] = True
    assert percolates(frame) == (True, True, True) and spanning_rank(frame) == 3
    apart = np.zeros((n, n, n), bool)              # the same rods, pairwise apart: every axis
    apart[:, 0, 0] = apart[3, :, 3] = apart[6, 6, :] = True   # percolates, no cluster spans 3-D
    assert percolates(apart) == (True, True, True) and spanning_rank(apart) == 1


def test_anisotropic_grids_and_sizes():
    cell = lattice("bcc", vf=0.2, n=(32, 24, 16), size=(2.0, 1.5, 1.0))
    assert cell.shape == (32, 24, 16) and cell.size == (2.0, 1.5, 1.0)
    assert abs(cell.volume_fraction - 0.2) <= TOL
    cell = tpms("D", vf=0.3, n=(32, 16, 16), periods=(2, 1, 1))
    assert abs(cell.volume_fraction - 0.3) <= TOL
    np.testing.assert_array_equal(cell.phases[:16], cell.phases[16:])  # two surface periods along x
