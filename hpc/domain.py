"""MPIDomain: the periodic grid block-decomposed over a 3-D Cartesian communicator.

Same interface as ``solver.domain.SerialDomain`` (docs/DESIGN.md s.3), so the operator,
PCG, C^H and multigrid run distributed without a second code path:

* ``global_shape``, ``local_shape``, ``local_start``, ``local_slice``, ``n_global``,
  ``dims``, ``rank``, ``size``, ``describe()``;
* ``ghost(x, lo, hi)``: the owned block of a node/voxel field (..., l_x, l_y, l_z)
  extended by ``lo``/``hi`` layers per axis, filled with the periodic neighbours'
  values (a PETSc global-to-local scatter, INSERT_VALUES);
* ``accumulate(xg, lo, hi)``: the adjoint of ``ghost``: ghost-layer contributions
  are sent to their owners and added (local-to-global, ADD_VALUES), so that
  <ghost(x), y> = <x, accumulate(y)>;
* ``sum(t)``, ``max(t)``, ``barrier()``; ``coarsen(shape)`` for multigrid.

Ownership. The process grid ``dims`` comes from ``MPI.Compute_dims`` (or the caller).
Along an axis of n cells on p ranks, block c is [s_c, s_{c+1}) with
s_c = c (n // p) + min(c, n % p): the first n % p blocks are one larger. With
``align = a`` the same rule splits the n / a units of a cells (every block start is a
multiple of a; n must then be a multiple of a, except that the last unit may be short).
Nodes and voxels share the block: node (i, j, k) is the (-,-,-) corner of voxel
(i, j, k) and is owned with it.

Halo exchange (``ghost``) is done axis by axis, x, then y over the x-extended block,
then z over the x,y-extended block, so that edge and corner ghosts come for free
(they travel in two or three hops). For every axis each rank lists the global
indices of its ghost layers, s - lo .. s - 1 and e .. e + hi - 1 taken mod n, as
contiguous pieces with a single owner; both ends compute the same lists from the
block rule alone, so no handshake is needed. The general piece list covers

* ghost widths larger than a neighbour's block (pieces from ranks further away),
* dims[ax] == 1 (every piece is a local periodic copy) and dims[ax] == 2 (both
  neighbours are the same rank; pieces are told apart by their tag),
* uneven blocks.

``accumulate`` walks the same pieces backwards (z, y, x), sending each ghost slab to
its owner, which adds it into its block.

Reductions. ``sum`` gathers the per-rank partial sums (small tensors) on every rank
and adds them in rank order, so all ranks get bitwise the same value; control flow
that depends on a reduction (PCG's convergence test) therefore agrees on every rank.

Devices. MPI buffers are contiguous host arrays: CUDA tensors are staged through
the host (CUDA-aware MPI is a later optimisation). So is overlapping the halo
exchange with the interior part of the operator apply (docs/DESIGN.md s.5).
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import torch

from solver.domain import BlockLayout

# mpi4py is imported when the first MPIDomain is built (importing it initialises MPI;
# block_starts and multigrid_alignment stay usable without it)
MPI = None

log = logging.getLogger(__name__)


class CoarseningError(ValueError):
    """The coarse grid cannot be distributed on the same process grid."""


def block_starts(n: int, p: int, align: int = 1) -> list:
    """Block boundaries s_0 = 0 < s_1 < ... < s_p = n of an axis of n cells on p ranks.

    The axis is cut into ceil(n / align) units of ``align`` cells (the last may be
    short); unit counts per rank follow the rule "first u % p blocks one larger"."""
    n, p, align = int(n), int(p), int(align)
    units = -(-n // align)
    if units < p:
        raise ValueError(f"cannot split an axis of {n} cells into {p} blocks"
                         + (f" of multiples of {align} cells" if align > 1 else ""))
    q, r = divmod(units, p)
    return [min(n, align * (c * q + min(c, r))) for c in range(p)] + [n]


def multigrid_alignment(global_shape, dims, max_coarse: int = 512, min_axis: int = 4,
                        max_levels: int = 12) -> tuple:
    """Per-axis block alignment 2**L_ax for solver.multigrid's default hierarchy.

    Replays build_multigrid's coarsening (halve every axis with >= ``min_axis`` cells
    while the grid has > ``max_coarse`` nodes) to count the coarsenings L_ax of each
    axis; blocks aligned to 2**L_ax make every coarse level the fine blocks halved
    (MPIDomain.coarsen). The alignment is lowered where an axis would not split into
    ``dims[ax]`` blocks. Price: blocks may differ by up to 2**L_ax cells."""
    from solver.transfer import coarse_shape
    shape, levels = tuple(int(n) for n in global_shape), [0, 0, 0]
    for _ in range(max_levels - 1):
        r = tuple(2 if n >= min_axis else 1 for n in shape)
        if int(np.prod(shape)) <= max_coarse or r == (1, 1, 1):
            break
        levels = [lv + (ri == 2) for lv, ri in zip(levels, r)]
        shape = coarse_shape(shape, r)
    align = []
    for n, p, lv in zip(global_shape, dims, levels):
        a = 2 ** lv
        while a > 1 and -(-int(n) // a) < int(p):
            a //= 2
        align.append(a)
    return tuple(align)


def process_grid(size: int, global_shape, dims=(0, 0, 0)) -> tuple:
    """MPI.Compute_dims(size, dims) when its blocks fit the grid (at least one cell per
    block and axis); else, for the free axes (dims 0), the fitting factorization of
    ``size`` with the most balanced blocks (least block surface). A thin cell, e.g.
    2 x 16 x 16 on 3 ranks, gets (1, 3, 1) instead of failing on (3, 1, 1). ValueError
    (one line) when no process grid fits."""
    size, shape, dims = int(size), tuple(int(n) for n in global_shape), [int(v) for v in dims]
    _check_mpi()
    first = tuple(MPI.Compute_dims(size, list(dims)))
    if all(p <= n for p, n in zip(first, shape)):
        return first
    best = None
    for a in range(1, size + 1):
        if size % a:
            continue
        for b in range(1, size // a + 1):
            if (size // a) % b:
                continue
            cand = (a, b, size // a // b)
            if any(d and c != d for c, d in zip(cand, dims)) or any(c > n for c, n in zip(cand, shape)):
                continue
            blk = [n / c for n, c in zip(shape, cand)]
            surface = blk[0] * blk[1] + blk[1] * blk[2] + blk[0] * blk[2]
            if best is None or surface < best[0]:
                best = (surface, cand)
    if best is None:
        grid = "x".join(map(str, shape))
        raise ValueError(f"no process grid of {size} ranks fits the {grid} grid (at least one cell per rank "
                         f"and axis{'; dims ' + str(tuple(dims)) if any(dims) else ''}): use fewer ranks")
    return best[1]


def _check_mpi():
    global MPI
    if MPI is None:
        try:
            from mpi4py import MPI as _MPI
        except ImportError:
            raise ImportError("mpi4py is not installed: install openmpi-bin python3-mpi4py "
                              "(or pip install mpi4py) to run distributed") from None
        MPI = _MPI


def _host(t: torch.Tensor) -> np.ndarray:
    """A contiguous host numpy array with the tensor's data (no copy for contiguous CPU)."""
    return t.detach().to("cpu").contiguous().numpy()


class MPIDomain(BlockLayout):
    """The periodic ``global_shape`` grid, block-decomposed over ``comm``.

    Parameters
    ----------
    global_shape : (n_x, n_y, n_z) cells (= nodes, periodic).
    comm : an mpi4py intracommunicator (explicit: no silent COMM_WORLD), or an
        existing periodic Cartesian communicator with 3 dims (then ``dims`` is taken
        from it).
    dims : process grid (p_x, p_y, p_z); zeros are filled by ``MPI.Compute_dims``.
    align : every block start is a multiple of ``align`` (int or per axis); use
        2**levels for a multigrid hierarchy distributed on the same process grid
        (see ``coarsen``), or ``"multigrid"`` for ``multigrid_alignment``'s choice.
    """

    def __init__(self, global_shape, comm, dims: Optional[Sequence[int]] = None, align=1,
                 _starts=None):
        _check_mpi()
        self.global_shape = tuple(int(n) for n in global_shape)
        if len(self.global_shape) != 3 or min(self.global_shape) < 1:
            raise ValueError(f"grid shape must be 3 positive ints, got {global_shape}")
        if comm is None:
            raise ValueError("MPIDomain needs an explicit communicator (e.g. MPI.COMM_WORLD)")
        if comm.Get_topology() == MPI.CART and comm.Get_dim() == 3:
            cdims, periods, _ = comm.Get_topo()
            if dims is not None and tuple(dims) != tuple(cdims):
                raise ValueError(f"dims {tuple(dims)} differ from the Cartesian communicator's {tuple(cdims)}")
            if not all(periods):
                raise ValueError("the Cartesian communicator must be periodic on all axes")
            self.cart = comm
            self.dims = tuple(int(d) for d in cdims)
        else:
            d = [0, 0, 0] if dims is None else [int(v) for v in dims]
            if len(d) != 3 or min(d) < 0:
                raise ValueError(f"dims must be 3 non-negative ints, got {dims}")
            self.dims = process_grid(comm.Get_size(), self.global_shape, d)
            self.cart = comm.Create_cart(self.dims, periods=[True] * 3, reorder=False)
        self.comm = self.cart
        self.rank = self.cart.Get_rank()
        self.size = self.cart.Get_size()
        if int(np.prod(self.dims)) != self.size:
            raise ValueError(f"dims {self.dims} do not multiply to {self.size} ranks")
        self.coords = tuple(self.cart.Get_coords(self.rank))
        if isinstance(align, str):
            if align != "multigrid":
                raise ValueError(f"align must be an int, 3 ints or 'multigrid', got {align!r}")
            align = multigrid_alignment(self.global_shape, self.dims)
        align = tuple(int(a) for a in np.broadcast_to(align, (3,)))
        self.align = align
        if _starts is None:
            _starts = [block_starts(n, p, a) for n, p, a in zip(self.global_shape, self.dims, align)]
        self.starts = [list(s) for s in _starts]
        for ax in range(3):
            s = self.starts[ax]
            if len(s) != self.dims[ax] + 1 or s[0] != 0 or s[-1] != self.global_shape[ax] or \
                    any(b <= a for a, b in zip(s[:-1], s[1:])):
                raise ValueError(f"axis {ax}: bad block boundaries {s}")
        self.local_start = tuple(self.starts[ax][self.coords[ax]] for ax in range(3))
        self.local_shape = tuple(self.starts[ax][self.coords[ax] + 1] - self.local_start[ax]
                                 for ax in range(3))
        self._plans = {}
        log.debug("rank %d coords %s block start %s shape %s", self.rank, self.coords,
                  self.local_start, self.local_shape)

    # -- layout (local_slice, n_global: solver.domain.BlockLayout) ---------------
    def block(self, rank: int):
        """(start, shape) of the block owned by ``rank`` of this domain's communicator."""
        c = self.cart.Get_coords(rank)
        start = tuple(self.starts[ax][c[ax]] for ax in range(3))
        shape = tuple(self.starts[ax][c[ax] + 1] - start[ax] for ax in range(3))
        return start, shape

    def describe(self) -> dict:
        return {"ranks": self.size, "dims": list(self.dims), "global_shape": list(self.global_shape),
                "rank": self.rank, "coords": list(self.coords),
                "local_start": list(self.local_start), "local_shape": list(self.local_shape)}

    def __repr__(self):
        return (f"MPIDomain(global {self.global_shape}, dims {self.dims}, rank {self.rank}/"
                f"{self.size}: start {self.local_start} shape {self.local_shape})")

    # -- halo exchange ----------------------------------------------------------
    def _owner(self, ax: int, g: int) -> int:
        """Process-grid coordinate along ``ax`` owning global index g (0 <= g < n)."""
        return int(np.searchsorted(self.starts[ax], g, side="right")) - 1

    def _pieces(self, ax: int, c: int, lo: int, hi: int) -> list:
        """Ghost pieces of the rank at coordinate c along ``ax``: (owner coord, owner-local
        start, length, position in the ghosted axis). Identical on sender and receiver."""
        n = self.global_shape[ax]
        s, e = self.starts[ax][c], self.starts[ax][c + 1]
        pieces = []
        for t0, t1, pos in ((s - lo, s, 0), (e, e + hi, lo + e - s)):
            t = t0
            while t < t1:
                g = t % n
                q = self._owner(ax, g)
                ln = min(t1 - t, self.starts[ax][q + 1] - g)
                pieces.append((q, g - self.starts[ax][q], ln, pos))
                t += ln
                pos += ln
        return pieces

    def _plan(self, ax: int, lo: int, hi: int):
        """(recv, send) lists for this rank along ``ax``:
        recv: (src rank, tag, owner-local start, length, ghost position), src may be self;
        send: (dst rank, tag, local start, length) for the other ranks' pieces from us."""
        key = (ax, lo, hi)
        if key not in self._plans:
            me = self.coords[ax]

            def rank_at(c):
                cc = list(self.coords)
                cc[ax] = c
                return self.cart.Get_cart_rank(cc)

            recv = [(rank_at(q), 3 * i + ax, a, ln, pos)
                    for i, (q, a, ln, pos) in enumerate(self._pieces(ax, me, lo, hi))]
            send = []
            for c in range(self.dims[ax]):
                if c == me:
                    continue
                for i, (q, a, ln, pos) in enumerate(self._pieces(ax, c, lo, hi)):
                    if q == me:
                        send.append((rank_at(c), 3 * i + ax, a, ln))
            self._plans[key] = (recv, send)
        return self._plans[key]

    def ghost(self, x: torch.Tensor, lo: int = 0, hi: int = 1) -> torch.Tensor:
        """Owned block (..., l_x, l_y, l_z) -> ghosted block (..., l_x+lo+hi, ...)."""
        if x.requires_grad:
            return _Ghost.apply(x, self, lo, hi)
        return self._ghost(x, lo, hi)

    def accumulate(self, xg: torch.Tensor, lo: int = 0, hi: int = 1) -> torch.Tensor:
        """Ghosted block -> owned block with the ghost layers added into their owners."""
        if xg.requires_grad:
            return _Accumulate.apply(xg, self, lo, hi)
        return self._accumulate(xg, lo, hi)

    def _check_block(self, x, extra):
        if tuple(x.shape[-3:]) != tuple(n + extra for n in self.local_shape):
            raise ValueError(f"field block {tuple(x.shape[-3:])} does not match the local block "
                             f"{self.local_shape} (+{extra} ghost layers)")

    def _ghost(self, x, lo, hi):
        lo, hi = int(lo), int(hi)
        self._check_block(x, 0)
        out = x.new_empty(x.shape[:-3] + tuple(n + lo + hi for n in self.local_shape))
        core = [slice(lo, lo + n) for n in self.local_shape]
        out[(Ellipsis, *core)] = x
        for ax in range(3):
            # axes before ax: full (ghosted) extent; after ax: owned extent
            sel = [slice(None)] * ax + [None] + core[ax + 1:]
            recv, send = self._plan(ax, lo, hi)

            def view(start, ln):
                s = list(sel)
                s[ax] = slice(start, start + ln)
                return out[(Ellipsis, *s)]

            reqs, bufs = [], []
            for src, tag, a, ln, pos in recv:
                if src != self.rank:
                    shape = list(view(pos, ln).shape)
                    buf = np.empty(shape, dtype=_np_dtype(out.dtype))
                    reqs.append(self.cart.Irecv(buf, source=src, tag=tag))
                    bufs.append((buf, pos, ln))
            for dst, tag, a, ln in send:
                sb = _host(view(lo + a, ln))
                reqs.append(self.cart.Isend(sb, dest=dst, tag=tag))
                bufs.append((sb, None, None))   # keep the send buffer alive
            for src, tag, a, ln, pos in recv:
                if src == self.rank:
                    view(pos, ln).copy_(view(lo + a, ln))
            MPI.Request.Waitall(reqs)
            for buf, pos, ln in bufs:
                if pos is not None:
                    view(pos, ln).copy_(torch.from_numpy(buf))
        return out

    def _accumulate(self, xg, lo, hi):
        lo, hi = int(lo), int(hi)
        self._check_block(xg, lo + hi)
        out = xg.clone()
        core = [slice(lo, lo + n) for n in self.local_shape]
        for ax in (2, 1, 0):
            # axes before ax: still ghosted; ax: ghost pieces go home; after ax: folded
            sel = [slice(None)] * ax + [None] + core[ax + 1:]
            recv, send = self._plan(ax, lo, hi)

            def view(start, ln):
                s = list(sel)
                s[ax] = slice(start, start + ln)
                return out[(Ellipsis, *s)]

            reqs, bufs = [], []
            # the roles reverse: what ghost sent we receive, what it received we send
            for dst, tag, a, ln in send:
                buf = np.empty(list(view(lo + a, ln).shape), dtype=_np_dtype(out.dtype))
                reqs.append(self.cart.Irecv(buf, source=dst, tag=tag))
                bufs.append((buf, a, ln))
            for src, tag, a, ln, pos in recv:
                if src != self.rank:
                    sb = _host(view(pos, ln))
                    reqs.append(self.cart.Isend(sb, dest=src, tag=tag))
                    bufs.append((sb, None, None))
            for src, tag, a, ln, pos in recv:
                if src == self.rank:
                    view(lo + a, ln).add_(view(pos, ln))
            MPI.Request.Waitall(reqs)
            for buf, a, ln in bufs:
                if a is not None:
                    view(lo + a, ln).add_(torch.from_numpy(buf).to(out.device))
        return out[(Ellipsis, *core)].contiguous()

    # -- reductions ---------------------------------------------------------------
    #: tensors up to this many elements are summed by Allgather + ordered local sum
    gather_sum_limit = 4096

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Global sum of per-rank partial sums, in float64.

        Small tensors (dot products, Gram matrices: <= ``gather_sum_limit`` elements)
        are all-gathered and added in rank order: bitwise the same on every rank and
        independent of message timing, so control flow that depends on them agrees.
        Larger ones (a coarse-grid matrix) use Allreduce."""
        a = np.ascontiguousarray(t.detach().to("cpu", torch.float64).numpy())
        if a.size <= self.gather_sum_limit:
            allp = np.empty((self.size,) + a.shape, dtype=np.float64)
            self.cart.Allgather(a, allp)
            s = allp[0].copy()
            for r in range(1, self.size):
                s += allp[r]
        else:
            s = np.empty_like(a)
            self.cart.Allreduce(a, s, op=MPI.SUM)
        return torch.from_numpy(s).to(device=t.device, dtype=t.dtype if t.is_floating_point() else torch.float64)

    def max(self, t: torch.Tensor) -> torch.Tensor:
        a = np.ascontiguousarray(t.detach().to("cpu").numpy())
        out = np.empty_like(a)
        self.cart.Allreduce(a, out, op=MPI.MAX)
        return torch.from_numpy(out).to(t.device)

    def barrier(self):
        self.cart.Barrier()

    # -- multigrid ----------------------------------------------------------------
    def coarsen(self, coarse_global_shape, min_block: int = 1) -> "MPIDomain":
        """The domain of the next coarser multigrid level, on the same process grid.

        Per axis the coarse size m is either n (axis not coarsened: same blocks) or
        ceil(n / 2) (solver.transfer's rule: coarse node k on fine node 2k, the single
        cell of an odd axis is the global last one). Then every fine block must start
        on an even index, and the coarse block is [s / 2, ceil(e / 2)); it must keep at
        least ``min_block`` cells. Build the fine domain with ``align = 2**levels`` to
        guarantee this for ``levels`` coarsenings. Otherwise CoarseningError (the
        caller may then gather the coarse level onto fewer ranks)."""
        cs = tuple(int(m) for m in coarse_global_shape)
        starts = []
        for ax, (n, m) in enumerate(zip(self.global_shape, cs)):
            s = self.starts[ax]
            if m == n:
                starts.append(list(s))
                continue
            if m != -(-n // 2):
                raise CoarseningError(f"axis {ax}: coarse size {m} is neither {n} nor ceil({n}/2)")
            odd = [v for v in s[:-1] if v % 2]
            if odd:
                raise CoarseningError(
                    f"axis {ax}: fine blocks start at odd indices {odd} (blocks {s}); build the "
                    f"fine MPIDomain with align=2**levels so the coarse blocks are the fine ones halved")
            c = [v // 2 for v in s[:-1]] + [m]
            widths = [b - a for a, b in zip(c[:-1], c[1:])]
            if min(widths) < max(1, min_block):
                raise CoarseningError(
                    f"axis {ax}: coarse blocks {widths} of {m} cells on {self.dims[ax]} ranks are "
                    f"smaller than {max(1, min_block)}: gather this level onto fewer ranks")
            starts.append(c)
        align = tuple(max(1, a // 2) if m != n else a
                      for a, n, m in zip(self.align, self.global_shape, cs))
        return MPIDomain(cs, self.cart, align=align, _starts=starts)


def _np_dtype(dtype: torch.dtype):
    return torch.empty((), dtype=dtype).numpy().dtype


class _Ghost(torch.autograd.Function):
    """ghost with its adjoint (accumulate) as backward: for networks on a Domain."""

    @staticmethod
    def forward(ctx, x, domain, lo, hi):
        ctx.domain, ctx.lo, ctx.hi = domain, lo, hi
        return domain._ghost(x, lo, hi)

    @staticmethod
    def backward(ctx, g):
        return ctx.domain._accumulate(g.contiguous(), ctx.lo, ctx.hi), None, None, None


class _Accumulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xg, domain, lo, hi):
        ctx.domain, ctx.lo, ctx.hi = domain, lo, hi
        return domain._accumulate(xg, lo, hi)

    @staticmethod
    def backward(ctx, g):
        return ctx.domain._ghost(g.contiguous(), ctx.lo, ctx.hi), None, None, None
