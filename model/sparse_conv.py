"""Periodic sparse 3-D convolution in plain PyTorch (docs/DESIGN.md section 6).

Features live on the *active* voxels only: a ``SparseGrid`` holds their integer
coordinates (N, 3) on a periodic grid of shape (n_x, n_y, n_z), plus a batch index
(N,) so several cells share one grid object; a ``SparseTensor`` is features (N, C)
on such a grid.

A convolution is a sum over kernel offsets d of a gather - GEMM - scatter:

    y[o] = b + sum_d sum_{(i, o) in M_d} W_d^T x[i]                     (1)

where the neighbour map ("peri-mapping") M_d lists the pairs (input active index i,
output active index o) whose coordinates differ by d:

* submanifold convolution (kernel k odd, output set = input set):
  coord(i) = coord(o) + d  (mod n, periodic wrap; or dropped when outside the
  grid with ``periodic=False``: zero padding), d in {-k//2 .. k//2}^3;
* strided down-sampling (kernel 2, stride 2): coarse active set = coarse voxels
  with any active child, coord(i) = 2 coord(o) + d, d in {0, 1}^3;
* its transpose (up-sampling): the same pairs with input and output swapped,
  output set = the fine grid the coarse one came from.

The maps are built once per grid and cached (``SparseGrid.neighbour_map``,
``SparseGrid.coarsen``). (1) runs under a custom autograd Function that saves only
the input features, the weights and the maps; its backward recomputes the per-offset
gathers,

    dL/dx[i] += W_d dL/dy[o],   dL/dW_d = sum_{(i,o) in M_d} x[i] dL/dy[o]^T,

so saved memory stays proportional to the number of active voxels, not to
(offsets x active voxels). Weight layout: (n_offsets, C_in, C_out), offset index
in C order of the dense kernel index (k_x, k_y, k_z), so W_d = w_dense[:, :, k]^T for
Conv3d and W_d = w_dense[:, :, k] for ConvTranspose3d.

Everything follows the device of the tensors; the hot path has no host copies.
``index_add_`` on CUDA uses atomics, so CUDA results are reproducible only to
rounding; CPU results are bitwise reproducible.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.autograd.function import once_differentiable

log = logging.getLogger(__name__)


# -- neighbour maps -------------------------------------------------------------
@dataclasses.dataclass
class NeighbourMap:
    """Pairs (in_idx[p], out_idx[p]) grouped by kernel offset: offset d owns the
    ``counts[d]`` consecutive pairs starting at sum(counts[:d])."""

    in_idx: torch.Tensor      # (P,) long
    out_idx: torch.Tensor     # (P,) long
    counts: Tuple[int, ...]   # pairs per offset (python ints: no device sync in the hot path)
    n_in: int
    n_out: int

    @property
    def n_offsets(self) -> int:
        return len(self.counts)

    def transpose(self) -> "NeighbourMap":
        return NeighbourMap(self.out_idx, self.in_idx, self.counts, self.n_out, self.n_in)


def kernel_offsets(kernel: int) -> torch.Tensor:
    """Offsets d (K^3, 3) of an odd kernel in C order of the dense index k = d + K//2."""
    if kernel % 2 != 1:
        raise ValueError(f"submanifold kernels must be odd, got {kernel}")
    r = range(-(kernel // 2), kernel // 2 + 1)
    return torch.tensor(list(itertools.product(r, r, r)), dtype=torch.long)


class SparseGrid:
    """Active voxel coordinates on a periodic grid (one or several cells).

    Parameters
    ----------
    coords : (N, 3) integer tensor, 0 <= coords < shape.
    shape : (n_x, n_y, n_z).
    batch : (N,) integer tensor, the cell each active voxel belongs to (default 0).
    batch_size : number of cells (default max(batch) + 1).
    """

    def __init__(self, coords: torch.Tensor, shape: Sequence[int], batch: Optional[torch.Tensor] = None,
                 batch_size: Optional[int] = None):
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 3:
            raise ValueError(f"shape must have 3 entries, got {shape}")
        coords = torch.as_tensor(coords).long()
        if coords.dim() != 2 or coords.shape[1] != 3:
            raise ValueError(f"coords must be (N, 3), got {tuple(coords.shape)}")
        self.coords = coords
        self.device = coords.device
        self.batch = (torch.zeros(coords.shape[0], dtype=torch.long, device=self.device)
                      if batch is None else torch.as_tensor(batch, device=self.device).long())
        if batch_size is None:
            batch_size = int(self.batch.max()) + 1 if self.batch.numel() else 1
        self.batch_size = int(batch_size)
        self.keys = self._key(self.batch, coords)
        self._sorted_keys, self._order = torch.sort(self.keys)
        self._maps: Dict[tuple, NeighbourMap] = {}
        self._coarse: Optional[Tuple["SparseGrid", NeighbourMap]] = None

    # -- construction -----------------------------------------------------------
    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "SparseGrid":
        """Active set of a boolean mask (B, n_x, n_y, n_z) or (n_x, n_y, n_z)."""
        if mask.dim() == 3:
            mask = mask[None]
        nz = torch.nonzero(mask)
        return cls(nz[:, 1:], mask.shape[1:], batch=nz[:, 0], batch_size=mask.shape[0])

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    @property
    def n_active(self) -> int:
        return len(self)

    def __repr__(self) -> str:
        return f"SparseGrid(shape={self.shape}, batch={self.batch_size}, active={len(self)})"

    def _key(self, batch, coords):
        nx, ny, nz = self.shape
        return ((batch * nx + coords[:, 0]) * ny + coords[:, 1]) * nz + coords[:, 2]

    def lookup(self, coords: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """Active index of each (batch, coords) query, -1 where not active.
        Coordinates must already lie inside the grid."""
        q = self._key(batch, coords)
        if len(self) == 0:
            return torch.full_like(q, -1)
        pos = torch.searchsorted(self._sorted_keys, q).clamp_(max=len(self) - 1)
        found = self._sorted_keys[pos] == q
        return torch.where(found, self._order[pos], torch.full_like(q, -1))

    # -- dense <-> sparse -------------------------------------------------------
    def linear_index(self) -> torch.Tensor:
        """Index of each active voxel in a flattened (B, n_x, n_y, n_z) array."""
        return self.keys

    def to_dense(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C) -> dense (B, C, n_x, n_y, n_z), zero on inactive voxels (differentiable)."""
        C = features.shape[1]
        nvox = self.batch_size * math.prod(self.shape)
        out = features.new_zeros(nvox, C).index_add(0, self.keys, features)
        return out.reshape(self.batch_size, *self.shape, C).permute(0, 4, 1, 2, 3)

    def from_dense(self, dense: torch.Tensor) -> torch.Tensor:
        """Dense (B, C, n_x, n_y, n_z) -> (N, C) on the active voxels."""
        C = dense.shape[1]
        flat = dense.permute(0, 2, 3, 4, 1).reshape(-1, C)
        return flat.index_select(0, self.keys)

    # -- maps -------------------------------------------------------------------
    def neighbour_map(self, kernel: int = 3, periodic: bool = True) -> NeighbourMap:
        """Submanifold map of an odd kernel (cached per (kernel, periodic))."""
        key = ("sub", int(kernel), bool(periodic))
        if key not in self._maps:
            self._maps[key] = self._build_submanifold(kernel, periodic)
        return self._maps[key]

    def _build_submanifold(self, kernel, periodic) -> NeighbourMap:
        n = torch.tensor(self.shape, dtype=torch.long, device=self.device)
        out_all = torch.arange(len(self), device=self.device)
        ins, outs, counts = [], [], []
        for d in kernel_offsets(kernel).to(self.device):
            nb = self.coords + d
            if periodic:
                nb = torch.remainder(nb, n)
                inside = torch.ones(len(self), dtype=torch.bool, device=self.device)
            else:
                inside = ((nb >= 0) & (nb < n)).all(dim=1)
                nb = torch.remainder(nb, n)          # any in-range value; masked below
            idx = self.lookup(nb, self.batch)
            ok = inside & (idx >= 0)
            ins.append(idx[ok])
            outs.append(out_all[ok])
            counts.append(int(ok.sum()))
        log.debug("submanifold map kernel=%d periodic=%s: %d pairs on %r", kernel, periodic,
                  sum(counts), self)
        return NeighbourMap(torch.cat(ins), torch.cat(outs), tuple(counts), len(self), len(self))

    def coarsen(self) -> Tuple["SparseGrid", NeighbourMap]:
        """(coarse grid, down map) of the kernel-2 stride-2 down-sampling (cached).

        Coarse active voxel C exists iff one of its children 2C + d, d in {0,1}^3, is
        active; the map pairs each fine voxel (in) with its parent (out) at offset
        d = coord mod 2 (offset index (d_x*2 + d_y)*2 + d_z)."""
        if self._coarse is None:
            if any(s % 2 for s in self.shape):
                raise ValueError(f"strided down-sampling needs even grid sizes, got {self.shape}")
            cshape = tuple(s // 2 for s in self.shape)
            cc = torch.div(self.coords, 2, rounding_mode="floor")
            nx, ny, nz = cshape
            ckeys = ((self.batch * nx + cc[:, 0]) * ny + cc[:, 1]) * nz + cc[:, 2]
            ukeys, parent = torch.unique(ckeys, sorted=True, return_inverse=True)
            cb = torch.div(ukeys, nx * ny * nz, rounding_mode="floor")
            rem = ukeys - cb * (nx * ny * nz)
            coords = torch.stack([torch.div(rem, ny * nz, rounding_mode="floor"),
                                  torch.div(rem, nz, rounding_mode="floor") % ny, rem % nz], dim=1)
            coarse = SparseGrid(coords, cshape, batch=cb, batch_size=self.batch_size)
            d = self.coords - 2 * cc
            off = (d[:, 0] * 2 + d[:, 1]) * 2 + d[:, 2]
            order = torch.sort(off, stable=True).indices
            counts = torch.bincount(off, minlength=8).tolist()
            m = NeighbourMap(order, parent[order], tuple(int(c) for c in counts), len(self), len(coarse))
            self._coarse = (coarse, m)
        return self._coarse

    def to(self, device) -> "SparseGrid":
        return SparseGrid(self.coords.to(device), self.shape, self.batch.to(device), self.batch_size)


@dataclasses.dataclass
class SparseTensor:
    """Features (N, C) on the active voxels of ``grid``."""

    features: torch.Tensor
    grid: SparseGrid

    def replace(self, features: torch.Tensor) -> "SparseTensor":
        return SparseTensor(features, self.grid)

    def dense(self) -> torch.Tensor:
        return self.grid.to_dense(self.features)

    @property
    def C(self) -> int:
        return int(self.features.shape[1])

    def cat(self, other: "SparseTensor") -> "SparseTensor":
        if other.grid is not self.grid:
            raise ValueError("cat needs both tensors on the same grid object")
        return SparseTensor(torch.cat([self.features, other.features], dim=1), self.grid)


# -- the gather - GEMM - scatter Function -----------------------------------------
class GatherGemmScatter(torch.autograd.Function):
    """y = sum_d scatter_out(gather_in(x) @ W_d), eq. (1) without bias.

    Saves x, W and the maps only; the backward recomputes the gathers."""

    @staticmethod
    def forward(ctx, x, weight, in_idx, out_idx, counts, n_out):
        out = x.new_zeros(n_out, weight.shape[2])
        start = 0
        for d, c in enumerate(counts):
            if c:
                ii = in_idx.narrow(0, start, c)
                oi = out_idx.narrow(0, start, c)
                out.index_add_(0, oi, x.index_select(0, ii) @ weight[d])
            start += c
        ctx.save_for_backward(x, weight, in_idx, out_idx)
        ctx.counts = counts
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, in_idx, out_idx = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = torch.zeros_like(x) if need_x else None
        gw = torch.zeros_like(weight) if need_w else None
        grad_out = grad_out.contiguous()
        start = 0
        for d, c in enumerate(ctx.counts):
            if c:
                ii = in_idx.narrow(0, start, c)
                go = grad_out.index_select(0, out_idx.narrow(0, start, c))
                if need_x:
                    gx.index_add_(0, ii, go @ weight[d].T)
                if need_w:
                    gw[d] = x.index_select(0, ii).T @ go
            start += c
        return gx, gw, None, None, None, None


def sparse_conv(x: torch.Tensor, weight: torch.Tensor, nmap: NeighbourMap,
                bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Functional form of eq. (1): x (n_in, C_in), weight (n_offsets, C_in, C_out)."""
    if weight.shape[0] != nmap.n_offsets:
        raise ValueError(f"weight has {weight.shape[0]} offsets, map has {nmap.n_offsets}")
    if x.shape[0] != nmap.n_in:
        raise ValueError(f"features have {x.shape[0]} rows, map expects {nmap.n_in}")
    y = GatherGemmScatter.apply(x, weight, nmap.in_idx, nmap.out_idx, nmap.counts, nmap.n_out)
    return y if bias is None else y + bias


# -- modules -----------------------------------------------------------------------
class _SparseLayer(nn.Module):
    def __init__(self, c_in: int, c_out: int, n_offsets: int, bias: bool):
        super().__init__()
        self.c_in, self.c_out = int(c_in), int(c_out)
        fan_in = self.c_in * n_offsets
        bound = 1.0 / math.sqrt(fan_in)     # the bound of torch's default Conv init
        self.weight = nn.Parameter(torch.empty(n_offsets, self.c_in, self.c_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(self.c_out).uniform_(-bound, bound)) if bias else None

    def extra_repr(self) -> str:
        return f"{self.c_in} -> {self.c_out} | {self.weight.numel() + (self.c_out if self.bias is not None else 0)} weights"


class SparseConv3d(_SparseLayer):
    """Submanifold convolution (output active set = input active set), odd kernel,
    periodic neighbour maps (``periodic=False``: zero padding at the grid boundary)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, bias: bool = True, periodic: bool = True):
        kernel_offsets(kernel)  # validates
        super().__init__(c_in, c_out, kernel ** 3, bias)
        self.kernel, self.periodic = int(kernel), bool(periodic)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if self.kernel == 1:
            y = x.features @ self.weight[0]
            return x.replace(y if self.bias is None else y + self.bias)
        nmap = x.grid.neighbour_map(self.kernel, self.periodic)
        return x.replace(sparse_conv(x.features, self.weight, nmap, self.bias))

    @torch.no_grad()
    def load_dense(self, w: torch.Tensor, b: Optional[torch.Tensor] = None):
        """Copy a Conv3d weight (C_out, C_in, k, k, k) (and bias)."""
        self.weight.copy_(w.permute(2, 3, 4, 1, 0).reshape(-1, self.c_in, self.c_out))
        if b is not None:
            self.bias.copy_(b)
        return self


class SparseDown(_SparseLayer):
    """Kernel-2 stride-2 down-sampling onto the coarsened active set."""

    def __init__(self, c_in: int, c_out: int, bias: bool = True):
        super().__init__(c_in, c_out, 8, bias)

    def forward(self, x: SparseTensor) -> SparseTensor:
        coarse, nmap = x.grid.coarsen()
        return SparseTensor(sparse_conv(x.features, self.weight, nmap, self.bias), coarse)

    @torch.no_grad()
    def load_dense(self, w: torch.Tensor, b: Optional[torch.Tensor] = None):
        """Copy a Conv3d(kernel=2, stride=2) weight (C_out, C_in, 2, 2, 2)."""
        self.weight.copy_(w.permute(2, 3, 4, 1, 0).reshape(8, self.c_in, self.c_out))
        if b is not None:
            self.bias.copy_(b)
        return self


class SparseUp(_SparseLayer):
    """Transpose of SparseDown: from a coarse grid back onto the fine grid it came from."""

    def __init__(self, c_in: int, c_out: int, bias: bool = True):
        super().__init__(c_in, c_out, 8, bias)

    def forward(self, x: SparseTensor, fine: SparseGrid) -> SparseTensor:
        coarse, nmap = fine.coarsen()
        if coarse.n_active != x.grid.n_active:
            raise ValueError("SparseUp: input is not on the coarsening of the target grid")
        return SparseTensor(sparse_conv(x.features, self.weight, nmap.transpose(), self.bias), fine)

    @torch.no_grad()
    def load_dense(self, w: torch.Tensor, b: Optional[torch.Tensor] = None):
        """Copy a ConvTranspose3d(kernel=2, stride=2) weight (C_in, C_out, 2, 2, 2)."""
        self.weight.copy_(w.permute(2, 3, 4, 0, 1).reshape(8, self.c_in, self.c_out))
        if b is not None:
            self.bias.copy_(b)
        return self


def sparse_avg_pool(x: SparseTensor) -> SparseTensor:
    """Mean of the active children onto the coarsened active set (restricts the input
    features for the coarse levels of the network)."""
    coarse, nmap = x.grid.coarsen()
    s = x.features.new_zeros(coarse.n_active, x.C).index_add(0, nmap.out_idx, x.features.index_select(0, nmap.in_idx))
    cnt = torch.bincount(nmap.out_idx, minlength=coarse.n_active).to(x.features.dtype)
    return SparseTensor(s / cnt[:, None], coarse)
