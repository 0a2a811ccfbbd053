"""Periodic matrix-free hex8 elasticity operator K for a block of load cases.

Fields are tensors (B, 3, l_x, l_y, l_z): B load cases (normally the 6 unit strains),
3 displacement components, nodes of the owned block. Node (i, j, k) is the (-,-,-)
corner of voxel (i, j, k).

Apply (element-by-element, no assembled matrix). The element matrices factor as

    k_e = lambda_e K_lambda + mu_e K_mu = G^T S_e G,    G = [L; M] (25, 24),
    S_e = diag(lambda_e I_7, mu_e I_18),

with K_lambda = L^T L (rank 7: volumetric strain at the Gauss points) and
K_mu = M^T M (rank 18: all but the 6 rigid-body modes), from their eigen-
decompositions. When every voxel has the same lambda / mu = r (one Poisson ratio:
a solid and its soft void), k_e = mu_e (K_mu + r K_lambda) and G has 18 rows
(rank 18) with S_e = mu_e I: 28% fewer multiply-adds per apply. So

    v = G u_e          gather + GEMM   = Conv3d(u, W), kernel 2x2x2, 25 (or 18) outputs
    v <- S_e v         per-voxel scaling
    y = sum_e G^T v    GEMM + gather   = Conv3d(v, W flipped and transposed)

v is made on the voxels -1 .. l-1 of each axis (u with one ghost layer on each side,
Domain.ghost(u, lo=1, hi=1)), so every owned node finds its eight voxels and y needs
no ghost layers folded back. Both convolutions run in channels-last layout (oneDNN on
CPU, cuDNN on CUDA).

On CPU with one Poisson ratio (the usual solid + soft void) the apply is instead the
fused C kernel of solver/native.py: per voxel f_e = mu_e K0 u_e with the 24 x 24
element matrix K0 = K_mu + r K_lambda (1152 flop per voxel and case, fewer than the
factored form's 1728), gathered, multiplied and scattered in one pass with no
temporary beyond a ghosted window of u. It subtracts a node value of the voxel from
u_e first (K0 annihilates translations): without that, the rounding of the large
translation part leaves white noise in K u that the multigrid preconditioner
amplifies, and float32 PCG stalled near a relative residual of 1e-5 at 128^3. The
convolution forms remain for CUDA and two Poisson ratios. Autograd through K u (the
CGINS embedded PCG and loss) records one node, ``_SymmetricApply``, whose backward is
one more apply (K is symmetric), so training uses the same kernels.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from .ieee import conv3d, conv_transpose3d

from .domain import SerialDomain
from .element import CORNERS, affine_element_displacements, lame_stiffness_matrices
from .materials import phase_lame, phases_present


def _psd_factor(K: np.ndarray) -> np.ndarray:
    """G with G^T G = K for a symmetric PSD K, keeping only the nonzero spectrum."""
    s, V = np.linalg.eigh(K)
    keep = s > 1e-12 * s.max()
    return np.sqrt(s[keep])[:, None] * V[:, keep].T


def default_chunk(device, coarse: bool = False) -> int:
    """Voxel x load cases per apply slab: 2^20, and 2^17 on CPU for the coarse element
    operators, whose per-slab temporaries (the gathered u_E and the element vectors,
    24 values per voxel and case) are then ~12 MB instead of ~100 MB with six cases
    at 64^3: the six-case peak at 128^3 fell from 2173 to 2024 MB; their time moved
    within this VM's noise (-15% and +18% in two windows). On CPU the fine operator was
    fastest with the largest slabs under tcmalloc (the allocator the command-line
    tools run on): 2^20 against 2^18, 0.87 against 1.04 s and 1.11 against 1.23 s per
    six-case apply at 128^3 (BENCHMARKS.md, "Operator apply"). Not measured on GPUs."""
    if coarse and torch.device(device).type == "cpu":
        return 1 << 17
    return 1 << 20


class ElasticityOperator:
    """K for a voxel grid with per-voxel Lame parameters on a Domain.

    Parameters
    ----------
    lam, mu : tensors (l_x, l_y, l_z) on the owned voxels (dtype and device taken
        from them).
    h : voxel size (h_x, h_y, h_z).
    domain : SerialDomain or an MPI domain with the same interface.
    chunk : voxels x load cases per apply slab (bounds the (B, rows, slab)
        temporary); default ``default_chunk(device)``.
    """

    def __init__(self, lam: torch.Tensor, mu: torch.Tensor, h, domain=None, chunk: Optional[int] = None):
        self.domain = domain if domain is not None else SerialDomain(lam.shape)
        if tuple(lam.shape) != tuple(self.domain.local_shape):
            raise ValueError(f"material shape {tuple(lam.shape)} != local block {self.domain.local_shape}")
        self.dtype, self.device = lam.dtype, lam.device
        self.lam, self.mu = lam, mu
        self.h = tuple(float(v) for v in h)
        self.voxel_volume = float(np.prod(self.h))
        self.volume = self.voxel_volume * self.domain.n_global
        K_lam, K_mu = lame_stiffness_matrices(self.h)
        self._K_lam_np, self._K_mu_np = K_lam, K_mu
        self.lame_ratio = self._uniform_lame_ratio()
        if self.lame_ratio is None:
            L, M = _psd_factor(K_lam), _psd_factor(K_mu)
            self.n_lam = L.shape[0]
            self.weight = self._conv_weight(np.vstack([L, M]))
        else:
            # one Poisson ratio everywhere (a solid and its soft void, say):
            # k_e = mu_e (K_mu + r K_lambda), whose factor has 18 rows, not 25
            self.n_lam = 0
            self.weight = self._conv_weight(_psd_factor(K_mu + self.lame_ratio * K_lam))
        self.chunk = int(chunk) if chunk is not None else default_chunk(self.device)
        self._diag = None
        self.native = None      # the fused C apply serves this operator (decided on first use)

    # -- construction helpers -------------------------------------------------
    def _uniform_lame_ratio(self) -> Optional[float]:
        """r if lambda_e = r mu_e on every voxel of the global grid (to a few units
        of the storage precision), else None. Decided globally, so every rank
        applies the same factorization."""
        mu, lam = self.mu.to(torch.float64), self.lam.to(torch.float64)
        pos = mu > 0
        if bool((lam[~pos] != 0).any()) or bool((mu < 0).any()):
            bad = torch.ones((), dtype=torch.float64, device=self.device)
        else:
            bad = torch.zeros((), dtype=torch.float64, device=self.device)
        r = lam[pos] / mu[pos]
        big = torch.tensor(float("inf"), dtype=torch.float64, device=self.device)
        hi = r.max() if r.numel() else -big
        lo = r.min() if r.numel() else big
        hi, neg_lo, bad = self.domain.max(torch.stack([hi, -lo, bad])).tolist()
        lo = -neg_lo
        if bad or not (math.isfinite(hi) and math.isfinite(lo)) or lo < 0:
            return None
        eps = torch.finfo(self.dtype).eps
        if hi - lo > 16 * eps * max(hi, 1.0):
            return None
        return 0.5 * (hi + lo)

    @classmethod
    def from_phases(cls, phases, E, nu, h, soft: float = 1e-6, domain=None,
                    dtype=torch.float64, device="cpu", **kw):
        """Operator for a phase-id block (numpy, owned voxels) and phase materials. The
        soft void's E is soft x the largest E among the phases present in the whole cell
        (over all ranks' blocks: a collective under MPI)."""
        present = torch.as_tensor(phases_present(phases, len(np.atleast_1d(E))), dtype=torch.float64)
        if domain is not None:
            present = domain.max(present)
        lam_p, mu_p = phase_lame(E, nu, soft, present=present.numpy() > 0)
        ph = torch.as_tensor(np.asarray(phases).astype(np.int64), device=device)
        lam = torch.as_tensor(lam_p, dtype=dtype, device=device)[ph]
        mu = torch.as_tensor(mu_p, dtype=dtype, device=device)[ph]
        return cls(lam, mu, h, domain=domain, **kw)

    def _conv_weight(self, Kst: np.ndarray) -> torch.Tensor:
        """(rows, 24) element matrix -> Conv3d weight (rows, 3, 2, 2, 2), channels-last."""
        W = np.zeros((Kst.shape[0], 3, 2, 2, 2))
        for a, (ax, ay, az) in enumerate(CORNERS):
            W[:, :, ax, ay, az] = Kst[:, 3 * a:3 * a + 3]
        return torch.as_tensor(W, dtype=self.dtype, device=self.device).contiguous(
            memory_format=torch.channels_last_3d)

    def to(self, dtype=None, device=None) -> "ElasticityOperator":
        """A copy of this operator in another dtype/device (same domain)."""
        dtype = dtype or self.dtype
        device = device or self.device
        return ElasticityOperator(self.lam.to(device=device, dtype=dtype),
                                  self.mu.to(device=device, dtype=dtype),
                                  self.h, self.domain, self.chunk)

    # -- the operator ---------------------------------------------------------
    def _scale_(self, v: torch.Tensor, x0: int = 0, x1: Optional[int] = None, lame=None) -> torch.Tensor:
        """v <- S_e v in place for the voxel slab [x0, x1): lambda on the first
        n_lam channels, mu on the rest (broadcast, no per-channel copy of S).
        ``lame``: the (lambda, mu) fields to slice (default: the owned voxels')."""
        lam, mu = (self.lam, self.mu) if lame is None else lame
        if self.n_lam == 0:
            return v.mul_(mu[x0:x1])
        v[:, :self.n_lam].mul_(lam[x0:x1])
        v[:, self.n_lam:].mul_(mu[x0:x1])
        return v

    def _slabs(self, B: int, chunk: Optional[int] = None):
        lx, ly, lz = self.domain.local_shape
        # at most `chunk` voxel-cases per slab; a block that needs slabs at all gets at
        # least four, so the temporaries shrink with the block when it is decomposed
        per_x = max(1, (chunk or self.chunk) // max(1, ly * lz * B))
        if per_x < lx:
            # one load case (a grouped solve, run to save memory): at least eight
            # slabs, so the (rows, slab) temporary stays below one field (18 or 25
            # channels against 3): ~20 MB less at 128^3 for ~5% more per apply
            per_x = min(per_x, -(-lx // (8 if B == 1 else 4)))
        for x0 in range(0, lx, per_x):
            yield x0, min(lx, x0 + per_x)

    def element_forces(self, ug: torch.Tensor, x0: int, x1: int) -> torch.Tensor:
        """k_e u_e for voxels [x0, x1) of the owned block: (B, 24, x1-x0, l_y, l_z).
        ``ug`` is the ghosted field (hi = 1). Reference path (apply() is faster)."""
        G = self.weight.permute(0, 2, 3, 4, 1).reshape(self.weight.shape[0], 24)
        v = self._scale_(conv3d(ug[:, :, x0:x1 + 1], self.weight), x0, x1)
        return torch.einsum("ka,bkxyz->baxyz", G, v)

    def scatter(self, fe: torch.Tensor, yg: torch.Tensor, x0: int):
        """Add element vectors fe (B, 24, nx, ny, nz) to the ghosted nodal field yg."""
        nx, ny, nz = fe.shape[-3:]
        for a, (ax, ay, az) in enumerate(CORNERS):
            yg[:, :, x0 + ax:x0 + ax + nx, ay:ay + ny, az:az + nz] += fe[:, 3 * a:3 * a + 3]

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        """y = K u for u of shape (B, 3, l_x, l_y, l_z): on CPU with one Poisson ratio
        the fused C kernel (``_apply_native``); otherwise ``_apply_gather``, or on CPU in
        float64 ``_apply_scatter`` (PyTorch's reference float64 Conv3d, without oneDNN,
        is ~3x slower with 18 inputs than the transposed convolution)."""
        if torch.is_grad_enabled() and u.requires_grad and self._symmetric_grad_ok():
            return _SymmetricApply.apply(u, self)
        if self._native_ok(u):
            return self._apply_native(u)
        if self.dtype == torch.float64 and self.device.type == "cpu":
            return self._apply_scatter(u)
        return self._apply_gather(u)

    __call__ = apply

    def _symmetric_grad_ok(self) -> bool:
        """Autograd through K u may use K's symmetry (``_SymmetricApply``): the operator's
        own tensors need no gradient and the cell is whole on this rank (a backward
        apply on a split domain would exchange ghosts in autograd's order)."""
        own = (self.lam, self.mu, self.weight)
        return getattr(self.domain, "size", 1) == 1 and not any(t.requires_grad for t in own)

    def residual_(self, b: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """b <- b - K u in place; returns b. The gather form subtracts slab by slab, so
        no field for K u is made: one field less at the smoothers' peak (25 MB per case
        at 128^3); the fused C kernel subtracts into b directly. Where autograd records
        (``u`` or ``b`` needs a gradient) or on the float64 convolution path, it is
        ``b.sub_(apply(u))``."""
        if self._native_ok(u) and not (torch.is_grad_enabled() and b.requires_grad):
            return self._apply_native(u, sub_from=b)
        if (self.dtype == torch.float64 and self.device.type == "cpu") or \
                (torch.is_grad_enabled() and (u.requires_grad or b.requires_grad)):
            return b.sub_(self.apply(u))
        self._apply_gather(u, sub_from=b)
        return b

    def apply_form(self) -> str:
        """Which apply serves K u here (recorded in the result files): 'native' (the
        fused C kernel), 'gather' (two convolutions) or 'scatter' (float64 on CPU
        without the kernel)."""
        if self._native_ok(torch.empty(0)):
            return "native"
        return "scatter" if (self.dtype == torch.float64 and self.device.type == "cpu") else "gather"

    # -- the fused C apply (solver/native.py) ----------------------------------
    def _native_ok(self, u: torch.Tensor) -> bool:
        """The fused C apply serves this call: CPU, one Poisson ratio (k_e = mu_e K0),
        float32 or float64, no autograd through u, and the library built."""
        if self.device.type != "cpu" or self.n_lam != 0 or self.dtype not in (torch.float32, torch.float64):
            return False
        if torch.is_grad_enabled() and u.requires_grad:
            return False
        if self.native is None:
            from . import native
            self.native = native.available()
        return self.native

    def _K0(self) -> torch.Tensor:
        """The element matrix of unit mu, K_mu + r K_lambda (24, 24), in this dtype."""
        if getattr(self, "_k0", None) is None or self._k0.dtype != self.dtype:
            K = self._K_mu_np + self.lame_ratio * self._K_lam_np
            self._k0 = torch.as_tensor(0.5 * (K + K.T), dtype=self.dtype).contiguous()
        return self._k0

    def _native_slabs(self, B: int):
        """Planes per slab of the fused apply: about 4 x chunk node-cases (2^22: 42
        planes of six cases at 128^3, a 53 MB window), 8 planes at the least, and at
        least four slabs for one load case (each slab's ghosted window is its only
        temporary; each slab recomputes one voxel plane of its neighbour's)."""
        lx, ly, lz = self.domain.local_shape
        per_x = max(8, 4 * self.chunk // max(1, ly * lz * B))
        if B == 1:
            per_x = min(per_x, max(8, -(-lx // 4)))
        per_x = min(per_x, lx)
        for x0 in range(0, lx, per_x):
            yield x0, min(lx, x0 + per_x)

    def _apply_native(self, u: torch.Tensor, sub_from: Optional[torch.Tensor] = None) -> torch.Tensor:
        """K u (or ``sub_from`` - K u, in place) by the fused C kernel, slab by slab on
        ghosted windows of u (``Domain.ghost_window``, else one ghosted copy)."""
        from . import native
        cl = torch.channels_last_3d
        B = u.shape[0]
        mu_lo = self._scale_lo()[1]
        K0 = self._K0()
        slabs = list(self._native_slabs(B))
        if hasattr(self.domain, "ghost_window"):
            buf = None

            def window(a, b):
                nonlocal buf
                shape = (B, 3, b - a, u.shape[3] + 2, u.shape[4] + 2)
                if buf is None or buf.shape[2] < b - a:
                    buf = torch.empty(shape, dtype=u.dtype, device=u.device, memory_format=cl)
                return self.domain.ghost_window(u, a, b, lo=1, hi=1, out=buf[:, :, :b - a])
        else:
            ug = self.domain.ghost(u, lo=1, hi=1)
            window = lambda a, b: ug[:, :, a:b]  # noqa: E731
        y = torch.empty(u.shape, dtype=u.dtype, device=u.device, memory_format=cl) if sub_from is None else sub_from
        # z not split over ranks: the window's z ghosts are copies of its own nodes
        zwrap = self.domain.local_shape[2] == self.domain.global_shape[2]
        for x0, x1 in slabs:
            native.hex8_apply(window(x0, x1 + 2), mu_lo[x0:x1 + 1], y[:, :, x0:x1], K0,
                              sign=1.0 if sub_from is None else -1.0, assign=sub_from is None, zwrap=zwrap)
        return y

    def _apply_gather(self, u: torch.Tensor, sub_from: Optional[torch.Tensor] = None) -> torch.Tensor:
        """K u by two forward convolutions: v = S_e G u_e on the voxels -1 .. l-1 of
        each axis (u ghosted by one layer on both sides), then node n gathers the
        G^T v of its eight voxels n - c, c in {0, 1}^3, which is a Conv3d with the
        weight flipped and transposed. oneDNN's forward kernel is faster than
        ConvTranspose3d here (BENCHMARKS.md), and no ghost layer of y needs folding
        back. The voxel slabs bound the (B, rows, slab) temporary.
        ``sub_from``: subtract K u from this field in place and return it instead."""
        B = u.shape[0]
        cl = torch.channels_last_3d
        wt, s_lo = self._node_weight(), self._scale_lo()
        slabs = list(self._slabs(B))
        halves = B == 1 and self.device.type == "cpu"
        if halves and len(slabs) > 1 and hasattr(self.domain, "ghost_window") and \
                not (torch.is_grad_enabled() and u.requires_grad):
            # one load case in slabs: each slab's ghosted window made on its own,
            # no ghosted copy of the whole field
            window = lambda a, b, out=None: self.domain.ghost_window(u, a, b, lo=1, hi=1, out=out)  # noqa: E731
        else:
            ug = self.domain.ghost(u, lo=1, hi=1)
            if not ug.is_contiguous(memory_format=cl):
                ug = ug.contiguous(memory_format=cl)
            window = lambda a, b, out=None: ug[:, :, a:b] if out is None else out.copy_(ug[:, :, a:b])  # noqa: E731
        if len(slabs) == 1 and not halves:
            y = conv3d(self._scale_(conv3d(window(0, u.shape[2] + 2), self.weight), lame=s_lo), wt)[:, :3]
            return y.contiguous(memory_format=cl) if sub_from is None else sub_from.sub_(y)
        y = torch.empty(u.shape, dtype=u.dtype, device=u.device, memory_format=cl) if sub_from is None else sub_from
        put = (lambda t, x0, x1: y[:, :, x0:x1].copy_(t)) if sub_from is None else \
            (lambda t, x0, x1: y[:, :, x0:x1].sub_(t))
        for x0, x1 in slabs:
            if halves and x1 - x0 >= 2:
                self._slab_in_halves(u, window, put, x0, x1, wt, s_lo)
                continue
            v = conv3d(window(x0, x1 + 2), self.weight)
            if not v.is_contiguous(memory_format=cl):     # oneDNN may answer channels-first for B = 1
                v = v.contiguous(memory_format=cl)
            put(conv3d(self._scale_(v, x0, x1 + 1, lame=s_lo), wt)[:, :3], x0, x1)
        return y

    def _slab_in_halves(self, u, window, put, x0: int, x1: int, wt, s_lo) -> None:
        """(K u)[:, :, x0:x1] for one load case, handed to ``put(values, x0, x1)``,
        computed as a batch of two: the slab's two halves (equal length L, overlapping
        by one plane when x1 - x0 is odd, which the second half then leaves out)
        stacked along the batch axis. With a batch of one, PyTorch's CPU Conv3d takes
        its slow im2col path (channels-first output, ~2x slower per plane,
        BENCHMARKS.md); with two it takes oneDNN's. Each half is scaled by its own
        window of the Lame fields in place (no stacked copy of them). ``window(a, b,
        out)`` writes the ghosted planes [a, b) of the input into ``out``."""
        cl = torch.channels_last_3d
        L = (x1 - x0 + 1) // 2
        starts = (x0, x1 - L)
        inp = torch.empty((2, u.shape[1], L + 2, u.shape[3] + 2, u.shape[4] + 2),
                          dtype=u.dtype, device=u.device, memory_format=cl)
        for k, s in enumerate(starts):
            window(s, s + L + 2, out=inp[k:k + 1])
        v = conv3d(inp, self.weight)                                  # (2, rows, L + 1, ...)
        if not v.is_contiguous(memory_format=cl):
            v = v.contiguous(memory_format=cl)
        for k, s in enumerate(starts):
            self._scale_(v[k:k + 1], s, s + L + 1, lame=s_lo)
        out = conv3d(v, wt)[:, :3]                                    # (2, 3, L, ...)
        skip = 2 * L - (x1 - x0)                                        # the shared plane, once
        put(out[0:1], x0, x0 + L)
        put(out[1:2, :, skip:], x1 - L + skip, x1)

    def _apply_scatter(self, u: torch.Tensor) -> torch.Tensor:
        """y = K u as Conv3d, scaling, ConvTranspose3d on u with one high ghost layer,
        then Domain.accumulate folds the high node layer of y back (slabs of chunk / 8)."""
        B = u.shape[0]
        cl = torch.channels_last_3d
        ug = self.domain.ghost(u, hi=1).contiguous(memory_format=cl)
        slabs = list(self._slabs(B, self.chunk >> 3))
        if len(slabs) == 1:
            yg = conv_transpose3d(self._scale_(conv3d(ug, self.weight)), self.weight)
        else:
            yg = torch.zeros_like(ug)
            for x0, x1 in slabs:
                v = self._scale_(conv3d(ug[:, :, x0:x1 + 1], self.weight), x0, x1)
                yg[:, :, x0:x1 + 1] += conv_transpose3d(v, self.weight)
        return self.domain.accumulate(yg, hi=1).contiguous(memory_format=cl)

    def _node_weight(self) -> torch.Tensor:
        """The Conv3d weight that sums G^T v over a node's voxels: (8, rows, 2, 2, 2),
        output channels 3..7 zero. oneDNN's CPU kernel for 3 output channels is slow:
        with 8 (2.7x the multiply-adds, the extra ones on zeros) this convolution took
        8.1 instead of 10.4 ms per one-case slab pair at 128^3 on one thread
        (session 8 microbenchmark), 6 output channels 11.5 ms. The apply keeps
        channels 0..2."""
        if getattr(self, "_wt", None) is None or self._wt.dtype != self.weight.dtype:
            w = self.weight.flip(2, 3, 4).transpose(0, 1)
            self._wt = torch.cat([w, w.new_zeros((8 - w.shape[0],) + tuple(w.shape[1:]))]).contiguous(
                memory_format=torch.channels_last_3d)
        return self._wt

    def _scale_lo(self):
        """(lambda, mu) on the voxels -1 .. l-1 of each axis (one low ghost layer)."""
        if getattr(self, "_s_lo", None) is None:
            g = lambda t: self.domain.ghost(t, lo=1, hi=0).contiguous()
            self._s_lo = (g(self.lam) if self.n_lam else None, g(self.mu))   # lambda unused with one nu
            # the owned fields become views of their ghosted copies: one copy each
            # (8 MB at 128^3 in float32); the values are the same
            self.mu = self._s_lo[1][1:, 1:, 1:]
            if self.n_lam:
                self.lam = self._s_lo[0][1:, 1:, 1:]
        return self._s_lo

    def assemble_voxel_vectors(self, ve: torch.Tensor) -> torch.Tensor:
        """Assemble per-voxel element vectors (B, 24, l_x, l_y, l_z) into nodes."""
        return self.assemble(lambda x0, x1: ve[:, :, x0:x1], ve.shape[0])

    def assemble(self, element_vectors, B: int, work_dtype=None, chunk: Optional[int] = None) -> torch.Tensor:
        """Assemble element vectors made slab by slab: ``element_vectors(x0, x1)``
        returns (B, 24, x1 - x0, l_y, l_z) for voxels [x0, x1); memory stays at one
        slab of element vectors plus the nodal field. The sums are made in
        ``work_dtype`` (default: this operator's), the result is in this operator's.
        ``chunk``: voxels x cases per slab (default: this operator's)."""
        lx, ly, lz = self.domain.local_shape
        yg = torch.zeros(B, 3, lx + 1, ly + 1, lz + 1, dtype=work_dtype or self.dtype, device=self.device)
        for x0, x1 in self._slabs(8 * B, chunk):
            self.scatter(element_vectors(x0, x1), yg, x0)
        return self.domain.accumulate(yg, hi=1).to(dtype=self.dtype, memory_format=torch.channels_last_3d)

    def _lame_combination(self, al: np.ndarray, am: np.ndarray):
        """(x0, x1) -> lambda_e al + mu_e am on the voxel slab, for rows al, am (B, 24)."""
        tl = torch.as_tensor(np.ascontiguousarray(al), dtype=self.dtype, device=self.device)[:, :, None, None, None]
        tm = torch.as_tensor(np.ascontiguousarray(am), dtype=self.dtype, device=self.device)[:, :, None, None, None]
        return lambda x0, x1: tl * self.lam[x0:x1] + tm * self.mu[x0:x1]

    def diagonal(self, cache: bool = True) -> torch.Tensor:
        """diag(K) as a nodal field (1, 3, l_x, l_y, l_z), kept for later calls unless
        ``cache`` is False (the smoothers keep D^-1 and need no second field)."""
        if self._diag is not None:
            return self._diag
        vf = self._lame_combination(np.diag(self._K_lam_np)[None], np.diag(self._K_mu_np)[None])
        d = self.assemble(vf, 1)
        if cache:
            self._diag = d
        return d

    def rhs(self, absolute: bool = False, cases=None) -> torch.Tensor:
        """f^i = sum_e k_e chi0^i_e for the six unit strains: (6, 3, l_x, l_y, l_z),
        or only the load cases i in ``cases`` (a sequence of indices 0..5).

        ``absolute=True`` assembles |k_e chi0^i_e| instead: the scale against which
        a cancelling f (a homogeneous cell has f = 0) is judged to be zero."""
        U0 = affine_element_displacements(self.h)                      # (6, 24)
        if cases is not None:
            U0 = U0[list(cases)]
        vf = self._lame_combination(U0 @ self._K_lam_np, U0 @ self._K_mu_np)
        return self.assemble((lambda x0, x1: vf(x0, x1).abs()) if absolute else vf, U0.shape[0])

    def mean_stiffness(self) -> torch.Tensor:
        """Voigt average <C> over the global cell (6, 6), float64: sum_e chi0^T k_e chi0 / |Omega|."""
        U0 = affine_element_displacements(self.h)
        A = torch.as_tensor(U0 @ self._K_lam_np @ U0.T, dtype=torch.float64, device=self.device)
        M = torch.as_tensor(U0 @ self._K_mu_np @ U0.T, dtype=torch.float64, device=self.device)
        s = self.domain.sum(torch.stack([self.lam.sum(dtype=torch.float64), self.mu.sum(dtype=torch.float64)]))
        return (s[0] * A + s[1] * M) / self.volume

    # -- reductions (float64 whatever the storage precision) -------------------
    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-load-case global dot products (B,), float64.

        Partial dot products over short rows (one z-line of nodes, 3 l_z values) in
        the storage precision, then float64 across rows and ranks."""
        return self.domain.sum(self._local_dot(a, b))

    def _local_dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """dot() over this rank's nodes only (no reduction across ranks)."""
        cl = torch.channels_last_3d
        if a.dim() == 5 and a.is_contiguous(memory_format=cl) and b.is_contiguous(memory_format=cl) \
                and a.shape == b.shape:
            B, C, X, Y, Z = a.shape
            ra = a.permute(0, 2, 3, 4, 1).reshape(B * X * Y, 1, Z * C)
            rb = b.permute(0, 2, 3, 4, 1).reshape(B * X * Y, Z * C, 1)
            part = torch.bmm(ra, rb).reshape(B, X * Y)
        else:
            part = (a * b).sum(dim=(1, 4)).reshape(a.shape[0], -1)
        return part.to(torch.float64).sum(dim=1)

    def gram(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """G_ij = <a_i, b_j> over the global grid, (B, B) float64."""
        A = a.reshape(a.shape[0], -1).to(torch.float64)
        Bm = b.reshape(b.shape[0], -1).to(torch.float64)
        return self.domain.sum(A @ Bm.T)

    def project_mean_free(self, x: torch.Tensor) -> torch.Tensor:
        """Remove the global mean of each component of each load case (in place)."""
        if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            B, C, X = x.shape[:3]
            part = x.permute(0, 2, 3, 4, 1).reshape(B, X, -1, C).sum(dim=2)      # (B, X, C)
            s = self.domain.sum(part.to(torch.float64).sum(dim=1))
        else:
            s = self.domain.sum(x.sum(dim=(3, 4)).to(torch.float64).sum(dim=2))
        x -= (s / self.domain.n_global).to(x.dtype)[:, :, None, None, None]
        return x

    def chom(self, chi: torch.Tensor) -> torch.Tensor:
        """Energy-form C^H (6, 6) float64 from the fluctuations chi (6, 3, ...), or a
        sequence of blocks (b_k, 3, ...) of the load cases in order (a grouped solve).
        The fields are read, not copied (EnergyCH with keep='ref')."""
        acc = EnergyCH(self)
        parts = [chi] if torch.is_tensor(chi) else list(chi)
        j = 0
        for p in parts:
            acc.add(p, range(j, j + p.shape[0]), keep="ref")
            j += p.shape[0]
        return acc.result()

    # -- pieces of the energy-form C^H (EnergyCH) ---------------------------------
    def affine_residual(self, u: torch.Tensor, case: int):
        """For one load case u (1, 3, ...) in any dtype: (r, s) with r = f^case - K u,
        a nodal field in this operator's dtype (1, 3, ...), and s (6,) float64 with
        s_i = f^i . u over this rank's voxels (not summed over ranks).

        Both come from one pass over the voxel slabs: v_e = G u_e (the apply's first
        convolution, u converted slab by slab), s from sum_e (G U0_i)^T S_e v_e, and r
        assembled from the element vectors G^T S_e (G U0_case - v_e) = k_e (chi0 - u)_e:
        f^case and K u are never formed on their own. All of it is computed in
        float64 whatever this operator's dtype (the Lame fields are exact in it), so
        the cancellation in f - K u costs nothing; only the finished r is stored in
        this operator's dtype (its own relative rounding, 2^-24 in float32): no
        float64 copy of the operator or of r is made."""
        wd = torch.float64
        U0 = torch.as_tensor(affine_element_displacements(self.h), dtype=wd, device=self.device)
        W = self.weight.to(wd)
        Gm = W.permute(0, 2, 3, 4, 1).reshape(W.shape[0], 24)                       # (rows, 24)
        c = Gm @ U0.T                                                                 # (rows, 6)
        ug = self.domain.ghost(u, hi=1)
        s = torch.zeros(c.shape[0], dtype=torch.float64, device=self.device)

        def element_vectors(x0, x1):
            v = self._scale_(conv3d(ug[:, :, x0:x1 + 1].to(wd), W), x0, x1)
            s.add_(v.sum(dim=(0, 2, 3, 4), dtype=torch.float64))
            # S_e (G U0_case) - S_e v_e, then G^T: k_e (chi0^case - u_e)
            sc = self._scale_(c[:, case].reshape(1, -1, 1, 1, 1).expand(1, -1, *v.shape[2:]).clone(), x0, x1)
            return torch.einsum("ka,bkxyz->baxyz", Gm, sc.sub_(v))

        # a quarter of the apply's slab: the float64 slab temporaries (v, its scaled
        # affine part, the element vectors) stay ~15 MB at 128^3 next to the float64 sum
        r = self.assemble(element_vectors, 1, work_dtype=wd, chunk=self.chunk // 4)
        return r, (c.T @ s)

    def _local_dot_slabs(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """_local_dot of one load case a (1, 3, ...) in any dtype with b, in float64 slab
        by slab (no full-size copy of a or b)."""
        out = torch.zeros(1, dtype=torch.float64, device=self.device)
        step = max(1, self.chunk // max(1, 3 * a.shape[3] * a.shape[4]))
        for x0 in range(0, a.shape[2], step):
            out += (a[:, :, x0:x0 + step].to(torch.float64) * b[:, :, x0:x0 + step]).sum()
        return out


class EnergyCH:
    """The energy-form C^H, accumulated one load case at a time, all sums in float64:

        |Omega| C_ij = sum_e (chi0^i - chi^i)_e^T k_e (chi0^j - chi^j)_e
                     = |Omega| <C>_ij - f^i.chi^j - chi^i.r^j,    r^j = f^j - K chi^j,

    (k_e symmetric and f^j = sum_e k_e chi0^j_e), exact for any fields, so still
    second order in the solver error (the first-order changes of the two terms
    cancel). For a pair of cases solved one after the other, the earlier one (i)
    enters only through chi^i.r^j, whose size is that of the later residual
    (~ rtol ||chi^i|| ||f^j||): ``add(..., keep='copy')`` therefore keeps finished
    cases in bfloat16 (float32 when the operator is float64), half the memory of the
    fields, at a relative error of ~2^-9 in that small term; a float8 ``store_dtype``
    (e4m3, scaled per case to its range: a quarter of the field) gives ~2^-4 in it,
    which homogenize uses at rtol <= 1e-5 in float32 solves: the term is ~0.1 rtol of
    C^H there (1.1e-7 on the 64^3 gyroid at rtol 1e-6), so C^H moves by ~1e-9
    against full fields (bfloat16: 7e-11), below float32 storage's own ~1e-7.
    f^i.chi^j and r^j come from one pass over the voxels of chi^j in float64
    (ElasticityOperator.affine_residual; r^j is then stored in the operator's
    precision, a relative 2^-24 of itself in float32).

        acc = EnergyCH(op); acc.add(chi_block, cases, keep='copy'); ...; C = acc.result()

    ``keep``: 'copy' (a low-precision copy, for a grouped solve that frees its
    fields), 'ref' (keep a reference: the caller keeps the fields anyway) or None
    (no later case needs these)."""

    def __init__(self, op, n_cases: int = 6, store_dtype=None):
        self.op = op
        if store_dtype is None:
            store_dtype = torch.float32 if op.dtype == torch.float64 else torch.bfloat16
        self.store_dtype = store_dtype
        n = int(n_cases)
        self.Fm = torch.zeros(n, n, dtype=torch.float64, device=op.device)     # f^i . chi^j
        self.Rm = torch.zeros(n, n, dtype=torch.float64, device=op.device)     # chi^i . r^j
        self.known = torch.zeros(n, n, dtype=torch.bool, device=op.device)      # Rm[i, j] computed
        self.kept = []                                               # (case, (1, 3, ...), scale)

    def add(self, block: torch.Tensor, cases, keep: str = "copy"):
        cases = [int(c) for c in cases]
        if len(cases) != block.shape[0]:
            raise ValueError(f"{len(cases)} cases for a block of {block.shape[0]}")
        if keep not in ("copy", "ref", None):
            raise ValueError(f"keep must be 'copy', 'ref' or None, got {keep!r}")
        op = self.op
        own = [(c, block[b:b + 1], 1.0) for b, c in enumerate(cases)]
        for j, xj, _ in own:
            r, s = op.affine_residual(xj, j)
            self.Fm[:, j] = s
            for i, xi, si in self.kept + own:
                self.Rm[i, j] = si * op._local_dot_slabs(xi, r)[0]
                self.known[i, j] = True
            del r
        if keep == "copy":
            self.kept += [(c,) + self._copy(x) for c, x, _ in own]
        elif keep == "ref":
            self.kept += own

    def _copy(self, x: torch.Tensor):
        """(copy, scale) of one case with x ~= scale * copy: a cast, or for a float8
        store x scaled to +-224 (e4m3 holds 448), converted slab by slab (no
        full-size float32 temporary). The scale is this rank's: the dots it enters
        are this rank's too."""
        if self.store_dtype.itemsize != 1:
            return x.to(self.store_dtype), 1.0
        amax = max(float(x.max()), -float(x.min()), 0.0)
        scale = amax / 224.0 if amax > 0 else 1.0
        q = torch.empty_like(x, dtype=self.store_dtype)
        step = max(1, self.op.chunk // max(1, 3 * x.shape[3] * x.shape[4]))
        for a in range(0, x.shape[2], step):
            q[:, :, a:a + step] = (x[:, :, a:a + step] * (1.0 / scale)).to(self.store_dtype)
        return q, scale

    def result(self) -> torch.Tensor:
        """C^H (n, n) float64, the same on every rank. Pairs computed both ways (cases of
        one block) are averaged; the others use the way that was computed."""
        op = self.op
        Fm, Rm = op.domain.sum(torch.stack([self.Fm, self.Rm]))
        M = Fm + Rm                                              # |Omega| (<C> - C), row i col j
        k = self.known
        if not bool((k | k.T).all()):
            raise ValueError("EnergyCH.result: some load cases were never added")
        Mt = M.T
        M = torch.where(k & k.T, 0.5 * (M + Mt), torch.where(k, M, Mt))
        return op.mean_stiffness() - M / op.volume


class _SymmetricApply(torch.autograd.Function):
    """y = K u for autograd (the CGINS embedded PCG and energy loss): K is symmetric,
    so the vector-Jacobian product of u -> K u is K g. Forward and backward are each
    one apply by the fastest form (the fused C kernel on CPU), nothing is saved for
    backward, and the convolution chain's own backward is not recorded. Gradients
    with respect to the operator (lambda, mu) are not supported here: ``apply``
    records the convolution chain when the operator's tensors need them."""

    @staticmethod
    def forward(ctx, u, op):
        ctx.op = op
        return op.apply(u)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        return ctx.op.apply(g.contiguous(memory_format=torch.channels_last_3d)), None
