"""Label-free CGINS loss: minimum potential energy on every level plus a mean penalty.

For one cell and load case i the potential energy of a displacement fluctuation u is

    Pi(u) = 1/2 u.K u - u.f^i                                            (1)

minimised by the solution chi^i, where Pi(chi^i) = -1/2 f^i.chi^i and
|Omega| C^H_ii = |Omega| <C>_ii + 2 Pi(chi^i) (the energy form of DESIGN.md s.2), so
(1) is the C^H_ii error up to a constant: Pi(u) - Pi(chi) = 1/2 ||u - chi||_K^2.

Coarse level l uses the Galerkin operator K^l = R^l K P^l and load f^l = R^l f
(R = P^T, model/transfer.py), hence

    Pi^l(v) = 1/2 v.K^l v - v.f^l = Pi(P^l v),                           (2)

evaluated matrix-free on the fine grid (``galerkin_energy`` spells out the left side
for the tests). The network output handed to the loss on level l is already P^l u~^l
(CGINSOutput.levels).

    loss = mean over cells [ sum_l w_l sum_i Pi(u_l^i) / |Omega|
                             + gamma sum_{i,c} (mean u_l^{i,c} / L)^2 ]

with the fine level (l = 0) taken after the embedded PCG steps, L the cell length.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from .transfer import prolongate, restrict


def potential_energy(op, u: torch.Tensor, f: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pi(u) of eq. (1) per load case, (B,) float64; ``f`` defaults to op.rhs()."""
    if f is None:
        f = op.rhs()
    return 0.5 * op.dot(u, op.apply(u)) - op.dot(u, f)


def galerkin_energy(op, v: torch.Tensor, level: int, f: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Left side of eq. (2): 1/2 v.(R^l K P^l v) - v.(R^l f) for a coarse field v
    (B, 3, n/2^l ...), float64 (serial domains)."""
    if f is None:
        f = op.rhs()
    Kv = restrict(op.apply(prolongate(v, level)), level)
    fl = restrict(f, level)
    dot = lambda a, b: torch.sum(a * b, dim=(1, 2, 3, 4), dtype=torch.float64)  # noqa: E731
    return 0.5 * dot(v, Kv) - dot(v, fl)


@dataclasses.dataclass
class LossConfig:
    level_weights: Sequence[float] = (1.0, 0.5, 0.25)   # w_0 (fine, after PCG), w_1, w_2
    mean_penalty: float = 1.0                           # gamma

    @classmethod
    def from_dict(cls, d: dict) -> "LossConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown loss config keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


def cgins_loss(ops: Sequence, out, cfg: Optional[LossConfig] = None):
    """Loss (scalar, float64) and its parts (dict of floats) for a CGINSOutput."""
    cfg = cfg or LossConfig()
    fields = [out.u] + list(out.levels)
    if len(cfg.level_weights) < len(fields):
        raise ValueError(f"need {len(fields)} level weights, got {list(cfg.level_weights)}")
    total = 0.0
    parts = {f"energy_{l}": 0.0 for l in range(len(fields))}
    parts["mean_penalty"] = 0.0
    for b, op in enumerate(ops):
        f = op.rhs()
        L = max(h * n for h, n in zip(op.h, op.domain.global_shape))
        for l, U in enumerate(fields):
            e = potential_energy(op, U[b], f).sum() / op.volume
            m = op.domain.sum(torch.sum(U[b], dim=(-3, -2, -1), dtype=torch.float64)) / op.domain.n_global
            pen = (m / L).pow(2).sum()
            total = total + cfg.level_weights[l] * e + cfg.mean_penalty * pen
            parts[f"energy_{l}"] += float(e.detach()) / len(ops)
            parts["mean_penalty"] += float(pen.detach()) / len(ops)
    loss = total / len(ops)
    parts["loss"] = float(loss.detach())
    return loss, parts
