"""Symmetrized CGINS start: the network's prediction averaged over symmetries of the grid.

The cell problem is equivariant under the point symmetries of the periodic grid (axis
permutations among axes of equal length and spacing, and reflections x -> -x): if u
solves the cell with macro strain E, then for the transformed cell, whose material at
y = R x is the original's at x, the field R u(R^T y) solves it with strain R E R^T.
For these R, R E_k R^T = s_k E_pi(k) for the six Voigt unit strains, so a prediction for
the transformed cell maps back case by case (``pull_back``). The network is not
equivariant; averaging the mapped-back predictions of K transforms of one cell projects
its start towards the symmetric fields the exact solution lies in, and by convexity of
the potential energy the average's energy is at most the mean of its members' (Jensen).

Cost: K forward passes instead of one (batched). The embedded PCG runs once, on the original cell,
from the averaged start. Shifts are left out on purpose: the network has position
features and its training cells sit where the generators put them, so shifted cells are
new to it and their starts are worse (BENCHMARKS.md, "CGINS start averaged over grid symmetries").

Voxel v of an axis of n voxels maps to n - 1 - v under a reflection, node j to -j mod n;
a permutation ``perm`` makes new axis i the old axis perm[i].
"""
from __future__ import annotations

import itertools
from typing import List, Sequence, Tuple

import numpy as np
import torch

from .embedded_pcg import embedded_pcg, mean_free
from .network import embedded_steps

VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))
Symmetry = Tuple[Tuple[int, int, int], Tuple[bool, bool, bool]]
IDENTITY: Symmetry = ((0, 1, 2), (False, False, False))


def grid_symmetries(shape: Sequence[int], h: Sequence[float]) -> List[Symmetry]:
    """The grid's point symmetries (48 for a cube grid), the identity first, the rest in
    a fixed pseudo-random order (seed 0), so that the first K are a reproducible pick."""
    shape, h = tuple(int(s) for s in shape), tuple(float(v) for v in h)
    out = []
    for perm in itertools.permutations(range(3)):
        if any(shape[perm[i]] != shape[i] or not np.isclose(h[perm[i]], h[i]) for i in range(3)):
            continue
        for flips in itertools.product((False, True), repeat=3):
            if (perm, flips) != IDENTITY:
                out.append((perm, flips))
    order = np.random.default_rng(0).permutation(len(out))
    return [IDENTITY] + [out[i] for i in order]


def rotation(g: Symmetry) -> np.ndarray:
    """R with y_i = s_i x_perm[i]."""
    perm, flips = g
    R = np.zeros((3, 3))
    for i in range(3):
        R[i, perm[i]] = -1.0 if flips[i] else 1.0
    return R


def case_map(g: Symmetry) -> List[Tuple[int, float]]:
    """(pi(k), s_k) with R E_k R^T = s_k E_pi(k) for the Voigt unit strains E_k."""
    R = rotation(g)
    out = []
    for i, j in VOIGT:
        E = np.zeros((3, 3))
        E[i, j] = E[j, i] = 1.0
        E2 = R @ E @ R.T
        m = next(m for m, (a, b) in enumerate(VOIGT) if abs(E2[a, b]) > 0.5)
        out.append((m, float(np.sign(E2[VOIGT[m]]))))
    return out


def transform_voxels(a: torch.Tensor, g: Symmetry) -> torch.Tensor:
    """A voxel field (..., n_x, n_y, n_z) of the cell -> that of the transformed cell."""
    perm, flips = g
    d = a.dim() - 3
    b = a.permute(*range(d), *(d + p for p in perm))
    dims = tuple(d + i for i in range(3) if flips[i])
    return (torch.flip(b, dims) if dims else b).contiguous()


def pull_back(u: torch.Tensor, g: Symmetry) -> torch.Tensor:
    """A field (6, 3, n_x, n_y, n_z) of the transformed cell (nodes, Voigt cases) -> the
    field of the original cell: u_k(x) = s_k R^T u'_pi(k)(R x)."""
    perm, flips = g
    v = u
    for i in range(3):
        if flips[i]:                                   # node j -> -j mod n
            v = torch.roll(torch.flip(v, (2 + i,)), 1, 2 + i)
    inv = np.argsort(perm)
    v = v.permute(0, 1, *(2 + int(k) for k in inv))
    R = torch.as_tensor(rotation(g), dtype=u.dtype, device=u.device)
    v = torch.einsum("ji,kj...->ki...", R, v)         # components: R^T u'
    cm = case_map(g)
    return torch.stack([s * v[m] for m, s in cm])


def transform_operator(op, g: Symmetry):
    """The serial ElasticityOperator of the transformed cell (same dtype and device)."""
    from solver.operator import ElasticityOperator
    perm, _ = g
    return ElasticityOperator(transform_voxels(op.lam, g), transform_voxels(op.mu, g),
                              tuple(op.h[p] for p in perm))


@torch.no_grad()
def symmetrized_start(net, op, k: int, batch: int = 8) -> torch.Tensor:
    """The network's start (6, 3, ...) before its embedded PCG, averaged over the first
    k grid symmetries of op's cell (k = 1: the plain prediction). op must be serial.
    The transformed cells go through the network ``batch`` at a time, one batched
    forward each (the same numbers as one at a time, to rounding)."""
    gs = grid_symmetries(op.lam.shape, op.h)
    if not 1 <= k <= len(gs):
        raise ValueError(f"symmetries: {k} not in 1..{len(gs)} (the grid's point symmetries)")
    total = None
    with embedded_steps(net, 0):
        for lo in range(0, k, batch):                  # one batched forward per `batch` transforms
            part = gs[lo:min(k, lo + batch)]
            out = net([op if g == IDENTITY else transform_operator(op, g) for g in part]).u_net.detach()
            for g, u in zip(part, out.to(op.dtype)):
                u = u if g == IDENTITY else pull_back(u, g)
                total = u if total is None else total + u
    u0 = total / k
    return mean_free(op, u0) if net.cfg.mean_constraint else u0


def symmetrized_output(net, op, k: int) -> torch.Tensor:
    """``symmetrized_start`` followed by the network's own embedded PCG steps on op: what
    ``net([op]).u[0]`` is for k = 1."""
    u0 = symmetrized_start(net, op, k)
    if not (net.cfg.use_pcg and net.cfg.t > 0):
        return u0
    with torch.no_grad():
        return embedded_pcg(op, op.rhs(), u0, net.cfg.t, project=net.cfg.mean_constraint)
