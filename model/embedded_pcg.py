"""Differentiable Jacobi-PCG iterations on the true stiffness K (the CGINS "embedded
PCG"): t steps of the same recurrence as solver/pcg.py, written out-of-place so that
autograd differentiates through alpha_k, beta_k and K p_k.

    x_0 = P x0,  r_0 = P (f - K x_0),  z_0 = P (D^-1 r_0),  p_0 = z_0
    alpha_k = (r_k.z_k) / (p_k.K p_k)
    x_{k+1} = x_k + alpha_k p_k,  r_{k+1} = P (r_k - alpha_k K p_k)
    z_{k+1} = P (D^-1 r_{k+1}),  beta_k = (r_{k+1}.z_{k+1}) / (r_k.z_k)
    p_{k+1} = z_{k+1} + beta_k p_k

P is the mean-free projector per component and load case (the global displacement
constraint, docs/DESIGN.md s.2); with ``project=False`` it is the identity (the WO-GD
ablation: no constraint inside the iteration; K's null space is then left to the
start value). Dot products are float64 (op.dot), as in the solver.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


def mean_free(op, x: torch.Tensor) -> torch.Tensor:
    """x minus its global mean per component per load case (out-of-place version of
    ElasticityOperator.project_mean_free; the mean goes through the Domain)."""
    s = op.domain.sum(torch.sum(x, dim=(-3, -2, -1), dtype=torch.float64))
    return x - (s / op.domain.n_global).to(x.dtype)[..., None, None, None]


def embedded_pcg(op, f: torch.Tensor, x0: torch.Tensor, t: int,
                 precond: Optional[Callable] = None, project: bool = True) -> torch.Tensor:
    """t PCG iterations for K x = f from x0 (B, 3, ...), differentiable w.r.t. x0
    (and f). ``precond(r)`` defaults to Jacobi with op.diagonal(). With rtol = 0 and
    maxiter = t, solver.pcg.pcg returns the same x (tests/test_model_network.py)."""
    P = (lambda v: mean_free(op, v)) if project else (lambda v: v)
    if precond is None:
        dinv = 1.0 / op.diagonal()
        precond = lambda r: r * dinv  # noqa: E731
    f = P(f)
    x = P(x0.to(f.dtype))
    if t <= 0:
        return x
    r = P(f - op.apply(x))
    z = P(precond(r))
    p = z
    rz = op.dot(r, z)
    for k in range(t):
        q = op.apply(p)
        pq = op.dot(p, q)
        pos = pq > 0
        alpha = torch.where(pos, rz / torch.where(pos, pq, torch.ones_like(pq)), torch.zeros_like(rz))
        a = alpha.to(x.dtype)[:, None, None, None, None]
        x = x + a * p
        if k == t - 1:
            break
        r = P(r - a * q)
        z = P(precond(r))
        rz_new = op.dot(r, z)
        nz = rz != 0
        beta = torch.where(nz, rz_new / torch.where(nz, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        p = z + beta.to(x.dtype)[:, None, None, None, None] * p
        rz = rz_new
    return x
