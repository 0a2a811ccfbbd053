"""Batched preconditioned conjugate gradients for K x = f on the mean-free subspace.

Each load case (leading dim B) runs its own CG (its own alpha, beta); the block is
applied at once. Iterates, residuals and preconditioned residuals are kept mean-free
per component (the translations are K's null space: docs/DESIGN.md s.2), so the
preconditioner acts as P M P with P the mean-free projector, which is symmetric
positive definite on that subspace and keeps CG valid.

Energy bookkeeping (Hestenes-Stiefel; Strakos & Tichy 2002): with
phi(x) = 1/2 x.Kx - f.x, each step lowers phi by alpha_k (r_k . z_k) / 2, and
||x - x*||_K^2 = sum_{j >= k} alpha_j (r_j . z_j).
In homogenization ||chi - chi*||_K^2 / |Omega| is exactly the error of C^H_ii
(docs/DESIGN.md s.2), so these terms give the C^H error estimate that ``ctol`` stops on.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch


@dataclasses.dataclass
class PCGInfo:
    iterations: list          # per load case
    residuals: list           # final relative residual ||f - K x|| / ||f|| per case (true)
    converged: list           # per case
    energy_error: list        # estimated ||x - x*||_K^2 per case
    history: list             # per iteration: (max rel residual, est. rel C^H error)

    @property
    def all_converged(self) -> bool:
        return all(self.converged)


#: The stopping estimate of ``ctol`` (conservative=True) is multiplied by this: on 64
#: ctol stops (eight cells: lattices, TPMS sheets, Voronoi, inclusions, an anisotropic
#: grid; multigrid and Jacobi; ctol 1e-2 .. 1e-5) the true C^H_ii error then stayed
#: within 1.04 x ctol (2 gave 3.7 x; the plain estimate up to 20 x), for 4% more
#: iterations than a factor of 2. tests/test_solver.py checks two of those cells.
TAIL_SAFETY = 3.0


def _tail_estimate(decrements, window: int = 4, rho_fallback: float = math.inf,
                   conservative: bool = False) -> float:
    """Estimate sum_{j>k} delta_j of a (roughly) geometric series from its last terms.

    Plain (the reported estimate): the mean ratio over the last ``window`` + 1 terms;
    a single term uses ``rho_fallback`` (the squared residual reduction of the step:
    energy decrements scale like squared residuals). ``conservative`` (what ctol stops
    on): at least three terms, the slowest ratio of successive terms among them (CG's
    decrements do not fall at one rate, and early on one ratio underestimates the tail
    many times over), times TAIL_SAFETY."""
    n = len(decrements)
    if conservative:
        if n < 3:
            return math.inf
        tail = decrements[-1 - min(window, n - 1):]
        if min(tail) <= 0:
            return 0.0
        rho = max(b / a for a, b in zip(tail[:-1], tail[1:]))
        return math.inf if rho >= 1.0 else TAIL_SAFETY * tail[-1] * rho / (1.0 - rho)
    if n == 1 and rho_fallback < 1.0:
        return decrements[0] * rho_fallback / (1.0 - rho_fallback)
    if n < 2:
        return math.inf
    w = min(window, n - 1)
    d_last, d_prev = decrements[-1], decrements[-1 - w]
    if d_prev <= 0 or d_last <= 0:
        return 0.0
    rho = (d_last / d_prev) ** (1.0 / w)
    if rho >= 1.0:
        return math.inf
    return d_last * rho / (1.0 - rho)


def zero_rhs_tol(dtype) -> float:
    """||f|| / fscale at or below which a load case counts as unloaded: 1e-13 in float64,
    100 eps of a lower storage precision (float32: 1.2e-5; a cancelling load there comes out
    ~1e-8, not 1e-16, and PCG iterated on that rounding noise: 1310 iterations on a
    24^3 laminate). Dropping a real load that small costs O((||f|| / fscale)^2) in the
    energy-form C^H: below 1e-10."""
    return max(1e-13, 100.0 * torch.finfo(dtype).eps)


def _sq_ratio(a, b) -> float:
    a, b = float(a), float(b)
    return (a / b) ** 2 if b > 0 else math.inf


def pcg(op, f, x0: Optional[torch.Tensor] = None,
        precond: Optional[Callable] = None, rtol: float = 1e-6, ctol: Optional[float] = None,
        maxiter: int = 10000, energy0: Optional[torch.Tensor] = None,
        callback: Optional[Callable] = None, true_residual_every: int = 50,
        fscale: Optional[torch.Tensor] = None):
    """Solve op(x) = f for the block f (B, 3, ...) with batched PCG.

    Stops each load case when ||r|| <= rtol ||f|| or, if ``ctol`` is given, when the
    estimated relative error of C^H_ii (needs ``energy0`` = |Omega| <C>_ii, (B,)) is
    below ctol. A case with ||f|| <= zero_rhs_tol(f.dtype) fscale (cancelling loads, e.g.
    a homogeneous cell or in-plane shear of a laminate) counts as solved by x = 0. ``precond(r) -> z`` (default: Jacobi with op.diagonal()).
    ``callback(k, rel_res (B,), est_err (B,), x)`` is called each iteration with the
    current iterate ``x`` (a live tensor: read it, do not keep or modify it).
    The caller's tensor ``f`` is not changed. ``f`` may also be a callable that returns
    a new right-hand side each call: then no copy of f is kept while iterating (f
    becomes the first residual; it is made again for the true residual at the end),
    one block of fields less in memory.
    Returns (x, PCGInfo).
    """
    make_f = f if callable(f) else None
    f = op.project_mean_free(make_f() if make_f is not None else f.clone())
    B = f.shape[0]
    dev = f.device
    if precond is None:
        dinv = 1.0 / op.diagonal()
        precond = lambda r: r * dinv  # noqa: E731
    fnorm = op.dot(f, f).sqrt()
    zero_rhs = fnorm <= zero_rhs_tol(f.dtype) * fscale.to(fnorm) if fscale is not None else fnorm == 0
    fnorm = torch.where(fnorm > 0, fnorm, torch.ones_like(fnorm))
    if x0 is None:
        x = torch.zeros_like(f)
        xf = torch.zeros_like(fnorm)
        r = f if make_f is not None else f.clone()
    else:
        x = op.project_mean_free(x0.clone().to(f.dtype))
        xf = op.dot(x, f)
        r = op.project_mean_free(f - op.apply(x))
    if make_f is not None:
        f = None                                     # r holds it (or f - K x0)

    def rhs():
        return f if make_f is None else op.project_mean_free(make_f())

    # phi(x0) = -1/2 (x.f + x.r); C_ii(x) |Omega| = energy0 + 2 phi(x)
    phi = -0.5 * (xf + op.dot(x, r))
    z = op.project_mean_free(precond(r))
    p = z.clone()
    rz = op.dot(r, z)
    active = torch.ones(B, dtype=torch.bool, device=dev)
    iters = [0] * B
    decrements = [[] for _ in range(B)]
    history = []
    est = [math.inf] * B
    rel = (op.dot(r, r).sqrt() / fnorm)
    rel0 = rel.clone()
    k = 0

    def done_mask(rel, est_t):
        m = rel <= rtol
        if ctol is not None:
            m = m | (est_t <= ctol)
        return m

    active &= ~done_mask(rel, torch.full((B,), math.inf, dtype=torch.float64, device=dev)) & ~zero_rhs
    if bool(zero_rhs.any()):
        x[zero_rhs] = 0
        r[zero_rhs] = 0
    while bool(active.any()) and k < maxiter:
        q = op.apply(p)
        pq = op.dot(p, q)
        alpha = torch.where(active & (pq > 0), rz / torch.where(pq > 0, pq, torch.ones_like(pq)),
                            torch.zeros_like(rz))
        a = alpha.to(x.dtype)[:, None, None, None, None]
        x.addcmul_(a, p)
        r.addcmul_(a, q, value=-1.0)
        del q
        op.project_mean_free(r)
        phi = phi - 0.5 * alpha * rz
        k += 1
        rel = op.dot(r, r).sqrt() / fnorm
        if true_residual_every and k % true_residual_every == 0 and x.dtype == torch.float64:
            # replace the recursive residual by the true one (rounding drift). Not in
            # float32: there the true residual floors at the storage precision times
            # the conditioning (above rtol at high contrast), while the recursive one
            # keeps converging and the C^H error (energy form) keeps falling with it.
            r = op.apply(x)
            r = op.project_mean_free(torch.sub(rhs(), r, out=r))
        for b in range(B):
            if bool(active[b]):
                iters[b] = k
                decrements[b].append(float(alpha[b] * rz[b]))
                tail = _tail_estimate(decrements[b], conservative=True)
                if energy0 is not None:
                    cii = float(energy0[b] + 2.0 * phi[b])
                    est[b] = tail / cii if cii > 0 else math.inf
                else:
                    est[b] = tail
        est_t = torch.tensor(est, dtype=torch.float64, device=dev)
        history.append((float(rel.max()), float(max(est))))
        if callback is not None:
            callback(k, rel, est_t, x)
        active &= ~done_mask(rel, est_t)
        if not bool(active.any()):
            break
        z = op.project_mean_free(precond(r))
        rz_new = op.dot(r, z)
        beta = torch.where(active, rz_new / torch.where(rz != 0, rz, torch.ones_like(rz)),
                           torch.zeros_like(rz))
        p.mul_(beta.to(x.dtype)[:, None, None, None, None]).add_(z)
        z = None
        rz = torch.where(active, rz_new, rz)
    r = z = p = None
    rtrue = rhs()                                    # PCG's own copy of f, or a new one
    if hasattr(op, "residual_"):
        op.residual_(rtrue, x)                       # f - K x in f's storage: no K x field
    else:
        rtrue.sub_(op.apply(x))
    rtrue = op.project_mean_free(rtrue)
    res = torch.where(zero_rhs, torch.zeros_like(fnorm), op.dot(rtrue, rtrue).sqrt() / fnorm).tolist()
    conv = [not bool(a) for a in active.tolist()]
    energy_err = []
    for b in range(B):
        energy_err.append(_tail_estimate(decrements[b], rho_fallback=_sq_ratio(rel[b], rel0[b])))
    return x, PCGInfo(iterations=iters, residuals=res, converged=conv,
                      energy_error=energy_err, history=history)
