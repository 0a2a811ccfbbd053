"""Grid transfer for the periodic geometric multigrid: coarsening rule, trilinear
prolongation P, restriction R = P^T, and the element-by-element Galerkin product.

Coarsening rule (per axis, nested for any size). A fine axis of n cells is split into
``n // 2`` coarse cells of two fine cells each ("full" cells), followed, when n is odd,
by one coarse cell of a single fine cell ("single" cell); an axis that is not coarsened
(ratio 1) has only single cells. The coarse grid therefore has m = ceil(n / 2) cells
(periodic, so m nodes), coarse node k sits on fine node 2k, and the coarse mesh is
uniform except for the one short cell of an odd axis. Each fine voxel lies inside one
coarse voxel, so the coarse Q1 space is a subspace of the fine one (nested):

    P: fine node 2k     <- coarse node k
       fine node 2k + 1 <- (coarse node k + coarse node k+1) / 2    (periodic k+1)

is exact trilinear interpolation of the coarse Q1 field, and restriction is R = P^T
(Galerkin: K_c = R K P). Because a coarse Q1 function restricted to a fine child
voxel c of the coarse voxel E is a fine Q1 function, with nodal values P_c u_E
(P_c a fixed 24 x 24 matrix, a Kronecker product of 1-D 2 x 2 factors), the Galerkin
operator keeps the element-by-element form (as in Homo3D's multigrid):

    K_E = sum_{c in children(E)} P_c^T k_c P_c                     (24 x 24 per voxel)

which is exactly R K P; no probing or stencil assembly is needed. On a distributed
Domain the owned fine block must start on an even global index, so that the coarse
block starts at half of it (the single cell of an odd axis is the global last one).
"""
from __future__ import annotations

import itertools

import numpy as np
import torch
from .ieee import conv3d

# 1-D child factors A (fine local node x coarse local node) of a coarse cell.
_A_CHILD = {
    ("full", 0): np.array([[1.0, 0.0], [0.5, 0.5]]),
    ("full", 1): np.array([[0.5, 0.5], [0.0, 1.0]]),
    ("single", 0): np.eye(2),
}


def coarse_shape(shape, ratios):
    """Coarse cell counts m_d = ceil(n_d / r_d) for ratios r_d in {1, 2}."""
    return tuple(-(-int(n) // int(r)) for n, r in zip(shape, ratios))


def axis_blocks(n: int, ratio: int):
    """The coarse cells of one axis as blocks: list of (kind, coarse slice, n_cells)."""
    if ratio == 1:
        return [("single", slice(0, n), n)]
    nf, ns = n // 2, n % 2
    blocks = [("full", slice(0, nf), nf)]
    if ns:
        blocks.append(("single", slice(nf, nf + 1), 1))
    return blocks


def child_prolongation(kinds, offsets) -> np.ndarray:
    """P_c (24, 24): fine element dofs of child ``offsets`` from coarse element dofs,
    dof 3 a + comp with a = 4 a_x + 2 a_y + a_z (solver.element.CORNERS order)."""
    A = np.ones((1, 1))
    for kind, c in zip(kinds, offsets):
        A = np.kron(A, _A_CHILD[(kind, c)])
    return np.kron(A, np.eye(3))


def galerkin_blocks(fine_shape, ratios):
    """Yield (coarse box slices, fine box slices, P_c) for every child of every coarse
    voxel: the terms of K_E = sum_c P_c^T k_c P_c, grouped in boxes where P_c is fixed."""
    per_axis = []
    for n, r in zip(fine_shape, ratios):
        entries = []
        for kind, cs, ncell in axis_blocks(n, r):
            for c in ((0, 1) if kind == "full" else (0,)):
                if kind == "full":
                    fs = slice(2 * cs.start + c, 2 * cs.stop, 2)
                else:
                    f0 = 2 * cs.start if r == 2 else cs.start
                    fs = slice(f0, f0 + ncell)
                entries.append((kind, c, cs, fs))
        per_axis.append(entries)
    for ex, ey, ez in itertools.product(*per_axis):
        kinds = (ex[0], ey[0], ez[0])
        offs = (ex[1], ey[1], ez[1])
        yield (ex[2], ey[2], ez[2]), (ex[3], ey[3], ez[3]), child_prolongation(kinds, offs)


# -- nodal transfer -----------------------------------------------------------------
def _prolong_axis(ug: torch.Tensor, d: int, n: int, ratio: int) -> torch.Tensor:
    """Interpolate along dim d from m + 1 ghosted coarse nodes to n fine nodes."""
    if ratio == 1:
        return ug.narrow(d, 0, n)
    ne, no = (n + 1) // 2, n // 2          # even / odd fine nodes
    even = ug.narrow(d, 0, ne)
    odd = 0.5 * (ug.narrow(d, 0, no) + ug.narrow(d, 1, no))
    if no < ne:
        odd = torch.cat([odd, torch.zeros_like(even.narrow(d, 0, 1))], dim=d)
    out = torch.stack([even, odd], dim=d + 1).flatten(d, d + 1)
    return out.narrow(d, 0, n)


def _restrict_axis(f: torch.Tensor, d: int, m: int, ratio: int) -> torch.Tensor:
    """Adjoint of _prolong_axis: n fine nodes along dim d -> m + 1 ghosted coarse nodes."""
    n = f.shape[d]
    shape = list(f.shape)
    shape[d] = m + 1
    out = torch.zeros(shape, dtype=f.dtype, device=f.device)
    if ratio == 1:
        out.narrow(d, 0, n).copy_(f)
        return out
    ne, no = (n + 1) // 2, n // 2
    idx_e = torch.arange(0, n, 2, device=f.device)
    idx_o = torch.arange(1, n, 2, device=f.device)
    fe = f.index_select(d, idx_e)
    fo = 0.5 * f.index_select(d, idx_o)
    out.narrow(d, 0, ne).add_(fe)
    out.narrow(d, 0, no).add_(fo)
    out.narrow(d, 1, no).add_(fo)
    return out


def prolong(uc: torch.Tensor, coarse_domain, fine_local_shape, ratios) -> torch.Tensor:
    """u_f = P u_c for nodal fields (..., m_x, m_y, m_z) -> (..., n_x, n_y, n_z)."""
    ug = coarse_domain.ghost(uc, lo=0, hi=1)
    nd = ug.dim()
    for ax in range(3):
        ug = _prolong_axis(ug, nd - 3 + ax, fine_local_shape[ax], ratios[ax])
    return ug


def restrict(uf: torch.Tensor, coarse_domain, ratios) -> torch.Tensor:
    """r_c = P^T r_f (the transpose of ``prolong``)."""
    nd = uf.dim()
    m = coarse_domain.local_shape
    if nd == 5 and tuple(ratios) == (2, 2, 2) and tuple(uf.shape[2:]) == tuple(2 * k for k in m):
        return coarse_domain.accumulate(_restrict_conv(uf), lo=0, hi=1)
    x = uf
    for ax in (2, 1, 0):
        x = _restrict_axis(x, nd - 3 + ax, m[ax], ratios[ax])
    return coarse_domain.accumulate(x, lo=0, hi=1)


def _restrict_conv(uf: torch.Tensor) -> torch.Tensor:
    """P^T r_f onto the m + 1 ghosted coarse nodes per axis when every axis halves
    (n = 2 m): coarse node j collects 1/2 f[2j-1] + f[2j] + 1/2 f[2j+1] per axis, the
    f[-1] share arriving through the high ghost layer (Domain.accumulate). One
    depthwise Conv3d (weight [1/2, 1, 1/2]^3, stride 2) over f with one zero layer
    below and two above: ~10x faster on CPU than the axis-by-axis index_select form."""
    B, C, nx, ny, nz = uf.shape
    cl = torch.channels_last_3d
    fz = torch.empty((B, C, nx + 3, ny + 3, nz + 3), dtype=uf.dtype, device=uf.device, memory_format=cl)
    fz[:, :, 1:nx + 1, 1:ny + 1, 1:nz + 1] = uf
    for d, n in ((2, nx), (3, ny), (4, nz)):
        fz.narrow(d, 0, 1).zero_()
        fz.narrow(d, n + 1, 2).zero_()
    w1 = torch.tensor([0.5, 1.0, 0.5], dtype=uf.dtype, device=uf.device)
    w = (w1[:, None, None] * w1[None, :, None] * w1[None, None, :]).expand(C, 1, 3, 3, 3).contiguous()
    return conv3d(fz, w, stride=2, groups=C)
