"""Geometric multigrid preconditioner for the periodic voxel elasticity operator.

    M = build_multigrid(op)            # setup: hierarchy, smoothers, coarse solve
    x, info = pcg(op, f, precond=M)    # M(r) -> z, one symmetric cycle per call
    print(M)                           # levels, grids, unknowns, memory, smoother

Hierarchy (Homo3D-style element-by-element Galerkin multigrid):

* level 0 is the matrix-free fine operator ``op`` (per-voxel lambda, mu);
* level l+1 halves every axis that is long enough (``solver.transfer``: nested for any
  size, odd axes get one short coarse cell), with trilinear periodic prolongation P,
  restriction R = P^T, and the Galerkin operator K_{l+1} = R K_l P stored element by
  element: one full 24 x 24 matrix per coarse voxel, K_E = sum_c P_c^T k_c P_c
  (``ElementMatrixOperator``). This is exact, keeps the element structure (and so the
  same ghost / accumulate pattern as the fine operator), and is robust to the 1e-6
  stiffness contrast of void because nothing is rediscretised;
* the coarsest level (at most ``max_coarse`` nodes) is solved exactly with the dense
  pseudo-inverse on the mean-free subspace, z = Q (K + s T T^T / N)^-1 Q r with T the
  three translations and Q the mean-free projector (docs/DESIGN.md s.2: no pinned node).

The cycle (a V-cycle, or by default a W-cycle below the finest level: two coarse
corrections on levels 1 and below, which keeps the iterations flat in n at the price of
coarse work only) uses the same Chebyshev/Jacobi smoother (a polynomial in D^-1 K) before
and after the coarse correction(s), so M is symmetric, and positive definite on the
mean-free subspace; PCG keeps CG's guarantees. All tensors stay on ``op.device`` in
the storage dtype; the coarsest solve runs in float64.

Distribution: every level has its own Domain, made by ``coarsen_domain``. Numerics use
only Domain.ghost / accumulate / sum; the coarsest level is gathered with Domain.sum
(every rank solves the small dense system redundantly). An MPI domain must provide
``coarsen(shape) -> Domain`` whose owned blocks are the fine blocks halved: each rank's
``local_start`` even per coarsened axis (see solver.transfer).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional

import numpy as np
import torch
from .ieee import conv3d

from .domain import SerialDomain
from .element import CORNERS
from .operator import ElasticityOperator, default_chunk
from .smoothers import SMOOTHERS
from .transfer import coarse_shape, galerkin_blocks, prolong, restrict

log = logging.getLogger(__name__)

#: A coarse inverse rounded to the solve's float32 is kept only while ||A A^-1 x - x|| / ||x||
#: stays below this on test vectors; beyond it the float64 one is kept (DenseCoarseSolver).
#: Measured: 1.4e-6 - 1.2e-2 on TPMS sheets, lattices, shells and inclusions at 8^3 - 64^3
#: (all converge in float32 as before); 9.0e-2 on an 8^3 stack of one-voxel void and solid
#: layers, where PCG stalled (400 iterations, C^H 4% off) until the inverse stayed float64.
ROUNDED_INVERSE_LIMIT = 0.03

#: Where the rank blocks stop halving (more ranks along an axis than 2-cell units), the
#: hierarchy ends at that level if a dense coarse solve of it is affordable: at most this
#: many nodes. The set-up holds about six 3N x 3N float64 matrices on every rank (K, the
#: shifted A, its Cholesky factor, the inverse and copies): 1.77 GB and 8 s on one
#: thread were measured at 2048 nodes, so 1024 nodes costs ~0.45 GB and ~1 s per rank.
DENSE_FALLBACK_NODES = 1024


def coarsen_domain(domain, shape):
    """The Domain of the coarse grid ``shape``: a SerialDomain for a serial one,
    otherwise ``domain.coarsen(shape)`` (which MPI domains must provide)."""
    if isinstance(domain, SerialDomain):
        return SerialDomain(shape)
    if not hasattr(domain, "coarsen"):
        raise TypeError(f"{type(domain).__name__} has no coarsen(shape): multigrid needs it "
                        "to build the coarse-level domains")
    return domain.coarsen(tuple(int(s) for s in shape))


# -- coarse-level operators ----------------------------------------------------------
def _packing():
    """(iu (2, 300), unpack (576,), diag (24,)): the upper triangle of a 24 x 24
    matrix in row order, the packed position of every (a, b) entry (the (min, max)
    one), and the positions of the diagonal."""
    iu = torch.triu_indices(24, 24)
    pos = torch.empty(24, 24, dtype=torch.long)
    pos[iu[0], iu[1]] = torch.arange(iu.shape[1])
    pos[iu[1], iu[0]] = torch.arange(iu.shape[1])
    return iu, pos.reshape(-1), pos.diagonal().clone()


class ElementMatrixOperator:
    """K u = sum_E scatter(K_E u_E) with a 24 x 24 matrix K_E per voxel.

    ``ke`` has shape (l_x, l_y, l_z, 24, 24) on the owned voxels of ``domain``, element
    dof 3 a + c with a in solver.element.CORNERS order (the fine operator's layout);
    its upper triangle is kept (the matrix used is exactly symmetric).

    Storage. A matrix that at least ``min_shared`` voxels have bit for bit -- a coarse
    voxel whose fine descendants are all solid, or all void, has the same Galerkin
    matrix as every other such voxel (for the same material), and most voxels of a
    porous cell are of this kind: 78% of level 2 of the 128^3 gyroid sheet -- is stored
    once, as one of at most ``max_shared`` shared matrices, and its voxels keep only
    its number (``code``); their product is one GEMM for all of them. The other
    ("mixed") voxels keep their matrix, in x-major order (a slab's are contiguous),
    for a batched product. The operator is the same matrix either way: only equal
    matrices are shared. Level 2 of the 128^3 gyroid sheet: 38 MB packed (an earlier
    layout) -> 17 MB, its one-case apply 17 -> ~8 ms.

    Same interface as ElasticityOperator for what multigrid and PCG use: apply,
    diagonal, dot, gram, project_mean_free, domain, dtype, device.

    Subclasses that make K_E on the fly override ``_boxes``, ``_element_apply``,
    ``_element_diagonal`` and ``element_matrices_box``."""

    def __init__(self, ke: torch.Tensor, domain, chunk: Optional[int] = None,
                 min_shared: int = 64, max_shared: int = 8):
        iu, unpack, diag = _packing()
        dev = ke.device
        shape = tuple(ke.shape[:3])
        kp = ke[..., iu[0].to(dev), iu[1].to(dev)].reshape(-1, iu.shape[1])   # (V, 300)
        V = kp.shape[0]
        code = torch.full((V,), -1, dtype=torch.int16, device=dev)
        shared = []
        if V >= min_shared:
            uniq, inv, cnt = torch.unique(kp, dim=0, return_inverse=True, return_counts=True)
            for g in cnt.argsort(descending=True)[:max_shared].tolist():
                if int(cnt[g]) < min_shared:
                    break
                code[inv == g] = len(shared)
                shared.append(uniq[g])
        mixed = code < 0
        self._unpack, self._diag_pos = unpack.to(dev), diag.to(dev)
        self.km = kp[mixed].index_select(1, self._unpack).view(-1, 24, 24)     # (mixed, 24, 24)
        row = torch.full((V,), -1, dtype=torch.int32, device=dev)
        row[mixed] = torch.arange(int(mixed.sum()), dtype=torch.int32, device=dev)
        self.code, self.row = code.view(shape), row.view(shape)
        # the first mixed row of every x plane (x-major order), and the total
        per_plane = mixed.view(shape).flatten(1).sum(1)
        self._plane_row = torch.cat([per_plane.new_zeros(1), per_plane.cumsum(0)]).tolist()
        self.shared = (torch.stack(shared).index_select(1, self._unpack).view(-1, 24, 24)
                       if shared else torch.zeros(0, 24, 24, dtype=ke.dtype, device=dev))
        self.domain = domain
        self.dtype, self.device = ke.dtype, dev
        self.chunk = int(chunk) if chunk is not None else default_chunk(self.device, coarse=True)
        self._diag = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.km, self.shared, self.code, self.row))

    def _boxes(self):
        """Boxes of owned voxels (slice triples) and a tag for ``_element_apply``."""
        return [(tuple(slice(0, n) for n in self.domain.local_shape), None)]

    def _element_apply(self, box, tag, ue: torch.Tensor) -> torch.Tensor:
        """(K_E u_E)^T for the voxels of ``box`` (flattened x-major): ue (B, V, 24) -> (V, B, 24).

        Row-vector form u^T K (K_E symmetric): the long dimension stays contiguous,
        ~3x faster on CPU than K_E (24 x B). The first shared matrix is applied to every
        voxel (one GEMM), then the voxels of the other shared matrices and the mixed
        ones are redone, the mixed ones by a batched product (``box`` spans whole
        y-z planes, so their matrices are one contiguous run)."""
        B, V = ue.shape[:2]
        out = torch.empty(V, B, 24, dtype=ue.dtype, device=ue.device)
        code = self.code[box].reshape(-1)
        if self.shared.shape[0]:
            out.copy_(torch.matmul(ue, self.shared[0]).transpose(0, 1))
            for g in range(1, self.shared.shape[0]):
                idx = (code == g).nonzero().squeeze(1)
                if idx.numel():
                    out.index_copy_(0, idx, torch.matmul(ue.index_select(1, idx), self.shared[g]).transpose(0, 1))
            im = (code < 0).nonzero().squeeze(1)
        else:
            im = None
        n = V if im is None else im.numel()
        if n == 0:
            return out
        r0 = self._plane_row[box[0].start]
        km = self.km[r0:r0 + n]
        if im is None:
            torch.bmm(ue.transpose(0, 1), km, out=out)
        else:
            out.index_copy_(0, im, torch.bmm(ue.index_select(1, im).transpose(0, 1), km))
        return out

    def element_matrices_box(self, box) -> torch.Tensor:
        """K_E on a box of owned voxels (slices, steps allowed): (..., 24, 24)."""
        code, row = self.code[box], self.row[box]
        out = torch.empty(tuple(code.shape) + (24, 24), dtype=self.dtype, device=self.device)
        m = code >= 0
        if bool(m.any()):
            out[m] = self.shared.index_select(0, code[m].long())
        if bool((~m).any()):
            out[~m] = self.km.index_select(0, row[~m].long())
        return out

    def _element_diagonal(self, box, tag) -> torch.Tensor:
        """diag(K_E) on ``box``: (n_x, n_y, n_z, 24)."""
        code, row = self.code[box], self.row[box]
        out = torch.empty(tuple(code.shape) + (24,), dtype=self.dtype, device=self.device)
        m = code >= 0
        out[m] = torch.diagonal(self.shared, dim1=-2, dim2=-1).index_select(0, code[m].long())
        out[~m] = torch.diagonal(self.km, dim1=-2, dim2=-1).index_select(0, row[~m].long())
        return out

    def _gather_weight(self) -> torch.Tensor:
        """One-hot Conv3d weight (24, 3, 2, 2, 2): output channel 3 a + c is component
        c at corner a (CORNERS order), so a convolution gathers every u_E at once."""
        if getattr(self, "_gw", None) is None:
            E = torch.zeros(24, 3, 2, 2, 2, dtype=self.dtype, device=self.device)
            for a, (ax, ay, az) in enumerate(CORNERS):
                for c in range(3):
                    E[3 * a + c, c, ax, ay, az] = 1.0
            self._gw = E.contiguous(memory_format=torch.channels_last_3d)
        return self._gw

    # -- the fused C apply (solver/native.py) ----------------------------------
    def _native_args(self) -> Optional[dict]:
        """The per-voxel data of the fused C apply, or None where it cannot serve."""
        if getattr(self, "_nat", None) is None:
            # Galerkin matrices annihilate translations (the kernel then subtracts a node
            # value from u_E); a general K_E need not
            t = torch.zeros(24, 3, dtype=self.dtype, device=self.device)
            for c in range(3):
                t[c::3, c] = 1.0
            tol = 64 * torch.finfo(self.dtype).eps
            free = all(bool((m @ t).abs().max() <= tol * m.abs().max()) for m in (self.shared, self.km)
                       if m.shape[0])
            self._nat = dict(code=self.code, row=self.row, shared=self.shared, km=self.km, center=free)
        return self._nat

    def _native_ok(self, u: torch.Tensor) -> bool:
        if self.device.type != "cpu" or self.dtype not in (torch.float32, torch.float64):
            return False
        if torch.is_grad_enabled() and u.requires_grad:
            return False
        if getattr(self, "native", None) is None:
            from . import native
            self.native = native.available() and self._native_args() is not None
        return self.native

    def _apply_native(self, u: torch.Tensor) -> torch.Tensor:
        """K u by the fused C kernel: scatter form on u with one high ghost layer, then
        Domain.accumulate folds the high layer of the result back."""
        from . import native
        cl = torch.channels_last_3d
        ug = self.domain.ghost(u, hi=1)
        yg = torch.empty(ug.shape, dtype=u.dtype, device=u.device, memory_format=cl)
        native.hex8_coarse_apply(ug, yg, **self._native_args())
        return self.domain.accumulate(yg, hi=1)

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        if self._native_ok(u):
            return self._apply_native(u)
        B = u.shape[0]
        ug = self.domain.ghost(u, hi=1).contiguous(memory_format=torch.channels_last_3d)
        gw = self._gather_weight()
        lx, ly, lz = self.domain.local_shape
        # nodal sums gather in a node-major (x, y, z, B, 3) buffer: each corner's
        # element vectors (V, B, 3) add in as contiguous rows
        yg = torch.zeros(lx + 1, ly + 1, lz + 1, B, 3, dtype=u.dtype, device=u.device)
        for (bx, by, bz), tag in self._boxes():
            ny, nz = by.stop - by.start, bz.stop - bz.start
            per_x = max(1, self.chunk // max(1, ny * nz * B))
            for x0 in range(bx.start, bx.stop, per_x):
                x1 = min(bx.stop, x0 + per_x)
                nx = x1 - x0
                # u_E of every voxel, dof 3 a + c: the one-hot convolution writes them
                # channels-last, i.e. (B, V, 24) in memory (3x faster than a strided copy)
                win = ug[:, :, x0:x1 + 1, by.start:by.stop + 1, bz.start:bz.stop + 1]
                ue = _gather_element_dofs(win, gw)
                fe = self._element_apply((slice(x0, x1), by, bz), tag, ue).view(nx, ny, nz, B, 24)
                for a, (ax, ay, az) in enumerate(CORNERS):
                    yg[x0 + ax:x1 + ax, by.start + ay:by.stop + ay, bz.start + az:bz.stop + az] += \
                        fe[..., 3 * a:3 * a + 3]
        return self.domain.accumulate(yg.permute(3, 4, 0, 1, 2), hi=1)

    __call__ = apply

    def residual_(self, b: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """b <- b - K u in place; returns b (the smoothers' interface)."""
        return b.sub_(self.apply(u))

    def diagonal(self, cache: bool = True) -> torch.Tensor:
        """diag(K) as a nodal field (1, 3, l_x, l_y, l_z), kept unless ``cache`` is False."""
        if self._diag is None:
            lx, ly, lz = self.domain.local_shape
            yg = torch.zeros(1, 3, lx + 1, ly + 1, lz + 1, dtype=self.dtype, device=self.device)
            for (bx, by, bz), tag in self._boxes():
                d = self._element_diagonal((bx, by, bz), tag)                     # (nx, ny, nz, 24)
                for a, (ax, ay, az) in enumerate(CORNERS):
                    yg[0, :, bx.start + ax:bx.stop + ax, by.start + ay:by.stop + ay, bz.start + az:bz.stop + az] += \
                        d[..., 3 * a:3 * a + 3].permute(3, 0, 1, 2)
            d = self.domain.accumulate(yg, hi=1)
            if not cache:
                return d
            self._diag = d
        return self._diag

    dot = ElasticityOperator.dot
    _local_dot = ElasticityOperator._local_dot
    gram = ElasticityOperator.gram
    project_mean_free = ElasticityOperator.project_mean_free


def _gather_element_dofs(win: torch.Tensor, gw: torch.Tensor) -> torch.Tensor:
    """u_E of every voxel of the window (B, 3, n_x + 1, n_y + 1, n_z + 1) by the one-hot
    convolution ``gw``: (B, V, 24), voxels x-major.

    One load case on CPU runs as a batch of the window's two x-halves (equal length,
    overlapping by a plane when n_x is odd): PyTorch's CPU Conv3d takes its slow
    im2col path for a batch of one (~5x slower here). The halves' voxels, in order,
    are the window's x-major order."""
    B, nx = win.shape[0], win.shape[2] - 1
    if B == 1 and nx >= 2 and win.device.type == "cpu":
        L = (nx + 1) // 2
        inp = torch.cat([win[:, :, :L + 1], win[:, :, nx - L:]]).contiguous(memory_format=torch.channels_last_3d)
        o = conv3d(inp, gw).permute(0, 2, 3, 4, 1)                 # (2, L, n_y, n_z, 24)
        o = o.contiguous() if 2 * L == nx else torch.cat([o[0], o[1, 1:]])
        return o.reshape(1, -1, 24)
    # (.contiguous(): with one load case the output may be channels-first)
    return conv3d(win, gw).permute(0, 2, 3, 4, 1).contiguous().reshape(B, -1, 24)


class GalerkinCoefficientOperator(ElementMatrixOperator):
    """The first coarse level R K P without stored element matrices.

    With k_c = lambda_c K_lambda + mu_c K_mu on the fine voxels, the Galerkin element
    matrix of a coarse voxel E is linear in its children's Lame parameters:

        K_E = sum_c lambda_c (P_c^T K_lambda P_c) + mu_c (P_c^T K_mu P_c)
            = sum_j w_{E,j} B_{k(E),j},       j < 16 (8 children x 2),

    with the 16 fixed 24 x 24 matrices B_k of the voxel's kind k (full / single cell
    per axis: at most 8 kinds, each a box of voxels). With one Poisson ratio everywhere
    (the fine operator's ``lame_ratio`` r) the pairs merge: w = mu_c, B = P_c^T (K_mu +
    r K_lambda) P_c, j < 8. Storing w (16 or 8 numbers per coarse voxel) instead of
    K_E (576) cuts the level's memory 36x (72x); K_E is rebuilt in blocks
    of ``sub`` voxels (one small GEMM, in cache) just before the batched matvec, which
    on CPU costs about the same as streaming stored matrices (BENCHMARKS.md). Voxels
    whose children all share (lambda, mu) (``uniform``: all solid or all void, most of
    a porous cell) need no rebuild: K_E = mu sum_j B_j (+ lambda sum of the lambda
    bases), one GEMM for all of them (with one load case 2.2x faster at 128^3)."""

    def __init__(self, coef: torch.Tensor, boxes, bases: torch.Tensor, domain,
                 chunk: Optional[int] = None, sub: int = 512):
        self.coef = coef                  # (l_x, l_y, l_z, nw), nw = 16 or 8
        self.boxes = list(boxes)          # [(box slices, kind index)]
        self.bases = bases                # (kinds, nw, 576)
        self.nw = int(coef.shape[-1])
        self.domain = domain
        self.dtype, self.device = coef.dtype, coef.device
        self.chunk = int(chunk) if chunk is not None else default_chunk(self.device, coarse=True)
        self.sub = int(sub)
        self._diag = None
        self._diag_bases = torch.diagonal(bases.reshape(-1, self.nw, 24, 24), dim1=-2, dim2=-1)  # (kinds, nw, 24)
        kind = torch.zeros(tuple(domain.local_shape), dtype=torch.uint8, device=coef.device)
        for box, k in self.boxes:
            kind[box] = k
        self.kind = kind
        # coarse voxels whose children all have the same (lambda, mu) -- all solid or
        # all void, most of a porous cell -- have K_E = mu (sum_j B_j) (one Poisson
        # ratio) or lambda A + mu M: their product needs no rebuilt matrix
        per = 2 if self.nw == 16 else 1
        wv = coef.reshape(*coef.shape[:-1], 8, per)
        self.uniform = (wv == wv[..., :1, :]).all(dim=-1).all(dim=-1)
        self._sums = bases.reshape(bases.shape[0], 8, per, 24, 24).sum(dim=1)        # (kinds, per, 24, 24)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.coef, self.bases, self.kind, self.uniform))

    def _native_args(self) -> Optional[dict]:
        if self.nw != 8:          # two Poisson ratios: the lambda and mu bases (not in the kernel)
            return None
        if getattr(self, "_nat", None) is None:
            self._nat = dict(coef=self.coef.contiguous(), kind=self.kind.contiguous(),
                             bases=self.bases.reshape(-1, 8, 24, 24).contiguous(),
                             sums=self._sums[:, 0].contiguous(), center=True)   # P^T K0 P: translation-free
        return self._nat

    def _boxes(self):
        return self.boxes

    def _element_apply(self, box, k, ue):
        w = self.coef[box].reshape(-1, self.nw)
        uni = self.uniform[box].reshape(-1)
        B, V = ue.shape[:2]
        out = torch.empty(V, B, 24, dtype=ue.dtype, device=ue.device)
        n_uni = int(uni.sum())
        if n_uni == 0:
            return self._rebuilt_apply(w, k, ue, out)
        # the cheap product everywhere, then the mixed voxels redone
        self._uniform_apply(w, k, ue, out)
        if n_uni < V:
            im = (~uni).nonzero().squeeze(1)
            out.index_copy_(0, im, self._rebuilt_apply(w.index_select(0, im), k, ue.index_select(1, im)))
        return out

    def _rebuilt_apply(self, w, k, ue, out=None):
        """K_E rebuilt from the weights, ``sub`` voxels at a time (in cache), then the
        batched product."""
        basis = self.bases[k]
        B, V = ue.shape[:2]
        out = torch.empty(V, B, 24, dtype=ue.dtype, device=ue.device) if out is None else out
        for s in range(0, V, self.sub):
            ke = (w[s:s + self.sub] @ basis).view(-1, 24, 24)
            torch.bmm(ue[:, s:s + self.sub].transpose(0, 1), ke.transpose(1, 2), out=out[s:s + self.sub])
        return out

    def _uniform_apply(self, w, k, ue, out):
        """Into ``out``, as if every voxel had uniform children: (u^T M) mu (+ (u^T A)
        lambda), one GEMM each (the summed bases are symmetric)."""
        sums = self._sums[k]
        y = None
        for q in range(sums.shape[0]):                        # q = last: mu
            t = torch.matmul(ue, sums[q]).mul_(w[:, q].reshape(1, -1, 1))
            y = t if y is None else y.add_(t)
        return out.copy_(y.transpose(0, 1))

    def _element_diagonal(self, box, k):
        return self.coef[box] @ self._diag_bases[k]

    def element_matrices_box(self, box) -> torch.Tensor:
        w, kind = self.coef[box], self.kind[box]
        out = torch.zeros(tuple(w.shape[:-1]) + (24, 24), dtype=self.dtype, device=self.device)
        for k in range(self.bases.shape[0]):
            m = kind == k
            if bool(m.any()):
                out[m] = (w[m] @ self.bases[k]).view(-1, 24, 24)
        return out


def element_matrices(op) -> torch.Tensor:
    """Per-voxel element matrices (l_x, l_y, l_z, 24, 24) of a level operator."""
    if isinstance(op, ElementMatrixOperator):
        return op.element_matrices_box(tuple(slice(0, n) for n in op.domain.local_shape))
    K_lam = torch.as_tensor(op._K_lam_np, dtype=op.dtype, device=op.device)
    K_mu = torch.as_tensor(op._K_mu_np, dtype=op.dtype, device=op.device)
    return op.lam[..., None, None] * K_lam + op.mu[..., None, None] * K_mu


def galerkin_element_matrices(op, ratios, cshape) -> torch.Tensor:
    """K_E = sum_c P_c^T k_c P_c for every owned coarse voxel (solver.transfer)."""
    ke = torch.zeros(tuple(cshape) + (24, 24), dtype=op.dtype, device=op.device)
    for cbox, fbox, Pc in galerkin_blocks(op.domain.local_shape, ratios):
        P = torch.as_tensor(Pc, dtype=op.dtype, device=op.device)
        if isinstance(op, ElasticityOperator):
            # P^T (lam K_lam + mu K_mu) P = lam (P^T K_lam P) + mu (P^T K_mu P)
            Pl = P.T @ torch.as_tensor(op._K_lam_np, dtype=op.dtype, device=op.device) @ P
            Pm = P.T @ torch.as_tensor(op._K_mu_np, dtype=op.dtype, device=op.device) @ P
            kv = ke[cbox]                                   # a view: accumulate in place
            kv.addcmul_(op.lam[fbox][..., None, None], Pl)
            kv.addcmul_(op.mu[fbox][..., None, None], Pm)
        else:
            ke[cbox] += P.T @ op.element_matrices_box(fbox) @ P
    return ke


def galerkin_coefficient_operator(op, ratios, cdom, chunk: Optional[int] = None) -> GalerkinCoefficientOperator:
    """R K P of the matrix-free fine operator in coefficient form (w, B_k per kind)."""
    K_lam = torch.as_tensor(op._K_lam_np, dtype=torch.float64, device=op.device)
    K_mu = torch.as_tensor(op._K_mu_np, dtype=torch.float64, device=op.device)
    r = op.lame_ratio
    per = 2 if r is None else 1                       # weights per child
    coef = torch.zeros(tuple(cdom.local_shape) + (8 * per,), dtype=op.dtype, device=op.device)
    kinds, bases, count = {}, [], {}
    for cbox, fbox, Pc in galerkin_blocks(op.domain.local_shape, ratios):
        key = tuple((s.start, s.stop) for s in cbox)
        if key not in kinds:
            kinds[key] = len(bases)
            bases.append(torch.zeros(8 * per, 576, dtype=torch.float64, device=op.device))
            count[key] = 0
        k, j = kinds[key], count[key]
        count[key] += 1
        P = torch.as_tensor(Pc, dtype=torch.float64, device=op.device)
        if r is not None:
            bases[k][j] = (P.T @ (K_mu + r * K_lam) @ P).reshape(-1)
            coef[cbox + (j,)] = op.mu[fbox]
            continue
        bases[k][2 * j] = (P.T @ K_lam @ P).reshape(-1)
        bases[k][2 * j + 1] = (P.T @ K_mu @ P).reshape(-1)
        coef[cbox + (2 * j,)] = op.lam[fbox]
        coef[cbox + (2 * j + 1,)] = op.mu[fbox]
    boxes = [(tuple(slice(a, b) for a, b in key), k) for key, k in kinds.items()]
    return GalerkinCoefficientOperator(coef, boxes, torch.stack(bases).to(op.dtype), cdom, chunk=chunk)


# -- coarsest-level solve ------------------------------------------------------------
class DenseCoarseSolver:
    """z = Q (K + s T T^T / N)^-1 Q r, K the assembled (3N x 3N) coarsest matrix,
    T the three translations (N nodes), s = mean diag(K), Q the mean-free projector.
    Since K T = 0, the translations are eigenvectors of the shifted matrix and
    Q A^-1 Q is the Moore-Penrose pseudo-inverse of K: symmetric, exact. The global
    vector is gathered with Domain.sum, so every rank solves redundantly (built in
    float64, applied in the level's precision)."""

    name = "dense pseudo-inverse"

    def __init__(self, op):
        self.domain = op.domain
        self.out_dtype, self.device = op.dtype, op.device
        gshape = self.domain.global_shape
        N = int(np.prod(gshape))
        self.N = N
        ke = element_matrices(op).to(torch.float64)
        dofs = self._element_dofs()                                               # (V, 24)
        K = torch.zeros(3 * N, 3 * N, dtype=torch.float64, device=self.device)
        rows = dofs[:, :, None].expand(-1, 24, 24).reshape(-1)
        cols = dofs[:, None, :].expand(-1, 24, 24).reshape(-1)
        K.index_put_((rows, cols), ke.reshape(-1), accumulate=True)
        K = self.domain.sum(K)
        K = 0.5 * (K + K.T)
        s = float(torch.diagonal(K).mean())
        T = torch.zeros(3 * N, 3, dtype=torch.float64, device=self.device)
        T[torch.arange(3 * N, device=self.device), torch.arange(3 * N, device=self.device) % 3] = 1.0
        A = K + (s / N) * (T @ T.T)
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            Ainv = torch.cholesky_inverse(L)
        else:
            # rounding (float32 levels, extreme contrast) made A slightly indefinite:
            # pseudo-inverse by eigendecomposition, dropping eigenvalues below eps * max
            lam, V = torch.linalg.eigh(A)
            keep = lam > 1e-13 * float(lam.max())
            log.warning("coarse matrix not positive definite: eigh pseudo-inverse, %d modes dropped",
                        int((~keep).sum()))
            Ainv = (V[:, keep] / lam[keep]) @ V[:, keep].T
        # built in float64, kept in the level's precision: in float32 solves half the
        # memory (18.5 -> 9.3 MB for the 8^3 coarsest level of 128^3), and the same
        # iterations on the 64^3 gyroid and octet cells (session 8). Unless rounding
        # spoils it: at a high enough condition number (a stack of one-voxel void and
        # solid layers whose only level is this one) the float32 inverse is no inverse
        # and PCG stalls; then it stays float64. The test: ||A (A^-1 x) - x|| / ||x||
        # for eight fixed mean-free random x (two products; the full I - A A^-1 would
        # cost a 3N^3 product at every set-up).
        Ainv = 0.5 * (Ainv + Ainv.T)
        low = Ainv.to(op.dtype)
        self.rounding = 0.0
        if low.dtype != torch.float64:
            g = torch.Generator(device="cpu").manual_seed(0)
            x = torch.randn(3 * N, 8, generator=g, dtype=torch.float64).to(self.device)
            x = x - x.reshape(N, 3, 8).mean(0).repeat(N, 1)
            y = low @ x.to(low.dtype)
            res = A @ y.to(torch.float64) - x
            self.rounding = float((res.norm(dim=0) / x.norm(dim=0)).max())
            if self.rounding > ROUNDED_INVERSE_LIMIT:
                log.info("%s: the %s coarse inverse is off by %.2g (||A A^-1 x - x|| / ||x||): kept in float64",
                         self.name, str(op.dtype).replace("torch.", ""), self.rounding)
                low = Ainv
        self.Ainv = low

    @property
    def nbytes(self) -> int:
        return self.Ainv.numel() * self.Ainv.element_size()

    def _global_node_index(self):
        gx, gy, gz = self.domain.global_shape
        (lx, ly, lz), (sx, sy, sz) = self.domain.local_shape, self.domain.local_start
        d = self.device
        i = torch.arange(sx, sx + lx, device=d)[:, None, None]
        j = torch.arange(sy, sy + ly, device=d)[None, :, None]
        k = torch.arange(sz, sz + lz, device=d)[None, None, :]
        return i, j, k

    def _element_dofs(self):
        gx, gy, gz = self.domain.global_shape
        i, j, k = self._global_node_index()
        cols = []
        for ax, ay, az in CORNERS:
            node = (((i + int(ax)) % gx) * gy + (j + int(ay)) % gy) * gz + (k + int(az)) % gz
            node = node.reshape(-1)
            for c in range(3):
                cols.append(3 * node + c)
        return torch.stack(cols, dim=1)

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        B = r.shape[0]
        g = torch.zeros((B, 3) + tuple(self.domain.global_shape), dtype=torch.float64, device=self.device)
        g[(slice(None), slice(None)) + self.domain.local_slice] = r.to(torch.float64)
        g = self.domain.sum(g)
        v = g.permute(0, 2, 3, 4, 1).reshape(B, 3 * self.N).T.contiguous()    # (3N, B)
        v = v - v.reshape(self.N, 3, B).mean(0).repeat(self.N, 1)
        z = self.Ainv @ v.to(self.Ainv.dtype)
        z = z - z.reshape(self.N, 3, B).mean(0).repeat(self.N, 1)
        z = z.T.reshape((B,) + tuple(self.domain.global_shape) + (3,)).permute(0, 4, 1, 2, 3)
        return z[(slice(None), slice(None)) + self.domain.local_slice].to(self.out_dtype).contiguous()

    def __repr__(self):
        return f"{self.name} ({3 * self.N} x {3 * self.N}, {str(self.Ainv.dtype).replace('torch.', '')})"


# -- hierarchy ----------------------------------------------------------------------
@dataclasses.dataclass
class Level:
    """One grid of the hierarchy (PyAMG-style plain record). ``ratios`` are the
    coarsening factors from this level to the next (None on the coarsest)."""
    op: object
    domain: object
    smoother: object = None
    ratios: Optional[tuple] = None

    @property
    def shape(self):
        return tuple(self.domain.global_shape)

    @property
    def unknowns(self) -> int:
        return 3 * int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        """Bytes this rank stores for the level operator and its (inverse) diagonal."""
        op = self.op
        if isinstance(op, ElementMatrixOperator):
            n = op.nbytes
        else:
            n = op.lam.numel() * op.lam.element_size() * 2
        for d in (getattr(op, "_diag", None), getattr(self.smoother, "dinv", None)):
            if d is not None:
                n += d.numel() * d.element_size()
        return n


class MultigridPreconditioner:
    """Symmetric (nu, nu) cycle z = M r for a block r (B, 3, l_x, l_y, l_z): a V-cycle,
    or (``options['cycle'] == 'w'``) a W-cycle below the finest level: level 0 makes
    one coarse correction, levels 1 .. L-3 two (smooth, correct, correct, smooth).
    Either is symmetric, because each level's smoothing before and after is the same
    and its coarse corrections are symmetric.

    ``levels[0].op`` is the fine operator; ``coarse_solver`` acts on the last level."""

    def __init__(self, levels, coarse_solver, setup_time: float = 0.0, options: dict = None):
        self.levels = levels
        self.coarse_solver = coarse_solver
        self.setup_time = setup_time
        self.options = dict(options or {})

    def __call__(self, r: torch.Tensor) -> torch.Tensor:
        return self._cycle(0, r)

    def _cycle(self, l: int, b: torch.Tensor) -> torch.Tensor:
        if l == len(self.levels) - 1:
            return self.coarse_solver(b)
        lev, nxt = self.levels[l], self.levels[l + 1]
        x = lev.smoother(b)
        for _ in range(self._corrections(l)):
            r = lev.op.apply(x)
            torch.sub(b, r, out=r)                       # r = b - K x in K x's storage
            bc = restrict(r, nxt.domain, lev.ratios)
            del r
            xc = self._cycle(l + 1, bc)
            del bc
            x.add_(prolong(xc, nxt.domain, lev.domain.local_shape, lev.ratios))
            del xc
        return lev.smoother(b, x)

    def _corrections(self, l: int) -> int:
        """Coarse corrections made on level l: two on levels 1 .. L-3 of a 'w' cycle
        (not on the finest, where a second one costs a fine apply, nor above the exact
        coarsest solve, where it changes nothing), else one."""
        w = self.options.get("cycle", "v") == "w"
        return 2 if (w and 1 <= l and l + 2 < len(self.levels)) else 1

    @property
    def cycle_name(self) -> str:
        return "W-cycle below level 0" if self.options.get("cycle") == "w" else "V-cycle"

    def summary(self) -> str:
        """One line for result files: levels, cycle, smoother."""
        o = self.options
        sm = o.get("smoother")
        sm += f" degree {o['degree']}" if "degree" in o else f" {o.get('steps')} steps"
        cyc = self.cycle_name
        grids = " .. ".join("x".join(str(n) for n in lv.shape) for lv in (self.levels[0], self.levels[-1]))
        return f"{len(self.levels)} levels ({grids}), {cyc}, {sm}, dense coarsest solve"

    # PyAMG-style complexities
    def operator_complexity(self) -> float:
        """Stored operator bytes over all levels / bytes of the fine operator."""
        return sum(lv.nbytes for lv in self.levels) / max(1, self.levels[0].nbytes)

    def grid_complexity(self) -> float:
        return sum(lv.unknowns for lv in self.levels) / self.levels[0].unknowns

    def memory_bytes(self) -> int:
        return sum(lv.nbytes for lv in self.levels) + self.coarse_solver.nbytes

    def __repr__(self):
        op = self.levels[0].op
        lines = [f"MultigridPreconditioner: {len(self.levels)} levels, symmetric {self.cycle_name}, "
                 f"{op.dtype} on {op.device}, setup {self.setup_time:.3f} s",
                 f"  {'level':>5} {'grid':>16} {'unknowns':>12} {'memory MB':>10}  operator / smoother"]
        for i, lv in enumerate(self.levels):
            kind = ("matrix-free lambda, mu" if isinstance(lv.op, ElasticityOperator) else
                    f"{lv.op.nw} Lame weights per voxel" if isinstance(lv.op, GalerkinCoefficientOperator) else
                    f"24x24: {lv.op.shared.shape[0]} shared, {lv.op.km.shape[0]} own "
                    f"({100.0 * lv.op.km.shape[0] / max(1, lv.op.code.numel()):.0f}% of voxels)")
            sm = repr(lv.smoother) if lv.smoother is not None else "coarse: " + repr(self.coarse_solver)
            grid = "x".join(str(n) for n in lv.shape)
            mem = lv.nbytes + (self.coarse_solver.nbytes if i == len(self.levels) - 1 else 0)
            lines.append(f"  {i:>5} {grid:>16} {lv.unknowns:>12} {mem / 2**20:>10.2f}  {kind}; {sm}")
        lines.append(f"  smoother: {self.options.get('smoother')}  coarse solver: {self.coarse_solver!r}")
        lines.append(f"  operator complexity {self.operator_complexity():.3f}, grid complexity "
                     f"{self.grid_complexity():.3f}, total memory {self.memory_bytes() / 2**20:.1f} MB")
        return "\n".join(lines)


def _ratios(shape, min_axis: int):
    return tuple(2 if n >= min_axis else 1 for n in shape)


def build_multigrid(op, smoother: str = "chebyshev", degree: int = 2, ratio: float = 10.0,
                    steps: int = 2, max_coarse: int = 512, max_levels: int = 12,
                    min_axis: int = 4, lanczos_steps: int = 12, safety: float = 1.1,
                    chunk: Optional[int] = None, level1: str = "coefficients",
                    cycle: str = "w") -> MultigridPreconditioner:
    """Set up the multigrid hierarchy for ``op`` (an ElasticityOperator).

    Coarsen every axis with at least ``min_axis`` cells by 2 (odd axes included) while
    the grid has more than ``max_coarse`` nodes and fewer than ``max_levels`` levels;
    solve the coarsest exactly (``DenseCoarseSolver``). ``smoother`` is a key of
    solver.smoothers.SMOOTHERS: 'chebyshev' (``degree``, eigenvalue ``ratio``) or
    'jacobi' (``steps``); ``safety`` multiplies the Lanczos estimate of lambda_max(D^-1 K).
    ``level1``: 'coefficients' keeps the first coarse level as 16 Lame weights per voxel,
    8 with one Poisson ratio (GalerkinCoefficientOperator, 36x / 72x less memory),
    'matrices' stores its 24 x 24 K_E.
    ``cycle``: 'w' (default) visits the coarse grid twice from every level but the
    finest (MultigridPreconditioner): the coarse levels cost 1/8 per level, and at
    128^3 it takes 10 instead of 12 iterations, ~15% less time (BENCHMARKS.md); 'v'.
    Returns the callable preconditioner r -> z (setup time in ``.setup_time``)."""
    t0 = time.perf_counter()
    if level1 not in ("coefficients", "matrices"):
        raise ValueError(f"level1 must be 'coefficients' or 'matrices', got {level1!r}")
    if cycle not in ("v", "w"):
        raise ValueError(f"cycle must be 'v' or 'w', got {cycle!r}")
    if smoother not in SMOOTHERS:
        raise ValueError(f"unknown smoother {smoother!r}; choose from {sorted(SMOOTHERS)}")
    sm_opts = {"chebyshev": dict(degree=degree, ratio=ratio),
               "jacobi": dict(steps=steps)}[smoother]
    sm_opts.update(safety=safety, lanczos_steps=lanczos_steps)
    levels = [Level(op=op, domain=op.domain)]
    while len(levels) < max_levels:
        lev = levels[-1]
        shape = lev.shape
        r = _ratios(shape, min_axis)
        if int(np.prod(shape)) <= max_coarse or r == (1, 1, 1):
            break
        cshape = coarse_shape(shape, r)
        try:
            cdom = coarsen_domain(lev.domain, cshape)
        except ValueError as e:       # CoarseningError: the blocks do not halve (more ranks than 2-cell units)
            if int(np.prod(shape)) > DENSE_FALLBACK_NODES:
                raise ValueError(f"multigrid: the {'x'.join(map(str, shape))} level does not coarsen on this "
                                 f"decomposition ({e}); use fewer ranks along the short axes, or "
                                 "--preconditioner jacobi") from None
            log.info("multigrid: coarsening stops at %s on this decomposition (%s)", shape, e)
            break
        if isinstance(lev.op, ElasticityOperator) and level1 == "coefficients":
            cop = galerkin_coefficient_operator(lev.op, r, cdom, chunk=chunk)
        else:
            cop = ElementMatrixOperator(galerkin_element_matrices(lev.op, r, cdom.local_shape), cdom, chunk=chunk)
        lev.ratios = r
        levels.append(Level(op=cop, domain=cdom))
    if int(np.prod(levels[-1].shape)) > 4 * max_coarse and int(np.prod(levels[-1].shape)) > 4096:
        log.warning("coarsest grid %s has %d nodes: the dense coarse solve will be slow",
                    levels[-1].shape, int(np.prod(levels[-1].shape)))
    for lev in levels[:-1]:
        lev.smoother = SMOOTHERS[smoother](lev.op, **sm_opts)
    coarse = DenseCoarseSolver(levels[-1].op)
    if op.device.type == "cuda":
        torch.cuda.synchronize(op.device)
    t = time.perf_counter() - t0
    M = MultigridPreconditioner(levels, coarse, setup_time=t,
                                options=dict(smoother=smoother, **sm_opts, max_coarse=max_coarse, cycle=cycle))
    log.info("multigrid setup %.3f s\n%r", t, M)
    return M
