"""Trilinear grid transfers between periodic nodal grids (vertex-centred coarsening).

Coarse node I of level l+1 sits on fine node 2I of level l (node (i, j, k) is the
(-,-,-) corner of voxel (i, j, k), docs/DESIGN.md s.2). Prolongation P is the trilinear
(Q1) interpolation, a tensor product of the 1-D periodic rule

    (P c)[2I] = c[I],    (P c)[2I + 1] = (c[I] + c[I + 1 mod m]) / 2,

and restriction is its transpose R = P^T (full weighting without the 1/8):

    (R f)[I] = f[2I] + (f[2I - 1] + f[2I + 1]) / 2.

With these the Galerkin coarse operator and load are K^l = R K P, f^l = R f, and the
coarse potential energy 1/2 u.K^l u - u.f^l equals the fine energy of P u: the
loss evaluates coarse levels matrix-free that way (model/loss.py).

Fields are (..., m_x, m_y, m_z); all ops are out-of-place (autograd-friendly).
"""
from __future__ import annotations

import torch


def _prolong_axis(c: torch.Tensor, d: int) -> torch.Tensor:
    nxt = torch.roll(c, -1, dims=d)
    even, odd = c, 0.5 * (c + nxt)
    out = torch.stack([even, odd], dim=d + 1)
    shape = list(c.shape)
    shape[d] *= 2
    return out.reshape(shape)


def _restrict_axis(f: torch.Tensor, d: int) -> torch.Tensor:
    m = f.shape[d] // 2
    shape = list(f.shape)
    shape[d:d + 1] = [m, 2]
    g = f.reshape(shape)
    even = g.select(d + 1, 0)
    odd = g.select(d + 1, 1)
    return even + 0.5 * (odd + torch.roll(odd, 1, dims=d))


def prolongate(c: torch.Tensor, times: int = 1) -> torch.Tensor:
    """P^times c: coarse nodal field (..., m_x, m_y, m_z) -> (..., 2^t m_x, ...)."""
    for _ in range(times):
        for d in range(c.dim() - 3, c.dim()):
            c = _prolong_axis(c, d)
    return c


def restrict(f: torch.Tensor, times: int = 1) -> torch.Tensor:
    """R^times f = (P^T)^times f: fine nodal field -> coarse (sizes must be even)."""
    for _ in range(times):
        if any(s % 2 for s in f.shape[-3:]):
            raise ValueError(f"restriction needs even grid sizes, got {tuple(f.shape[-3:])}")
        for d in range(f.dim() - 3, f.dim()):
            f = _restrict_axis(f, d)
    return f
