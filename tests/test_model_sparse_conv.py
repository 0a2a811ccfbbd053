"""Periodic sparse convolution == dense Conv3d with circular padding (the oracle).

Checks: forward and backward (input and weight gradients) with all voxels active,
float32 to 1e-6 (relative) and float64 to 1e-12; periodic-roll equivariance;
a partial active set equals the dense circular convolution masked to the active
set when inactive inputs are zero; strided down/up-sampling == Conv3d(stride 2) /
ConvTranspose3d(stride 2); zero-padding maps == Conv3d(padding=1); gradcheck of
the custom autograd Function.
"""
import pytest
import torch
import torch.nn.functional as F

from model.sparse_conv import (SparseConv3d, SparseDown, SparseGrid, SparseTensor, SparseUp,
                               sparse_avg_pool)

torch.set_num_threads(1)

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _circ_conv(x, w, b):
    return F.conv3d(F.pad(x, (1, 1, 1, 1, 1, 1), mode="circular"), w, b)


def _setup(dtype, shape=(6, 5, 4), B=2, cin=3, cout=4, seed=0, mask=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cin, *shape, generator=g, dtype=dtype)
    w = torch.randn(cout, cin, 3, 3, 3, generator=g, dtype=dtype)
    b = torch.randn(cout, generator=g, dtype=dtype)
    if mask is None:
        mask = torch.ones(B, *shape, dtype=torch.bool)
    grid = SparseGrid.from_mask(mask)
    conv = SparseConv3d(cin, cout).to(dtype).load_dense(w, b)
    return x, w, b, grid, conv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_grid_equals_circular_conv3d_forward_backward(dtype):
    x, w, b, grid, conv = _setup(dtype)
    # dense oracle
    xd = x.clone().requires_grad_(True)
    wd = w.clone().requires_grad_(True)
    yd = _circ_conv(xd, wd, b)
    g = torch.randn_like(yd)
    (yd * g).sum().backward()
    # sparse
    xs = grid.from_dense(x).requires_grad_(True)
    ys = conv(SparseTensor(xs, grid))
    (ys.features * grid.from_dense(g)).sum().backward()
    assert _rel(grid.to_dense(ys.features.detach()), yd.detach()) < TOL[dtype]
    assert _rel(grid.to_dense(xs.grad), xd.grad) < TOL[dtype]
    wgrad = conv.weight.grad.reshape(3, 3, 3, 3, 4).permute(4, 3, 0, 1, 2)
    assert _rel(wgrad, wd.grad) < TOL[dtype]


def test_periodic_roll_equivariance():
    x, w, b, grid, conv = _setup(torch.float64, shape=(6, 6, 4))
    shift, dims = (2, -1, 3), (2, 3, 4)
    y = grid.to_dense(conv(SparseTensor(grid.from_dense(x), grid)).features)
    xr = torch.roll(x, shift, dims)
    yr = grid.to_dense(conv(SparseTensor(grid.from_dense(xr), grid)).features)
    assert _rel(yr, torch.roll(y, shift, dims)) < 1e-12


def test_partial_active_set_equals_masked_dense():
    shape = (6, 6, 6)
    mask = torch.rand(2, *shape, generator=torch.Generator().manual_seed(3)) < 0.4
    x, w, b, grid, conv = _setup(torch.float64, shape=shape, mask=mask)
    x = x * mask[:, None]
    yd = _circ_conv(x, w, b) * mask[:, None]
    ys = grid.to_dense(conv(SparseTensor(grid.from_dense(x), grid)).features)
    assert _rel(ys, yd) < 1e-12
    # the roll property also holds on a partial set (its own shifted active set)
    shift, dims = (1, 4, -2), (1, 2, 3)
    grid_r = SparseGrid.from_mask(torch.roll(mask, shift, dims))
    xr = torch.roll(x, shift, (2, 3, 4))
    yr = grid_r.to_dense(conv(SparseTensor(grid_r.from_dense(xr), grid_r)).features)
    assert _rel(yr, torch.roll(ys, shift, (2, 3, 4))) < 1e-12


def test_zero_padding_maps_equal_conv3d_padding():
    x, w, b, _, _ = _setup(torch.float64)
    grid = SparseGrid.from_mask(torch.ones(2, 6, 5, 4, dtype=torch.bool))
    conv = SparseConv3d(3, 4, periodic=False).to(torch.float64).load_dense(w, b)
    ys = grid.to_dense(conv(SparseTensor(grid.from_dense(x), grid)).features)
    assert _rel(ys, F.conv3d(x, w, b, padding=1)) < 1e-12


def test_strided_down_and_up_equal_dense():
    dt = torch.float64
    g = torch.Generator().manual_seed(1)
    shape = (8, 6, 4)
    mask = torch.rand(2, *shape, generator=g) < 0.3
    x = torch.randn(2, 3, *shape, generator=g, dtype=dt) * mask[:, None]
    wd = torch.randn(5, 3, 2, 2, 2, generator=g, dtype=dt)
    bd = torch.randn(5, generator=g, dtype=dt)
    grid = SparseGrid.from_mask(mask)
    coarse, _ = grid.coarsen()
    cmask = F.max_pool3d(mask[:, None].to(dt), 2)[:, 0] > 0
    assert torch.equal(coarse.to_dense(torch.ones(coarse.n_active, 1, dtype=dt))[:, 0] > 0, cmask)
    down = SparseDown(3, 5).to(dt).load_dense(wd, bd)
    xs = grid.from_dense(x).requires_grad_(True)
    yc = down(SparseTensor(xs, grid))
    yd = F.conv3d(x, wd, bd, stride=2) * cmask[:, None]
    assert _rel(yc.dense(), yd) < 1e-12
    # transpose: coarse -> fine, masked to the fine active set
    wu = torch.randn(5, 3, 2, 2, 2, generator=g, dtype=dt)
    bu = torch.randn(3, generator=g, dtype=dt)
    up = SparseUp(5, 3).to(dt).load_dense(wu, bu)
    yf = up(yc, grid)
    yud = F.conv_transpose3d(yd, wu, bu, stride=2) * mask[:, None]
    assert _rel(yf.dense(), yud) < 1e-12
    # backward through both against the dense chain
    gy = torch.randn_like(yud)
    (yf.features * grid.from_dense(gy)).sum().backward()
    xd = x.clone().requires_grad_(True)
    out = F.conv_transpose3d(F.conv3d(xd, wd, bd, stride=2) * cmask[:, None], wu, bu, stride=2) * mask[:, None]
    (out * gy).sum().backward()
    assert _rel(grid.to_dense(xs.grad), xd.grad * mask[:, None]) < 1e-12
    # average pool = mean over active children
    pooled = sparse_avg_pool(SparseTensor(grid.from_dense(x), grid)).dense()
    cnt = F.avg_pool3d(mask[:, None].to(dt), 2) * 8
    ref = F.avg_pool3d(x, 2) * 8 / cnt.clamp_min(1)
    assert _rel(pooled, ref * cmask[:, None]) < 1e-12


def test_gradcheck_custom_function():
    dt = torch.float64
    mask = torch.rand(1, 4, 4, 4, generator=torch.Generator().manual_seed(5)) < 0.5
    grid = SparseGrid.from_mask(mask)
    conv = SparseConv3d(2, 2).to(dt)
    x = torch.randn(grid.n_active, 2, dtype=dt, requires_grad=True)
    w = conv.weight.detach().clone().requires_grad_(True)
    from model.sparse_conv import sparse_conv
    nmap = grid.neighbour_map(3, True)
    assert torch.autograd.gradcheck(lambda a, b: sparse_conv(a, b, nmap), (x, w))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    x, w, b, grid, conv = _setup(torch.float64, mask=torch.rand(2, 6, 5, 4, generator=torch.Generator().manual_seed(2)) < 0.5)
    xs = grid.from_dense(x)
    y_cpu = conv(SparseTensor(xs, grid)).features
    gc = grid.to("cuda")
    y_gpu = conv.to("cuda")(SparseTensor(xs.cuda(), gc)).features
    assert _rel(y_gpu.cpu(), y_cpu) < 1e-12
