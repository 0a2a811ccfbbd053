"""Symmetric smoothers for the multigrid V-cycle, on any level operator with
``apply``, ``diagonal``, ``dot`` (the fine matrix-free operator or a coarse
element-matrix operator).

Every smoother here is a polynomial in D^-1 K applied to D^-1 r (D = diag K), so its
error propagation I - S K is self-adjoint in the K inner product; with the same
smoother before and after the coarse correction the V-cycle is a symmetric
preconditioner (Hackbusch 1985; Adams, Brezina, Hu & Tuminaro 2003), as CG requires.

Pattern (PyAMG): ``setup_<name>(op, **opts)`` does the one-time work (diagonal,
spectral bound) and returns a ``Smoother``; ``SMOOTHERS`` maps names to setups.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch

log = logging.getLogger(__name__)


def estimate_lambda_max(op, dinv: torch.Tensor, steps: int = 12, seed: int = 0) -> float:
    """Largest eigenvalue of D^-1 K by Lanczos, read off Jacobi-PCG coefficients
    (Saad, Iterative Methods, s.6.7.3): T_jj = 1/alpha_j + beta_{j-1}/alpha_{j-1},
    T_{j,j+1} = sqrt(beta_j)/alpha_j; the largest Ritz value of T from below.

    The right-hand side b = K x_rand lies in range(K), so the translations (null
    space) never enter. Reductions are float64 and go through ``op.dot`` (Domain.sum)."""
    x = global_hash_field(op.domain, seed).to(dtype=dinv.dtype, device=dinv.device)
    r = op.apply(x - 0.5)
    z = dinv * r
    p = z.clone()
    rz = op.dot(r, z)
    alphas, betas = [], []
    for _ in range(steps):
        q = op.apply(p)
        pq = op.dot(p, q)
        if not float(pq) > 0:
            break
        a = rz / pq
        alphas.append(float(a))
        r = r - a.to(r.dtype) * q
        z = dinv * r
        rz_new = op.dot(r, z)
        b = rz_new / rz
        if not float(rz_new) > 0:
            break
        betas.append(float(b))
        p = z + b.to(r.dtype) * p
        rz = rz_new
    k = len(alphas)
    if k == 0:
        return 1.0
    T = np.zeros((k, k))
    for j in range(k):
        T[j, j] = 1.0 / alphas[j] + (betas[j - 1] / alphas[j - 1] if j > 0 else 0.0)
        if j + 1 < k:
            T[j, j + 1] = T[j + 1, j] = math.sqrt(betas[j]) / alphas[j]
    return float(np.linalg.eigvalsh(T).max())


def global_hash_field(domain, seed: int = 0) -> torch.Tensor:
    """A fixed pseudo-random field (1, 3, l_x, l_y, l_z) in [0, 1) that depends only on
    the global node index and component, so every decomposition sees the same
    global vector (reproducible eigenvalue estimates across rank counts)."""
    nx, ny, nz = domain.global_shape
    axes = [torch.arange(s, s + n, dtype=torch.int64) for s, n in zip(domain.local_start, domain.local_shape)]
    i, j, k = torch.meshgrid(*axes, indexing="ij")
    idx = (((i * ny + j) * nz + k) * 3)[None] + torch.arange(3)[:, None, None, None]
    # integer hash (splitmix-style constants, kept within int64), then to [0, 1)
    h = (idx + 0x9E3779B9 * (seed + 1)) & 0xFFFFFFFF
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return (h.to(torch.float64) / 2.0 ** 32)[None]


class Smoother:
    """x <- x + S (b - K x), S a fixed polynomial in D^-1 K times D^-1."""

    name = "smoother"

    def __init__(self, op):
        self.op = op

    def __call__(self, b: torch.Tensor, x: torch.Tensor = None) -> torch.Tensor:
        """From zero (``x`` None) a new field; otherwise ``x`` is updated in place."""
        if x is None:
            return self.correction(b)
        r = self.op.residual_(b.clone(), x)          # r = b - K x
        return x.add_(self.correction(r, own=True))

    def correction(self, r, own: bool = False):  # pragma: no cover - abstract
        """S r; ``own``: r is this call's to overwrite."""
        raise NotImplementedError


class ChebyshevSmoother(Smoother):
    """Chebyshev polynomial of D^-1 K on [lambda_max / ratio, lambda_max] (three-term
    recurrence of Saad's Algorithm 12.1 / Adams et al. 2003, eq. (2.5)): it damps the
    upper part of the spectrum, which the coarse grid cannot represent.
    ``degree`` matvecs per application (degree - 1 inside, one residual)."""

    name = "chebyshev"

    def __init__(self, op, dinv, lmax, degree=3, ratio=20.0):
        super().__init__(op)
        self.dinv, self.degree, self.lmax, self.lmin = dinv, int(degree), float(lmax), float(lmax) / ratio

    def correction(self, r, own: bool = False):
        theta = 0.5 * (self.lmax + self.lmin)
        delta = 0.5 * (self.lmax - self.lmin)
        sigma = theta / delta
        rho = 1.0 / sigma
        d = torch.mul(r, self.dinv).mul_(1.0 / theta)
        x = None                                     # the sum of the d's; d itself until a second one
        for k in range(self.degree - 1):
            # the new residual r - K d: in r's storage when it is ours (from the second
            # step on, and after Smoother.__call__'s residual), so the smoother holds
            # two fields besides x
            q = self.op.residual_(r if own else r.clone(), d)
            r, own = q, True
            rho_new = 1.0 / (2.0 * sigma - rho)
            if k == self.degree - 2:
                # last term: the new d in the residual's storage (no longer needed)
                q.mul_(self.dinv).mul_(2.0 * rho_new / delta).add_(d, alpha=rho_new * rho)
                return (d if x is None else x).add_(q)
            if x is None:
                x = d.clone()
            d.mul_(rho_new * rho).addcmul_(self.dinv, r, value=2.0 * rho_new / delta)
            x.add_(d)
            rho = rho_new
        return d

    def __repr__(self):
        return f"chebyshev(degree={self.degree}, [{self.lmin:.3g}, {self.lmax:.3g}])"


class JacobiSmoother(Smoother):
    """``steps`` damped Jacobi sweeps x += omega D^-1 (b - K x), omega = scale / lambda_max."""

    name = "jacobi"

    def __init__(self, op, dinv, lmax, steps=2, scale=4.0 / 3.0):
        super().__init__(op)
        self.dinv, self.steps, self.omega = dinv, int(steps), float(scale) / float(lmax)

    def correction(self, r, own: bool = False):
        x = torch.mul(r, self.dinv).mul_(self.omega)
        for _ in range(self.steps - 1):
            q = self.op.apply(x)
            torch.sub(r, q, out=q)
            x.addcmul_(self.dinv, q, value=self.omega)
        return x

    def __repr__(self):
        return f"jacobi(steps={self.steps}, omega={self.omega:.3g})"


def _spectral_setup(op, safety, lanczos_steps):
    dinv = 1.0 / op.diagonal(cache=False)                # D^-1 only: no second field kept
    lmax = safety * estimate_lambda_max(op, dinv, steps=lanczos_steps)
    return dinv, lmax


def setup_chebyshev(op, degree: int = 3, ratio: float = 20.0, safety: float = 1.1,
                    lanczos_steps: int = 12) -> ChebyshevSmoother:
    dinv, lmax = _spectral_setup(op, safety, lanczos_steps)
    return ChebyshevSmoother(op, dinv, lmax, degree=degree, ratio=ratio)


def setup_jacobi(op, steps: int = 2, scale: float = 4.0 / 3.0, safety: float = 1.1,
                 lanczos_steps: int = 12) -> JacobiSmoother:
    dinv, lmax = _spectral_setup(op, safety, lanczos_steps)
    return JacobiSmoother(op, dinv, lmax, steps=steps, scale=scale)


SMOOTHERS = {"chebyshev": setup_chebyshev, "jacobi": setup_jacobi}
