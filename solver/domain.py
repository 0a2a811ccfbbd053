"""The Domain: the only place where distribution enters the numerics (docs/DESIGN.md s.3).

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


class BlockLayout:
    """What every Domain derives from its global_shape, local_start and local_shape."""

    @property
    def local_slice(self):
        return tuple(slice(s, s + n) for s, n in zip(self.local_start, self.local_shape))

    @property
    def n_global(self) -> int:
        return self.global_shape[0] * self.global_shape[1] * self.global_shape[2]


def _layout_of(x: torch.Tensor):
    """channels_last_3d for a 5-d tensor stored that way, else contiguous."""
    cl = torch.channels_last_3d
    return cl if (x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=cl)) \
        else torch.contiguous_format


def _wrap_layers(out: torch.Tensor, dims, lo: int, hi: int) -> None:
    """Fill the lo/hi periodic ghost layers of ``out`` along ``dims`` from its own
    owned layers (axis by axis, so edges and corners come with the later axes)."""
    for d in dims:
        n = out.shape[d] - lo - hi
        for j in range(hi):      # high ghost layer j <- owned layer j mod n
            out.narrow(d, lo + n + j, 1).copy_(out.narrow(d, lo + j % n, 1))
        for j in range(lo):      # low ghost layer lo-1-j <- owned layer n-1-j mod n
            out.narrow(d, lo - 1 - j, 1).copy_(out.narrow(d, lo + (n - 1 - j) % n, 1))


class SerialDomain(BlockLayout):
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

    def ghost(self, x: torch.Tensor, lo: int = 0, hi: int = 1) -> torch.Tensor:
        """x extended by lo/hi periodic ghost layers per axis (memory format kept).

        One copy of x plus the thin layers: axis by axis, each axis' layers taken over
        the previous axes' ghosts too, so edges and corners come for free."""
        shape = list(x.shape)
        core = []
        for ax in range(3):
            d = x.dim() - 3 + ax
            core.append(slice(lo, lo + shape[d]))
            shape[d] += lo + hi
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_layout_of(x))
        lead = (slice(None),) * (x.dim() - 3)
        out[lead + tuple(core)] = x
        _wrap_layers(out, range(x.dim() - 3, x.dim()), lo, hi)
        return out

    def ghost_window(self, x: torch.Tensor, a: int, b: int, lo: int = 0, hi: int = 1,
                     out: torch.Tensor = None) -> torch.Tensor:
        """Planes [a, b) along the first grid axis of ``ghost(x, lo, hi)``, made without
        the whole ghosted field (``out``: where to write them; its memory format is
        kept). An apply that works slab by slab needs only its slab's window: one
        ghosted copy of the field less (25 MB per load case at 128^3). Optional for
        a Domain: the operator falls back to ``ghost`` where it is missing."""
        n = x.shape[-3]
        ly, lz = x.shape[-2], x.shape[-1]
        shape = tuple(x.shape[:-3]) + (b - a, ly + lo + hi, lz + lo + hi)
        if out is None:
            out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_layout_of(x))
        elif tuple(out.shape) != shape:
            raise ValueError(f"ghost_window: out has shape {tuple(out.shape)}, expected {shape}")
        lead = (slice(None),) * (x.dim() - 3)
        g = a
        while g < b:                 # ghosted plane g is owned plane (g - lo) mod n: runs of them
            o = (g - lo) % n
            k = min(b - g, n - o)
            out[lead + (slice(g - a, g - a + k), slice(lo, lo + ly), slice(lo, lo + lz))] = x[lead + (slice(o, o + k),)]
            g += k
        _wrap_layers(out, (x.dim() - 2, x.dim() - 1), lo, hi)
        return out

    def accumulate(self, xg: torch.Tensor, lo: int = 0, hi: int = 1) -> torch.Tensor:
        """Fold the ghost layers of xg onto their periodic owners; returns the owned
        block (a view into xg, which is modified in place)."""
        # axis by axis over the full extent of the other axes (ghosts included), so
        # contributions in edges and corners travel on with the later axes
        for ax in range(3):
            d = xg.dim() - 3 + ax
            n = xg.shape[d] - lo - hi
            for j in range(hi):
                xg.narrow(d, lo + j % n, 1).add_(xg.narrow(d, lo + n + j, 1))
            for j in range(lo):
                xg.narrow(d, lo + (n - 1 - j) % n, 1).add_(xg.narrow(d, lo - 1 - j, 1))
        lead = (slice(None),) * (xg.dim() - 3)
        core = tuple(slice(lo, xg.shape[xg.dim() - 3 + ax] - hi) for ax in range(3))
        return xg[lead + core]

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def barrier(self):
        pass

    def describe(self) -> dict:
        return {"ranks": 1, "dims": [1, 1, 1], "global_shape": list(self.global_shape)}
