"""CGINS network, embedded PCG and energy loss.

Oracles: solver.pcg.pcg (same start, t iterations, rtol 0), the solver's operator
(energy 1/2 u.Ku - u.f), finite differences / gradcheck in float64, the adjoint
identity R = P^T, and periodic-shift equivariance (roll in, roll out).
"""
import types

import numpy as np
import pytest
import torch

from model.embedded_pcg import embedded_pcg
from model.inputs import periodic_dilation
from model.loss import LossConfig, cgins_loss, galerkin_energy, potential_energy
from model.network import CGINS, CGINSConfig
from model.transfer import prolongate, restrict
from solver.operator import ElasticityOperator
from solver.pcg import pcg

torch.set_num_threads(1)
F64 = torch.float64
SMALL = dict(channels=(4, 6, 8), fourier_freqs=1)


def gyroid_phases(n, shift=0.0, level=0.6):
    """Gyroid-like sheet on an n^3 grid (numpy; the generators are not required)."""
    x = (np.arange(n) + 0.5) / n
    X, Y, Z = np.meshgrid(x, x, x, indexing="ij")
    t = 2 * np.pi
    v = (np.sin(t * X + shift) * np.cos(t * Y) + np.sin(t * Y) * np.cos(t * Z)
         + np.sin(t * Z) * np.cos(t * X))
    return (np.abs(v) < level).astype(np.uint8)


def make_op(phases, nu=0.3):
    n = phases.shape
    return ElasticityOperator.from_phases(phases, [0.0, 1.0], [nu, nu], tuple(1.0 / s for s in n))


def make_net(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = CGINSConfig(**{**SMALL, **kw})
    return CGINS(cfg).to(F64)


def _max_mean(u):
    return float(u.detach().mean(dim=(-3, -2, -1)).abs().max())


# -- transfers -------------------------------------------------------------------
def test_restriction_is_prolongation_transpose():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(2, 3, 4, 2, 4, generator=g, dtype=F64)
    f = torch.randn(2, 3, 8, 4, 8, generator=g, dtype=F64)
    assert abs(float((prolongate(c) * f).sum().detach() - (c * restrict(f)).sum())) < 1e-12
    # trilinear interpolation keeps constants and preserves the mean (weights sum to 8)
    assert torch.allclose(prolongate(torch.ones(1, 2, 2, 2, dtype=F64), 2), torch.ones(1, 8, 8, 8, dtype=F64))
    assert abs(float(prolongate(c).mean() - c.mean())) < 1e-14


# -- embedded PCG ----------------------------------------------------------------
@pytest.mark.parametrize("t", [1, 4, 7])
def test_embedded_pcg_equals_solver_pcg(t):
    op = make_op(gyroid_phases(8))
    f = op.rhs()
    x0 = torch.randn(6, 3, 8, 8, 8, generator=torch.Generator().manual_seed(t), dtype=F64) * 1e-2
    ref, info = pcg(op, f, x0=x0, rtol=0.0, maxiter=t)
    assert info.iterations == [t] * 6
    x = embedded_pcg(op, f, x0, t)
    assert float((x - ref).abs().max() / ref.abs().max()) < 1e-10


def test_embedded_pcg_gradcheck():
    op = make_op(gyroid_phases(4, level=0.9))
    f = op.rhs()[:2]
    x0 = (1e-2 * torch.randn(2, 3, 4, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(1))).requires_grad_(True)
    w = torch.randn(2, 3, 4, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    assert torch.autograd.gradcheck(lambda x: (embedded_pcg(op, f, x, 2) * w).sum(), (x0,))


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-12), (torch.float32, 2e-5)])
def test_symmetric_apply_gradient_equals_the_convolution_chain(dtype, tol, monkeypatch):
    """Autograd through K u uses K's symmetry (one apply forward, one backward, the
    fused kernel where it serves); the gradient of energy-after-PCG must equal the one
    autograd records through the convolution chain."""
    op = ElasticityOperator.from_phases(gyroid_phases(8), [0.0, 1.0], [0.3, 0.3], (1 / 8,) * 3, dtype=dtype)
    u0 = 1e-2 * torch.randn(6, 3, 8, 8, 8, dtype=dtype, generator=torch.Generator().manual_seed(3))

    def grad():
        u = u0.clone().requires_grad_(True)
        e = potential_energy(op, embedded_pcg(op, op.rhs(), u, 4)).sum()
        e.backward()
        return float(e.detach()), u.grad

    e1, g1 = grad()
    with torch.enable_grad():
        node = op.apply(u0.clone().requires_grad_(True)).grad_fn
    assert type(node).__name__ == "_SymmetricApplyBackward"
    monkeypatch.setattr(ElasticityOperator, "_symmetric_grad_ok", lambda self: False)
    with torch.enable_grad():
        assert type(op.apply(u0.clone().requires_grad_(True)).grad_fn).__name__ != "_SymmetricApplyBackward"
    e2, g2 = grad()
    assert abs(e1 - e2) <= tol * abs(e2)
    assert float((g1 - g2).norm() / g2.norm()) < tol


def test_apply_records_the_convolution_chain_when_the_material_needs_a_gradient():
    op = make_op(gyroid_phases(4, level=0.9))
    assert op._symmetric_grad_ok()
    op.mu.requires_grad_(True)
    assert not op._symmetric_grad_ok()
    u = 1e-2 * torch.randn(1, 3, 4, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(4))
    (op.apply(u.requires_grad_(True)) * u.detach()).sum().backward()
    assert op.mu.grad is not None and float(op.mu.grad.abs().max()) > 0


# -- loss --------------------------------------------------------------------------
def test_energy_equals_solver_operator_energy_and_gradient():
    op = make_op(gyroid_phases(8))
    f = op.rhs()
    u = torch.randn(6, 3, 8, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(0)) * 1e-2
    Ku = op.apply(u)
    ref = torch.tensor([0.5 * float((u[i] * Ku[i]).sum()) - float((u[i] * f[i]).sum()) for i in range(6)],
                       dtype=F64)
    assert torch.allclose(potential_energy(op, u), ref, rtol=1e-12, atol=0)
    # gradient of Pi is K u - f
    uu = u.clone().requires_grad_(True)
    potential_energy(op, uu).sum().backward()
    assert float((uu.grad - (Ku - f)).abs().max() / (Ku - f).abs().max()) < 1e-12
    # and matches finite differences on a tiny grid
    op4 = make_op(gyroid_phases(4, level=0.9))
    v = (1e-2 * torch.randn(2, 3, 4, 4, 4, dtype=F64)).requires_grad_(True)
    f4 = op4.rhs()[:2]
    assert torch.autograd.gradcheck(lambda x: potential_energy(op4, x, f4), (v,))


def test_galerkin_coarse_energy_is_fine_energy_of_prolongation():
    op = make_op(gyroid_phases(8))
    for level in (1, 2):
        m = 8 >> level
        v = torch.randn(6, 3, m, m, m, dtype=F64, generator=torch.Generator().manual_seed(level))
        a = galerkin_energy(op, v, level)
        b = potential_energy(op, prolongate(v, level))
        assert torch.allclose(a, b, rtol=1e-12, atol=0)


def test_loss_composition_matches_explicit_energy():
    ops = [make_op(gyroid_phases(8, s)) for s in (0.0, 1.0)]
    net = make_net(levels=2, t=2)
    out = net(ops)
    cfg = LossConfig(level_weights=(1.0, 0.3), mean_penalty=2.0)
    loss, parts = cgins_loss(ops, out, cfg)
    ref = 0.0
    for b, op in enumerate(ops):
        for w, U in ((1.0, out.u[b]), (0.3, out.levels[0][b])):
            Ku = op.apply(U.detach())
            e = 0.5 * (U.detach() * Ku).sum() - (U.detach() * op.rhs()).sum()
            ref += w * float(e) / op.volume + 2.0 * float(((U.detach().mean(dim=(-3, -2, -1))) ** 2).sum())
    assert abs(float(loss.detach()) - ref / 2) < 1e-12 * abs(ref)


def _fields(ops, seed=0, scale=1e-2):
    """A CGINSOutput-like pair (u, levels) of fixed fields for the loss."""
    g = torch.Generator().manual_seed(seed)
    n = ops[0].domain.global_shape
    u = scale * torch.randn(len(ops), 6, 3, *n, dtype=F64, generator=g)
    lv = scale * torch.randn(len(ops), 6, 3, *n, dtype=F64, generator=g)
    return types.SimpleNamespace(u=u, levels=[lv])


def test_relative_loss_divides_each_cell_by_its_energy_form_stiffness_trace():
    """normalize=relative: each cell's energies over s = trace of the energy-form C^H
    of its fine output (EnergyCH via op.chom, an independent code path); s is the
    solver's trace C^H at the solution and an upper bound of it elsewhere."""
    ops = [make_op(gyroid_phases(8, s), nu=nu) for s, nu in ((0.0, 0.3), (1.0, 0.2))]
    out = _fields(ops)
    cfg = LossConfig(level_weights=(1.0, 0.3), mean_penalty=0.0, normalize="relative")
    loss, parts = cgins_loss(ops, out, cfg)
    ref = 0.0
    for b, op in enumerate(ops):
        s = float(torch.trace(op.chom(out.u[b])))
        e = [float(potential_energy(op, U[b]).sum()) / op.volume for U in (out.u, out.levels[0])]
        ref += (e[0] + 0.3 * e[1]) / s
    assert abs(float(loss) - ref / 2) < 1e-10 * abs(ref)
    # at the solution s is trace C^H; any other field gives more
    op = ops[0]
    x, info = pcg(op, op.rhs(), rtol=1e-12, maxiter=2000)
    CH = float(torch.trace(op.chom(x)))
    from model.loss import stiffness_scale
    assert abs(float(stiffness_scale(op, potential_energy(op, x))) - CH) < 1e-9 * CH
    assert float(stiffness_scale(op, potential_energy(op, out.u[0]))) > CH


def test_relative_loss_is_invariant_to_the_modulus_and_its_gradient_is_the_plain_one_scaled():
    phases = gyroid_phases(8)
    h = (1.0 / 8,) * 3
    op1 = ElasticityOperator.from_phases(phases, [0.0, 1.0], [0.3, 0.3], h)
    op7 = ElasticityOperator.from_phases(phases, [0.0, 7.0], [0.3, 0.3], h)
    out = _fields([op1])
    rel = LossConfig(level_weights=(1.0, 0.5), mean_penalty=0.0, normalize="relative")
    plain = LossConfig(level_weights=(1.0, 0.5), mean_penalty=0.0)
    l1, _ = cgins_loss([op1], out, rel)
    l7, _ = cgins_loss([op7], out, rel)
    assert abs(float(l1) - float(l7)) < 1e-12 * abs(float(l1))
    # the plain loss scales with E; the relative one does not
    assert abs(float(cgins_loss([op7], out, plain)[0]) - 7 * float(cgins_loss([op1], out, plain)[0])) \
        < 1e-12 * abs(7 * float(l1))
    # d(relative)/du = d(plain)/du / s (s detached)
    u = out.u.clone().requires_grad_(True)
    o = types.SimpleNamespace(u=u, levels=out.levels)
    gr, = torch.autograd.grad(cgins_loss([op1], o, rel)[0], u)
    gp, = torch.autograd.grad(cgins_loss([op1], o, plain)[0], u)
    from model.loss import stiffness_scale
    s = float(stiffness_scale(op1, potential_energy(op1, out.u[0])))
    assert float((gr - gp / s).abs().max()) < 1e-12 * float(gp.abs().max() / s)


def test_loss_config_rejects_an_unknown_normalization():
    with pytest.raises(ValueError, match="normalize"):
        LossConfig(normalize="per-voxel")
    assert LossConfig.from_dict({"normalize": "relative"}).to_dict()["normalize"] == "relative"


def test_loss_gradient_wrt_network_parameters_matches_finite_differences():
    ops = [make_op(gyroid_phases(8))]
    net = make_net(levels=2, t=2)
    cfg = LossConfig(level_weights=(1.0, 0.5))
    params = [p for p in net.parameters()]
    loss, _ = cgins_loss(ops, net(ops), cfg)
    grads = torch.autograd.grad(loss, params)
    g = torch.Generator().manual_seed(3)
    dirs = [torch.randn(p.shape, generator=g, dtype=F64) for p in params]
    dd = sum(float((gr * d).sum()) for gr, d in zip(grads, dirs))
    h = 1e-6

    def at(sign):
        with torch.no_grad():
            for p, d in zip(params, dirs):
                p.add_(sign * h * d)
            val = float(cgins_loss(ops, net(ops), cfg)[0])
            for p, d in zip(params, dirs):
                p.sub_(sign * h * d)
        return val

    fd = (at(1) - at(-1)) / (2 * h)
    assert abs(fd - dd) < 1e-6 * max(1.0, abs(dd)), (fd, dd)


# -- network properties ------------------------------------------------------------
def _assert_same_outputs(a, b, rtol):
    """Two CGINSOutputs agree (the PCG output, the network prediction, every level) to
    ``rtol`` of the prediction's size; returns that size."""
    scale = float(a.u_net.detach().abs().max())
    assert scale > 0
    for x, y in [(a.u, b.u), (a.u_net, b.u_net)] + list(zip(a.levels, b.levels)):
        x, y = x.detach(), y.detach()
        assert float((x - y).abs().max()) <= rtol * max(scale, float(x.abs().max()))
    return scale


@pytest.mark.parametrize("kw", [dict(levels=2), dict(levels=3, input_pyramid=False),
                                dict(levels=1, mean_constraint=False)])
def test_widening_preserves_the_function_and_trains_the_new_channels(kw):
    """widen_state_dict (train.init_from into wider channels): the wider network
    computes the narrow one's output (network prediction, every level, after the PCG)
    to rounding, and the new channels' fan-out gets a non-zero gradient at once."""
    from model.network import widen_state_dict
    narrow = make_net(seed=0, **kw)
    wide = make_net(seed=1, **{**kw, "channels": (6, 9, 13)})
    wide.load_state_dict(widen_state_dict(narrow.state_dict(), narrow.cfg, wide))
    op = make_op(gyroid_phases(8))
    b = wide([op])
    _assert_same_outputs(narrow([op]), b, 1e-10)
    energy = potential_energy(op, b.u_net[0]).sum()
    energy.backward()
    g = wide.dec[0].weight.grad                         # (offset, in, out)
    assert float(g[:, 4:, :4].abs().max()) > 0          # new channels 4, 5 -> old outputs
    g = wide.up[0].weight.grad
    assert float(g[:, 6:, :4].abs().max()) > 0          # level-1 new channels -> old outputs
    with pytest.raises(ValueError, match="do not widen"):
        widen_state_dict(wide.state_dict(), wide.cfg, narrow)


@pytest.mark.parametrize("kw", [dict(levels=2), dict(levels=3, input_pyramid=False, periodic=False)])
def test_deepening_preserves_the_function_and_trains_the_new_blocks(kw):
    """deepen_state_dict (train.init_from into more residual blocks, ``res_blocks``):
    the deeper network computes the shallow one's output exactly (every added block is
    the identity: its second convolution starts at zero), the added blocks get a
    gradient at once, and trained blocks change the function."""
    from model.network import deepen_state_dict
    shallow = make_net(seed=0, **kw)
    deep = make_net(seed=1, **{**kw, "res_blocks": (1, 0, 2)})
    assert len(deep.res[0]) == 1 and len(deep.res[1]) == 0 and len(deep.res[2]) == 2
    deep.load_state_dict(deepen_state_dict(shallow.state_dict(), shallow.cfg, deep))
    op = make_op(gyroid_phases(8))
    a, b = shallow([op]), deep([op])
    scale = _assert_same_outputs(a, b, 1e-12)
    potential_energy(op, b.u_net[0]).sum().backward()
    for blk in (deep.res[0][0], deep.res[2][1]):
        assert float(blk.conv_b.weight.grad.abs().max()) > 0        # the zero conv moves first
    with torch.no_grad():
        deep.res[2][1].conv_b.weight.normal_(0, 0.1)
    assert float((deep([op]).u_net - a.u_net).detach().abs().max()) > 1e-6 * scale
    # a deeper network cannot be loaded into a shallower one, nor another width
    with pytest.raises(ValueError, match="do not deepen"):
        deepen_state_dict(deep.state_dict(), deep.cfg, shallow)
    with pytest.raises(ValueError, match="do not deepen"):
        deepen_state_dict(shallow.state_dict(), shallow.cfg, make_net(**{**kw, "channels": (4, 6, 9),
                                                                          "res_blocks": (0, 0, 1)}))


def test_res_blocks_config():
    """One count per U-Net level, none negative; all zero is the same as none, and a
    config without blocks writes no res_blocks key (older checkpoints' config dicts)."""
    assert CGINSConfig(**SMALL, res_blocks=[0, 1, 2]).res_blocks == (0, 1, 2)
    assert CGINSConfig(**SMALL, res_blocks=[0, 1, 2]).to_dict()["res_blocks"] == [0, 1, 2]
    for rb in ((), (0, 0, 0), None):
        cfg = CGINSConfig(**SMALL, res_blocks=rb)
        assert cfg.res_blocks == () and "res_blocks" not in cfg.to_dict()
        assert CGINSConfig.from_dict(cfg.to_dict()) == cfg
    for bad in ((1, 2), (0, 0, 0, 1), (0, -1, 1)):
        with pytest.raises(ValueError, match="res_blocks must give 3 counts"):
            CGINSConfig(**SMALL, res_blocks=bad)


@pytest.mark.parametrize("kw", [dict(levels=1, t=0, use_pcg=False), dict(levels=2, t=3),
                                dict(levels=3, t=2, soft_voxels=False),
                                dict(levels=3, t=1, periodic=False, fourier_mode="random",
                                     material_features="mandel21")])
def test_output_is_mean_free(kw):
    ops = [make_op(gyroid_phases(8, s)) for s in (0.0, 2.0)]
    out = make_net(**kw)(ops)
    scale = float(out.u_net.detach().abs().max())
    assert _max_mean(out.u) < 1e-13 * scale
    assert _max_mean(out.u_net) < 1e-13 * scale
    for U in out.levels:
        assert _max_mean(U) < 1e-13 * scale
    assert out.u.shape == (2, 6, 3, 8, 8, 8)


def test_anchor_constraint_pins_the_first_active_node():
    ops = [make_op(gyroid_phases(8))]
    out = make_net(levels=2, mean_constraint=False, use_pcg=False)(ops)
    a = int(out.grid.keys[0])
    assert float(out.u_net[0].detach().reshape(6, 3, -1)[:, :, a].abs().max()) == 0.0
    assert _max_mean(out.u_net) > 0


@torch.no_grad()
def test_shift_equivariance_without_position_features():
    n = 16
    ph = gyroid_phases(n, 0.3)
    depth = 2                                   # channels (4, 6, 8): shifts by multiples of 4
    shift, dims = (4, -8, 12), (-3, -2, -1)
    net = make_net(levels=3, t=3, position_features=False)
    u = net([make_op(ph)]).u
    ur = net([make_op(np.roll(ph, shift, (0, 1, 2)))]).u
    assert shift[0] % (1 << depth) == 0
    err = float((ur - torch.roll(u, shift, dims)).abs().max() / u.abs().max())
    assert err < 1e-10
    # residual blocks on every level keep the property
    netr = make_net(levels=2, t=3, position_features=False, res_blocks=(1, 1, 1))
    for blk in (b for level in netr.res for b in level):
        blk.conv_b.weight.data.normal_(0, 0.2)              # not the identity
    u, ur = netr([make_op(ph)]).u, netr([make_op(np.roll(ph, shift, (0, 1, 2)))]).u
    assert float((ur - torch.roll(u, shift, dims)).abs().max() / u.abs().max()) < 1e-10
    # the property has teeth: with position features the output is not shift-equivariant
    netp = make_net(levels=3, t=3, position_features=True)
    up = netp([make_op(ph)]).u
    upr = netp([make_op(np.roll(ph, shift, (0, 1, 2)))]).u
    assert float((upr - torch.roll(up, shift, dims)).abs().max() / up.abs().max()) > 1e-3


def test_soft_padding_covers_every_node_of_every_solid_voxel():
    ph = torch.as_tensor(gyroid_phases(8, level=0.3)).bool()[None]
    act = periodic_dilation(ph)[0]
    solid = ph[0]
    for a in ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)):
        corner = torch.roll(act, tuple(-s for s in a), (0, 1, 2))   # corner[v] = act[v + a]
        assert bool(corner[solid].all())
    assert int(act.sum()) < act.numel()          # the padding is one layer, not everything


def test_network_runs_in_float32_against_float64_operator():
    ops = [make_op(gyroid_phases(8))]
    torch.manual_seed(0)
    net = CGINS(CGINSConfig(**SMALL, levels=2, t=2))
    out = net(ops)
    loss, parts = cgins_loss(ops, out)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert out.u.dtype == F64
