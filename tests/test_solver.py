"""The single-process solver against its oracles (issue 2)."""
import itertools
import os

import numpy as np
import pytest
import torch

from microstructures.cell import Cell
from microstructures.generators import lattice, tpms
from solver import ElasticityOperator, homogenize, isotropic_voigt
from solver.assembled import assemble, direct_chom
from solver.element import lame_stiffness_matrices
from solver.materials import (engineering_constants, lame, mandel_to_voigt, rotate_voigt,
                              tensor4_to_voigt, voigt_reuss_bounds, voigt_to_mandel,
                              voigt_to_tensor4)


def rel(a, b):
    return np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))


def to_nodes_first(u):
    """(B, 3, nx, ny, nz) -> (3N, B) in the assembled dof order."""
    return u.permute(2, 3, 4, 1, 0).reshape(-1, u.shape[0]).numpy()


# -- materials and element ---------------------------------------------------------
def test_isotropic_voigt_is_the_lame_form():
    E, nu = 2.5, 0.28
    C = isotropic_voigt(E, nu)
    lam, mu = lame(E, nu)
    assert C[0, 0] == pytest.approx(lam + 2 * mu)
    assert C[0, 1] == pytest.approx(lam)
    assert C[3, 3] == pytest.approx(mu)
    eng = engineering_constants(C)
    for k in ("E1", "E2", "E3"):
        assert eng[k] == pytest.approx(E, rel=1e-12)
    for k in ("nu12", "nu13", "nu23", "nu21"):
        assert eng[k] == pytest.approx(nu, rel=1e-12)
    assert eng["G12"] == pytest.approx(E / (2 * (1 + nu)), rel=1e-12)
    assert eng["zener_ratio"] == pytest.approx(1.0, rel=1e-12)


def test_notation_round_trips(rng):
    A = rng.standard_normal((6, 6))
    C = A @ A.T
    assert np.allclose(mandel_to_voigt(voigt_to_mandel(C)), C)
    assert np.allclose(tensor4_to_voigt(voigt_to_tensor4(C)), C)
    # Mandel form is a tensor: its eigenvalues are rotation invariant
    Q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    ev0 = np.linalg.eigvalsh(voigt_to_mandel(C))
    ev1 = np.linalg.eigvalsh(voigt_to_mandel(rotate_voigt(C, Q)))
    assert np.allclose(ev0, ev1)


def test_element_matrices_symmetric_psd_with_rigid_body_null_space():
    h = (0.3, 0.5, 0.7)
    K_lam, K_mu = lame_stiffness_matrices(h)
    for K in (K_lam, K_mu):
        assert np.allclose(K, K.T, atol=1e-14)
        assert np.linalg.eigvalsh(K).min() > -1e-12
    ke = K_lam * 1.3 + K_mu * 0.7
    ev = np.linalg.eigvalsh(ke)
    assert np.sum(np.abs(ev) < 1e-10) == 6          # 3 translations + 3 rotations
    X = np.array(list(itertools.product((0, 1), repeat=3))) * np.array(h)
    for c in range(3):                                # translations
        t = np.zeros(24)
        t[c::3] = 1
        assert np.abs(ke @ t).max() < 1e-12
    for c in range(3):                                # infinitesimal rotations omega x X
        w = np.zeros(3)
        w[c] = 1.0
        r = np.cross(w, X).ravel()
        assert np.abs(ke @ r).max() < 1e-12 * np.abs(ke).max()


# -- operator ----------------------------------------------------------------------
# two factorizations: per-voxel lambda and mu (25 rows), or one Poisson ratio
# everywhere (18 rows: k_e = mu_e (K_mu + r K_lambda)), void phases of E = 0 included
MATERIALS = {"lame": ([0.0, 1.0, 10.0], [0.3, 0.2, 0.35]),
             "one-nu": ([0.0, 1e-6, 10.0], [0.3, 0.3, 0.3])}


@pytest.mark.parametrize("material", sorted(MATERIALS))
@pytest.mark.parametrize("shape,chunk", [((4, 4, 4), 1 << 22), ((5, 6, 7), 1 << 22),
                                         ((3, 2, 4), 1 << 22), ((7, 5, 6), 6 * 5 * 6 * 2), ((7, 5, 6), 6 * 5 * 6 * 2 * 8)])
def test_operator_equals_assembled_matrix(shape, chunk, material, rng):
    ph = rng.integers(0, 3, size=shape)
    E, nu = MATERIALS[material]
    h = (0.9, 1.1, 1.3)
    op = ElasticityOperator.from_phases(ph, E, nu, h, chunk=chunk)
    assert (op.lame_ratio is not None) == (material == "one-nu")
    assert op.weight.shape[0] == (18 if material == "one-nu" else 25)
    assert (len(list(op._slabs(6))) > 1) == (chunk < 1000)
    K, Fm, _ = assemble(ph, E, nu, h)
    u = torch.randn(6, 3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    yref = K @ to_nodes_first(u)
    # apply() takes the scatter form in float64 on CPU, the gather form otherwise: both here
    w = torch.randn(6, 3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    wref = to_nodes_first(w) - yref
    # the in-place residual w - K u (the smoothers' residual_) subtracts slab by slab
    for y in (op.apply(u), op._apply_gather(u), op._apply_scatter(u)):
        assert np.abs(to_nodes_first(y) - yref).max() <= 1e-12 * np.abs(yref).max()
    assert np.abs(to_nodes_first(op._apply_gather(u, sub_from=w.clone())) - wref).max() <= 1e-12 * np.abs(yref).max()
    # one load case on CPU: each slab as a batch of its two halves (_slab_in_halves),
    # odd slabs overlapping by a plane, one-plane slabs the plain way; whole block and
    # slabs of two planes (the last one shorter); also as the in-place residual
    for ch in (chunk, 2 * shape[1] * shape[2]):
        op.chunk = ch
        for b in (0, 4):
            y = op._apply_gather(u[b:b + 1])
            assert np.abs(to_nodes_first(y)[:, 0] - yref[:, b]).max() <= 1e-12 * np.abs(yref).max()
            r = op._apply_gather(u[b:b + 1], sub_from=w[b:b + 1].clone())
            assert np.abs(to_nodes_first(r)[:, 0] - wref[:, b]).max() <= 1e-12 * np.abs(yref).max()
    op.chunk = chunk
    assert (len(list(op._slabs(6, op.chunk >> 3))) > 1) == (chunk < 8000)
    f = op.rhs()
    assert np.abs(to_nodes_first(f) - Fm).max() <= 1e-12 * np.abs(Fm).max()
    d = op.diagonal()
    assert np.abs(to_nodes_first(d)[:, 0] - K.diagonal()).max() <= 1e-12 * K.diagonal().max()


def test_native_apply_is_built_and_serves_one_poisson_ratio():
    """The fused C apply (solver/native.py) is part of the CPU solver: it must build
    here (setup installs gcc). It serves the one-Poisson-ratio operator on CPU and
    not the two-ratio one, nor a call that autograd records."""
    from solver import native
    assert native.available(), (f"the fused C apply did not build: {native.error()} "
                                "(make setup installs gcc and libc6-dev: apt-get install gcc libc6-dev)")
    rng = np.random.default_rng(0)
    ph = rng.integers(0, 3, size=(4, 5, 6))
    one = ElasticityOperator.from_phases(ph, *MATERIALS["one-nu"], (1.0, 1.0, 1.0), dtype=torch.float32)
    two = ElasticityOperator.from_phases(ph, *MATERIALS["lame"], (1.0, 1.0, 1.0), dtype=torch.float32)
    u = torch.randn(2, 3, 4, 5, 6)
    assert one._native_ok(u) and not two._native_ok(u)
    assert not one._native_ok(u.clone().requires_grad_())
    # its OpenMP threads are PyTorch's pool: one libgomp in the process, not two
    one.apply(u)
    with open("/proc/self/maps") as f:
        gomps = {ln.split()[-1] for ln in f if "libgomp" in ln}
    assert len(gomps) == 1, gomps


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize("shape", [(4, 4, 4), (7, 5, 6), (9, 3, 2), (16, 12, 10)])
def test_native_apply_equals_assembled_matrix(shape, dtype, tol, rng):
    """The fused C apply against the assembled sparse K (float64 oracle): 1 and 6
    cases, as K u and as the in-place residual w - K u, in one slab and in slabs of
    8 planes (each slab recomputes its neighbour's boundary voxel plane), with 1, 2
    and 3 threads; the result does not depend on the slabs or threads (bit for bit:
    every node's sum is made in the same order)."""
    from solver import native
    ph = rng.integers(0, 3, size=shape)
    E, nu = MATERIALS["one-nu"]
    h = (0.9, 1.1, 1.3)
    K, _, _ = assemble(ph, E, nu, h)
    op = ElasticityOperator.from_phases(ph, E, nu, h, dtype=dtype)
    assert op._native_ok(torch.zeros(1, 3, *shape, dtype=dtype))
    u = torch.randn(6, 3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(6, 3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    yref = K @ to_nodes_first(u)
    scale = np.abs(yref).max()
    first = {}
    for B in (6, 1):
        ub = u[:B].to(dtype).contiguous(memory_format=torch.channels_last_3d)
        wb = w[:B].to(dtype).contiguous(memory_format=torch.channels_last_3d)
        for chunk in (1 << 22, 2 * shape[1] * shape[2] * B):
            op.chunk = chunk
            slabs = list(op._native_slabs(B))
            assert slabs[0][0] == 0 and slabs[-1][1] == shape[0]
            assert all(a1 == b0 for (_, a1), (b0, _) in zip(slabs, slabs[1:]))
            assert (len(slabs) > 1) == (shape[0] > 8 and (chunk < 1 << 22 or B == 1))
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                try:
                    y = op._apply_native(ub)
                    r = op._apply_native(ub, sub_from=wb.clone())
                finally:
                    torch.set_num_threads(2)
                assert np.abs(to_nodes_first(y.double()) - yref[:, :B]).max() <= tol * scale
                rref = to_nodes_first(w[:B]) - yref[:, :B]
                assert np.abs(to_nodes_first(r.double()) - rref).max() <= tol * scale
                if B not in first:
                    first[B] = y
                assert torch.equal(y, first[B])
    # the kernel on a whole ghosted window: z as the periodic axis (each row's voxels
    # once, node nz folded onto node 0: what a z-whole domain uses) and z ghosted
    # (the voxel -1 made from the window: what a rank with a z-split block needs)
    ug = op.domain.ghost(u.to(dtype), lo=1, hi=1)
    for zwrap in (True, False):
        y = torch.empty(u.shape, dtype=dtype)
        native.hex8_apply(ug, op._scale_lo()[1], y, op._K0(), zwrap=zwrap)
        assert np.abs(to_nodes_first(y.double()) - yref).max() <= tol * scale
    # a wrong element matrix fails: the oracle can tell
    op._k0 = op._K0() * (1 + 1e-3 * torch.eye(24, dtype=dtype))
    y = op._apply_native(u.to(dtype))
    assert np.abs(to_nodes_first(y.double()) - yref).max() > 100 * tol * scale
    with pytest.raises(ValueError, match="shapes"):
        native.hex8_apply(u.to(dtype), op._scale_lo()[1], torch.empty_like(u.to(dtype)), op._K0())


@pytest.mark.parametrize("lo,hi", [(1, 1), (0, 1), (2, 1)])
def test_ghost_window_equals_slice_of_ghost(lo, hi, rng):
    """SerialDomain.ghost_window(x, a, b) == ghost(x)[..., a:b, :, :] for windows that
    wrap at either end, are longer than the axis, or are one plane; into ``out`` too."""
    from solver.domain import SerialDomain
    shape = (5, 4, 3)
    dom = SerialDomain(shape)
    x = torch.as_tensor(rng.standard_normal((2, 3) + shape))
    for fmt in (torch.contiguous_format, torch.channels_last_3d):
        xf = x.contiguous(memory_format=fmt)
        g = dom.ghost(xf, lo=lo, hi=hi)
        n = shape[0] + lo + hi
        for a, b in [(0, n), (0, 2), (n - 2, n), (1, 3), (2, 3), (0, 1)]:
            w = dom.ghost_window(xf, a, b, lo=lo, hi=hi)
            assert torch.equal(w, g[:, :, a:b])
            out = torch.zeros_like(g[:, :, a:b]).contiguous(memory_format=fmt)
            assert dom.ghost_window(xf, a, b, lo=lo, hi=hi, out=out) is out
            assert torch.equal(out, g[:, :, a:b])
    with pytest.raises(ValueError, match="out has shape"):
        dom.ghost_window(x, 0, 2, lo=1, hi=1, out=torch.zeros(2, 3, 3, 6, 5, dtype=x.dtype))


def test_operator_symmetric_and_translations_in_null_space(rng):
    shape = (6, 5, 4)
    ph = rng.integers(0, 2, size=shape)
    op = ElasticityOperator.from_phases(ph, [0.0, 3.0], [0.3, 0.3], (1, 1, 1))
    g = torch.Generator().manual_seed(2)
    a = torch.randn(6, 3, *shape, dtype=torch.float64, generator=g)
    b = torch.randn(6, 3, *shape, dtype=torch.float64, generator=g)
    lhs, rhs = op.dot(op.apply(a), b), op.dot(a, op.apply(b))
    assert torch.allclose(lhs, rhs, rtol=1e-12, atol=0)
    t = torch.zeros(3, 3, *shape, dtype=torch.float64)
    for c in range(3):
        t[c, c] = 1.0
    assert op.apply(t).abs().max() < 1e-12
    # energy is positive on mean-free fields
    op.project_mean_free(a)
    assert bool((op.dot(a, op.apply(a)) > 0).all())


@pytest.mark.parametrize("nu", [[0.3, 0.25], [0.3, 0.3]])
def test_float32_operator_matches_float64(nu, rng):
    shape = (6, 6, 6)
    ph = rng.integers(0, 2, size=shape)
    op64 = ElasticityOperator.from_phases(ph, [1e-6, 5.0], nu, (1, 1, 1))
    op32 = op64.to(dtype=torch.float32)
    assert (op32.lame_ratio is None) == (nu[0] != nu[1])
    u = torch.randn(6, 3, *shape, dtype=torch.float64)
    y64 = op64.apply(u)
    y32 = op32.apply(u.float()).double()
    assert (y32 - y64).abs().max() <= 1e-5 * y64.abs().max()


# -- C^H ---------------------------------------------------------------------------
def test_homogeneous_cell_gives_the_material():
    for size in [(1, 1, 1), (2.0, 0.5, 1.5)]:
        cell = Cell(np.zeros((4, 5, 3), np.uint8), [2.0], [0.3], size=size)
        res = homogenize(cell)
        assert np.abs(res.C - isotropic_voigt(2.0, 0.3)).max() <= 1e-10
        assert res.converged


def laminate_closed_form(C1, C2, f1):
    """Laminate with normal x (Voigt 11, 13, 12 normal stresses continuous; 22, 33, 23
    strains continuous): partial-inversion averaging (e.g. Milton, The Theory of
    Composites, ch. 9)."""
    N, T = [0, 4, 5], [1, 2, 3]
    avg = lambda g: f1 * g(C1) + (1 - f1) * g(C2)  # noqa: E731
    inv = np.linalg.inv
    CNN = inv(avg(lambda C: inv(C[np.ix_(N, N)])))
    A = avg(lambda C: inv(C[np.ix_(N, N)]) @ C[np.ix_(N, T)])
    CNT = CNN @ A
    CTT = avg(lambda C: C[np.ix_(T, T)] - C[np.ix_(T, N)] @ inv(C[np.ix_(N, N)]) @ C[np.ix_(N, T)]) \
        + A.T @ CNN @ A
    Ceff = np.zeros((6, 6))
    Ceff[np.ix_(N, N)], Ceff[np.ix_(N, T)], Ceff[np.ix_(T, N)], Ceff[np.ix_(T, T)] = CNN, CNT, CNT.T, CTT
    return Ceff


@pytest.mark.parametrize("precision,tol", [("float64", 1e-8), ("float32", 2e-5)])
def test_two_phase_laminate_closed_form(precision, tol):
    ph = np.zeros((8, 4, 4), np.uint8)
    ph[4:] = 1
    cell = Cell(ph, [1.0, 10.0], [0.3, 0.3])
    res = homogenize(cell, rtol=1e-12 if precision == "float64" else 1e-7, precision=precision)
    ref = laminate_closed_form(isotropic_voigt(1.0, 0.3), isotropic_voigt(10.0, 0.3), 0.5)
    assert rel(res.C, ref) <= tol
    assert np.abs(res.C - ref).max() <= tol * np.abs(ref).max()


def test_pcg_equals_direct_solve(rng):
    ph = rng.integers(0, 3, size=(10, 9, 8)).astype(np.uint8)
    cell = Cell(ph, [0.0, 1.0, 4.0], [0.3, 0.25, 0.35], size=(1.0, 0.9, 0.8))
    Cd, _ = direct_chom(ph, cell.E, cell.nu, cell.size)
    res = homogenize(cell, rtol=1e-10)
    assert res.converged
    assert rel(res.C, Cd) <= 1e-8


def random_inclusion_cell(rng, shape=(10, 10, 10)):
    """A smooth random two-phase + void cell (periodic Fourier noise)."""
    k = np.fft.fftfreq(shape[0])[:, None, None] ** 2 + np.fft.fftfreq(shape[1])[None, :, None] ** 2 \
        + np.fft.fftfreq(shape[2])[None, None, :] ** 2
    noise = np.real(np.fft.ifftn(np.fft.fftn(rng.standard_normal(shape)) * np.exp(-40 * k)))
    ph = np.digitize(noise, np.quantile(noise, [0.3, 0.65])).astype(np.uint8)
    return Cell(ph, [0.0, 1.0, 3.0], [0.3, 0.3, 0.2])


def test_chom_symmetric_positive_definite_within_bounds(rng):
    """The energy form makes any trial field's C symmetric, positive and below Voigt, so
    those checks alone pass for an unconverged solve too: the oracle is the assembled
    direct solve; the bounds then hold for the converged C^H, strictly inside them."""
    cell = random_inclusion_cell(rng)
    res = homogenize(cell, rtol=1e-9)
    C = res.C
    assert res.converged
    Cd, _ = direct_chom(cell.phases, cell.E, cell.nu, cell.size)
    assert rel(C, Cd) <= 1e-8
    assert np.abs(C - C.T).max() <= 1e-12 * np.abs(C).max()
    assert np.linalg.eigvalsh(voigt_to_mandel(C)).min() > 0
    vf = np.bincount(cell.phases.ravel(), minlength=3) / cell.phases.size
    CV, CR = voigt_reuss_bounds(vf, cell.E, cell.nu)
    # Loewner order C_R <= C^H <= C_V (in Mandel form: a tensor inequality)
    # (strictly: 0.30 and 0.38 of max|C| here; the do-nothing answer C = C_V would fail)
    assert np.linalg.eigvalsh(voigt_to_mandel(CV - C)).min() >= 0.1 * np.abs(C).max()
    assert np.linalg.eigvalsh(voigt_to_mandel(C - CR)).min() >= 0.1 * np.abs(C).max()


def test_periodic_shift_leaves_chom_unchanged(rng):
    cell = random_inclusion_cell(rng, (8, 9, 10))
    C0 = homogenize(cell, rtol=1e-10).C
    shifted = Cell(np.roll(cell.phases, (3, -2, 5), axis=(0, 1, 2)), cell.E, cell.nu)
    assert rel(homogenize(shifted, rtol=1e-10).C, C0) <= 1e-8


def test_axis_permutation_and_rotation_transform_chom(rng):
    cell = random_inclusion_cell(rng, (8, 8, 8))
    C0 = homogenize(cell, rtol=1e-10).C
    # axis permutation (x, y, z) -> (y, z, x): new axis a is old axis perm[a]
    perm = (1, 2, 0)
    R = np.zeros((3, 3))
    for a, b in enumerate(perm):
        R[a, b] = 1.0
    Cp = homogenize(Cell(np.transpose(cell.phases, perm), cell.E, cell.nu), rtol=1e-10).C
    assert rel(Cp, rotate_voigt(C0, R)) <= 1e-8
    # 90-degree rotation about z: new[i, j] = old[j, n-1-i], so old (x, y) = (y', -x'),
    # i.e. x' = -y, y' = x
    rot = np.rot90(cell.phases, k=1, axes=(0, 1))
    Rz = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1.0]])
    Cr = homogenize(Cell(np.ascontiguousarray(rot), cell.E, cell.nu), rtol=1e-10).C
    assert rel(Cr, rotate_voigt(C0, Rz)) <= 1e-8
    assert rel(Cr, C0) > 1e-4    # the cell is not isotropic: the test can fail


def test_error_estimate_tracks_true_error(rng):
    cell = random_inclusion_cell(rng, (8, 8, 8))
    Cd, _ = direct_chom(cell.phases, cell.E, cell.nu)
    ratios = []
    for rtol in (1e-2, 1e-3, 1e-4, 1e-5):
        res = homogenize(cell, rtol=rtol)
        true = np.linalg.norm(res.C - Cd) / np.linalg.norm(Cd)
        ratios.append(res.error_estimate / true)
    assert all(1 / 3 <= r <= 3 for r in ratios), ratios


def test_ctol_stops_on_the_chom_estimate(rng):
    cell = random_inclusion_cell(rng, (8, 8, 8))
    Cd, _ = direct_chom(cell.phases, cell.E, cell.nu)
    res = homogenize(cell, rtol=1e-14, ctol=1e-5)
    assert res.converged
    assert res.error_estimate <= 3e-5
    assert np.linalg.norm(res.C - Cd) / np.linalg.norm(Cd) <= 1e-4
    full = homogenize(cell, rtol=1e-10)
    assert max(res.iterations) < max(full.iterations)


def test_unconverged_is_reported(rng):
    cell = random_inclusion_cell(rng, (8, 8, 8))
    res = homogenize(cell, rtol=1e-10, maxiter=5)
    assert not res.converged
    assert max(res.iterations) == 5


def cubic_defect(C):
    """Relative distance of C from the cubic form (C11=C22=C33, C12=C13=C23,
    C44=C55=C66, all else 0)."""
    c11 = np.mean(np.diag(C)[:3])
    c12 = np.mean([C[0, 1], C[0, 2], C[1, 2]])
    c44 = np.mean(np.diag(C)[3:])
    ref = np.zeros((6, 6))
    ref[:3, :3] = c12
    ref[np.diag_indices(3)] = c11
    ref[3, 3] = ref[4, 4] = ref[5, 5] = c44
    return np.linalg.norm(C - ref) / np.linalg.norm(ref)


@pytest.mark.parametrize("surface,form", [("P", "network"), ("G", "sheet"), ("D", "network")])
def test_cubic_tpms_gives_cubic_symmetry(surface, form):
    from microstructures.generators import tpms_field
    # threshold the implicit function directly (no volume-fraction targeting, which
    # may split a group of symmetric voxels at small n)
    T = tpms_field(surface, n=12)
    solid = (np.abs(T) <= 0.6) if form == "sheet" else (T <= 0.3)
    cell = Cell(solid.astype(np.uint8), [0.0, 1.0], [0.3, 0.3])
    res = homogenize(cell, rtol=1e-10)
    # P and D are invariant under axis permutations and reflections of the voxel
    # grid; the gyroid under cyclic permutations (its other cubic operations
    # involve quarter-period shifts), so cubic up to discretization there
    assert cubic_defect(res.C) <= (1e-8 if surface in ("P", "D") else 2e-2)
    assert np.std(np.diag(res.C)[:3]) <= 1e-8 * np.abs(res.C).max()
    A = engineering_constants(res.C)["zener_ratio"]
    assert A > 0 and abs(A - 1.0) > 1e-3            # cubic, not isotropic


@pytest.mark.parametrize("material", sorted(MATERIALS))
def test_energy_form_chom_equals_the_element_sum_for_any_fields(material, rng):
    """C^H = sum_e (chi0^i - chi^i)_e^T k_e (chi0^j - chi^j)_e / |Omega| (the definition,
    element by element with the assembled oracle's matrices) for arbitrary fields, not
    only solutions: EnergyCH's identity |Omega| C_ij = |Omega| <C>_ij - f^i.chi^j -
    chi^i.r^j is exact. Also fed in blocks of 1, 2 and 3 cases, float64, by reference."""
    from solver.assembled import _element_dofs
    from solver.operator import EnergyCH
    shape, h = (5, 4, 6), (0.9, 1.1, 1.3)
    ph = rng.integers(0, 3, size=shape)
    E, nu = MATERIALS[material]
    op = ElasticityOperator.from_phases(ph, E, nu, h, chunk=2 * 4 * 6)      # several slabs
    _, _, (kes, pid, dofs, U0) = assemble(ph, E, nu, h)
    chi = torch.randn(6, 3, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    X = to_nodes_first(chi)                                                   # (3N, 6)
    D = U0[None] - X[_element_dofs(shape)].transpose(0, 2, 1)                 # (n_vox, 6, 24)
    vol = float(np.prod(h) * ph.size)
    C_def = np.einsum("via,vab,vjb->ij", D, kes[pid], D) / vol
    C_def = 0.5 * (C_def + C_def.T)
    assert rel(op.chom(chi).numpy(), C_def) <= 1e-12
    for size in (1, 2, 3):
        acc = EnergyCH(op)
        for g in range(0, 6, size):
            acc.add(chi[g:g + size], range(g, g + size), keep="ref")
        assert rel(acc.result().numpy(), C_def) <= 1e-12, size
    acc = EnergyCH(op)
    acc.add(chi[:3], range(3), keep=None)
    with pytest.raises(ValueError, match="never added"):
        acc.result()


@pytest.mark.parametrize("precision,store,tol", [("float64", None, 1e-12), ("float32", None, 1e-7),
                                                 ("float32", "float8_e4m3fn", 1e-7)])
def test_energy_form_chom_from_low_precision_copies_of_solved_cases(precision, store, tol, rng):
    """Solved load cases kept as bfloat16 (float32 for a float64 operator), or as
    scaled float8, enter only through chi^i.r^j, a term of the size of the residual:
    C^H from copies of earlier cases equals C^H from the full fields to far below the
    solver tolerance."""
    from solver.operator import EnergyCH
    cell = random_inclusion_cell(rng, (8, 8, 8))
    res = homogenize(cell, rtol=1e-9, precision=precision, keep_fields=True, preconditioner="multigrid")
    op = ElasticityOperator.from_phases(cell.phases, cell.E, cell.nu, (1 / 8,) * 3,
                                        dtype=res.chi.dtype)
    full = op.chom(res.chi).numpy()
    acc = EnergyCH(op, store_dtype=getattr(torch, store) if store else None)
    default = torch.float32 if precision == "float64" else torch.bfloat16
    assert acc.store_dtype == (getattr(torch, store) if store else default)
    for j in range(6):
        acc.add(res.chi[j:j + 1], [j], keep="copy")
    assert all(x.dtype == acc.store_dtype for _, x, _ in acc.kept)
    assert rel(acc.result().numpy(), full) <= tol
    # the copies where the identity has them is what makes this work: in the
    # first-order term f^i.chi^j (<C> - f^i.chi^j / |Omega| alone) they are off by
    # their rounding (2^-9, 2^-4)
    op64 = op.to(dtype=torch.float64)
    first = torch.stack([op64.affine_residual(x.to(torch.float64) * sc, j)[1] for j, x, sc in acc.kept], 1)
    assert rel((op64.mean_stiffness() - first / op64.volume).numpy(), full) > 100 * tol


def test_release_free_memory_finds_the_allocator():
    """homogenize hands free pages back between phases; on Linux one of the two
    allocators' calls must be found (tcmalloc when preloaded, else glibc)."""
    from solver.homogenize import release_free_memory
    from hpc.allocator import active_allocator
    got = release_free_memory()
    assert got == ("tcmalloc" if active_allocator() == "tcmalloc" else "glibc")


def test_float32_cases_one_at_a_time_with_float8_copies_give_the_same_chom(rng):
    """One case at a time in float32 at rtol 1e-6 keeps the finished cases as float8
    (EnergyCH): C^H equals the six-case block's to far below the tolerance (2.8e-10
    measured) and the float64 reference's to the float32 solve's accuracy."""
    cell = random_inclusion_cell(rng, (8, 8, 8))
    ref = homogenize(cell, rtol=1e-11, precision="float64", preconditioner="multigrid")
    block = homogenize(cell, rtol=1e-6, precision="float32", preconditioner="multigrid")
    one = homogenize(cell, rtol=1e-6, precision="float32", preconditioner="multigrid", groups=6)
    assert rel(one.C, block.C) <= 1e-8
    assert rel(one.C, ref.C) <= 1e-6 and rel(block.C, ref.C) <= 1e-6


@pytest.mark.parametrize("groups", [2, 3, 6])
def test_load_cases_in_groups_give_the_same_chom(groups, rng):
    cell = random_inclusion_cell(rng, (8, 8, 8))
    ref = homogenize(cell, rtol=1e-10)
    res = homogenize(cell, rtol=1e-10, groups=groups)
    assert rel(res.C, ref.C) <= 1e-9
    assert res.iterations == ref.iterations
    assert len(res.residuals) == 6 and res.converged


def test_native_build_falls_back_to_a_temp_dir_and_reports_a_missing_compiler(tmp_path, monkeypatch):
    """The kernel library builds into HOMOG_CACHE, or a per-user temp dir where that is
    not writable; without a compiler the operator says why and keeps the convolution
    form (a warning, not a silent slow-down)."""
    from solver import native
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    monkeypatch.setenv("HOMOG_CACHE", str(ro / "cache"))
    if os.access(ro, os.W_OK):          # root ignores the mode bits: a file in the way instead
        (ro / "cache").write_text("not a directory")
    lib = native._build()
    assert lib.exists() and lib.parent != ro / "cache"
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_error", None)
    monkeypatch.setenv("HOMOG_CACHE", str(tmp_path / "fresh"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert native.library() is None and "no-such-cc" in native.error()
    op = ElasticityOperator.from_phases(np.zeros((3, 3, 3), dtype=int), [1.0], [0.3], (1, 1, 1))
    assert op.apply_form() == "scatter"


@pytest.mark.parametrize("make", [
    lambda: lattice("octet", vf=0.15, n=16, tol=0.03),
    lambda: tpms("P", form="sheet", vf=0.2, n=(12, 18, 24), size=(1.0, 1.5, 2.0)),
])
def test_ctol_bounds_the_true_chom_error_with_multigrid_and_jacobi(make):
    """A ctol stop leaves every C^H_ii within 1.5 x ctol of the converged one (1.04 x on
    the cells of solver.pcg.TAIL_SAFETY), with the multigrid preconditioner too: its
    error estimate once came from the ratio of the first two energy decrements and
    stopped after 2-4 iterations 5-20 x short."""
    cell = make()
    ref = homogenize(cell, rtol=1e-11, preconditioner="multigrid").C
    worst = 0.0
    for pc in ("multigrid", "jacobi"):
        for ctol in (1e-2, 1e-3, 1e-4):
            res = homogenize(cell, rtol=1e-12, ctol=ctol, preconditioner=pc)
            err = np.abs(np.diag(res.C) - np.diag(ref)) / np.abs(np.diag(ref))
            worst = max(worst, err.max() / ctol)
            assert res.converged and err.max() <= 1.5 * ctol, (pc, ctol, err.max())
    assert worst > 0.05                     # the stops are near the tolerance, not far past it


def test_a_cancelling_load_counts_as_unloaded_in_float32_too():
    """In-plane shear of a z-laminate has f = 0 exactly; in float32 it comes out ~1e-8 of
    the load scale, and PCG iterated on that noise (636 iterations here, 1310 at 24^3)
    until the zero test scaled with the storage precision (solver.pcg.zero_rhs_tol)."""
    from microstructures.generators import laminate
    cell = laminate((0.5, 0.5), E=(1.0, 0.0), nu=(0.3, 0.3), axis="z", periods=8, n=16, size=(1, 1.3, 0.7))
    r64 = homogenize(cell, rtol=1e-6, precision="float64")
    r32 = homogenize(cell, rtol=1e-6, precision="float32")
    assert r64.iterations[5] == 0 and r32.iterations[5] == 0 and max(r32.iterations) <= 5, r32.iterations
    assert np.abs(r32.C - r64.C).max() <= 1e-6 * np.abs(r64.C).max()


def test_a_listed_phase_no_voxel_uses_leaves_chom_unchanged(rng):
    """The soft void is soft x max E over the phases present: listing an unused stiff
    phase changed C11 by 0.24% (6^3 random two-phase cell) through the void's E. The
    assembled oracle and the PETSc path follow the same rule."""
    from solver.petsc_ref import petsc_homogenize
    ph = (rng.random((6, 6, 6)) < 0.6).astype(np.uint8)
    two = Cell(ph, [0.0, 1.0], [0.3, 0.3])
    three = Cell(ph, [0.0, 1.0, 1000.0], [0.3, 0.3, 0.3])
    a, b = homogenize(two, rtol=1e-12).C, homogenize(three, rtol=1e-12).C
    assert np.abs(a - b).max() <= 1e-10 * np.abs(a).max()
    da, _ = direct_chom(two.phases, two.E, two.nu)
    db, _ = direct_chom(three.phases, three.E, three.nu)
    assert np.abs(da - db).max() <= 1e-12 * np.abs(da).max() and np.abs(a - da).max() <= 1e-8 * np.abs(da).max()
    pb = petsc_homogenize(three, rtol=1e-10).C
    assert np.abs(pb - da).max() <= 1e-6 * np.abs(da).max()
    # the void's E does matter (the check can fail): a stiffer listed phase that is present
    ph3 = ph.copy()
    ph3[0, 0, 0] = 2
    c = homogenize(Cell(ph3, [0.0, 1.0, 1000.0], [0.3, 0.3, 0.3]), rtol=1e-12).C
    assert np.abs(c - a).max() > 1e-4 * np.abs(a).max()
    # a cell of void alone (the API does not validate) keeps the soft material of the listed E
    from solver.materials import phase_lame
    lam, mu = phase_lame([0.0, 1.0], [0.3, 0.3], present=[True, False])
    assert mu[0] == pytest.approx(1e-6 / 2.6) and np.all(np.isfinite(lam))
