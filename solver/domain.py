"""The Domain: the only place where distribution enters the numerics (DESIGN.md s.3).

Numerical code (operator, PCG, multigrid, C^H, network layers) asks the Domain for

* the owned block of the periodic grid (``global_shape``, ``local_shape``,
  ``local_start``, ``local_slice``);
* ``ghost(x, lo, hi)``: the owned block of a node or voxel field extended by ``lo``
  layers on the low side and ``hi`` on the high side of each axis, filled with the
  periodic neighbours' values;
* ``accumulate(xg, lo, hi)``: the reverse: a field on the ghosted block whose
  ghost layers hold contributions owned elsewhere; returns the owned block with
  those contributions added (PETSc's ADD_VALUES scatter);
* ``sum(t)``: a global sum of a (small) tensor of per-rank partial sums.

Fields have shape (..., l_x, l_y, l_z): any leading dims (load cases, components).
``SerialDomain`` is the single-process domain: ghost = periodic wrap onto itself,
sum = identity. The MPI domain (hpc.domain) implements the same methods.
"""
from __future__ import annotations

import torch


class SerialDomain:
    """The whole periodic grid on one process."""

    rank = 0
    size = 1

    def __init__(self, shape):
        self.global_shape = tuple(int(n) for n in shape)
        if len(self.global_shape) != 3 or min(self.global_shape) < 1:
            raise ValueError(f"grid shape must be 3 positive ints, got {shape}")
        self.local_shape = self.global_shape
        self.local_start = (0, 0, 0)
        self.dims = (1, 1, 1)

    @property
    def local_slice(self):
        return tuple(slice(s, s + n) for s, n in zip(self.local_start, self.local_shape))

    @property
    def n_global(self) -> int:
        return self.global_shape[0] * self.global_shape[1] * self.global_shape[2]

    def ghost(self, x: torch.Tensor, lo: int = 0, hi: int = 1) -> torch.Tensor:
        for ax in range(3):
            d = x.dim() - 3 + ax
            n = x.shape[d]
            parts = []
            if lo:
                parts.append(_wrap_take(x, d, n - lo, n))
            parts.append(x)
            if hi:
                parts.append(_wrap_take(x, d, 0, hi))
            x = torch.cat(parts, dim=d) if len(parts) > 1 else x
        return x

    def accumulate(self, xg: torch.Tensor, lo: int = 0, hi: int = 1) -> torch.Tensor:
        # Fold the ghost layers onto their periodic owners, one axis at a time
        # (edges and corners are carried by the later axes).
        for ax in range(3):
            d = xg.dim() - 3 + ax
            n = xg.shape[d] - lo - hi
            core = xg.narrow(d, lo, n).clone()
            if hi:
                _wrap_add(core, d, xg.narrow(d, lo + n, hi), start=0)
            if lo:
                _wrap_add(core, d, xg.narrow(d, 0, lo), start=n - lo)
            xg = core
        return xg

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def barrier(self):
        pass

    def describe(self) -> dict:
        return {"ranks": 1, "dims": [1, 1, 1], "global_shape": list(self.global_shape)}


def _wrap_take(x, d, start, stop):
    """x[start:stop] along dim d with periodic wrap (start may be < 0, stop > n)."""
    n = x.shape[d]
    idx = torch.arange(start, stop, device=x.device) % n
    return x.index_select(d, idx)


def _wrap_add(core, d, layer, start):
    n = core.shape[d]
    idx = torch.arange(start, start + layer.shape[d], device=core.device) % n
    core.index_add_(d, idx, layer)
