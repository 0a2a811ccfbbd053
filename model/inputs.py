"""Per-voxel network inputs: base material tensor, Fourier position features, and the
soft-voxel padding of the active set.

Material: for an isotropic phase C^b = lambda m m^T + 2 mu I (Mandel form, m = (1,1,1,0,0,0)),
so the 21 upper-triangle Mandel entries are a fixed linear image of (lambda, mu): a
first linear layer sees the same information from either. The default feeds the two
Lame numbers ("lame"); "mandel21" feeds the 21 entries. Both are divided by the
cell's largest P-wave modulus max(lambda + 2 mu), so inputs are O(1) and a soft voxel
(E x 1e-6) reads as ~1e-6.

Position: Fourier features (Tancik et al. 2020) gamma(x) = [sin 2 pi B x, cos 2 pi B x]
of the voxel centre x = (i + 1/2) / n in the unit cube. The rows of B are integer,
so gamma is periodic on the cell by construction. "axis": B = {k e_a : k = 1..m,
a = x, y, z} (6 m features); "random": m rows of round(sigma N(0, I)) from a seeded
generator, zero rows redrawn (2 m features).

Soft padding: active set = solid voxels plus one layer of soft voxels around them
(binary dilation by the 3x3x3 cube with periodic wrap), so that every node of every
solid voxel is the (-,-,-) corner of an active voxel and gets a prediction.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_TRIU = torch.triu_indices(6, 6)


def material_features(lam: torch.Tensor, mu: torch.Tensor, scale: torch.Tensor,
                      kind: str = "lame") -> torch.Tensor:
    """Per-voxel Lame numbers (N,) and the cell's modulus scale (N,) -> (N, C_mat),
    C_mat = 2 ("lame") or 21 ("mandel21": upper triangle of the Mandel C^b)."""
    lam, mu = lam / scale, mu / scale
    if kind == "lame":
        return torch.stack([lam, mu], dim=1)
    if kind == "mandel21":
        m = torch.tensor([1.0, 1, 1, 0, 0, 0], dtype=lam.dtype, device=lam.device)
        C = (lam[:, None, None] * (m[:, None] * m[None, :])
             + 2 * mu[:, None, None] * torch.eye(6, dtype=lam.dtype, device=lam.device))
        return C[:, _TRIU[0], _TRIU[1]]
    raise ValueError(f"material features must be 'lame' or 'mandel21', got {kind!r}")


def modulus_scale(lam: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Largest P-wave modulus lambda + 2 mu of each cell (B, n_x, n_y, n_z) -> (B,)."""
    return (lam + 2 * mu).amax(dim=(-3, -2, -1))


def n_material_features(kind: str) -> int:
    return {"lame": 2, "mandel21": 21}[kind]


def fourier_matrix(mode: str, n_freq: int, scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    """Integer frequency matrix B (m, 3), float64."""
    if mode == "axis":
        rows = [k * torch.eye(3, dtype=torch.float64)[a] for k in range(1, n_freq + 1) for a in range(3)]
        return torch.stack(rows)
    if mode == "random":
        g = torch.Generator().manual_seed(int(seed))
        out = []
        while len(out) < n_freq:
            b = torch.round(scale * torch.randn(3, generator=g, dtype=torch.float64))
            if b.abs().sum() > 0:
                out.append(b)
        return torch.stack(out)
    raise ValueError(f"Fourier mode must be 'axis' or 'random', got {mode!r}")


def fourier_features(Bmat: torch.Tensor, coords: torch.Tensor, shape) -> torch.Tensor:
    """gamma(x) at the centres of the voxels ``coords`` (N, 3): (N, 2 m), float64."""
    n = torch.tensor(shape, dtype=torch.float64, device=coords.device)
    X = (coords.to(torch.float64) + 0.5) / n
    phase = 2 * torch.pi * X @ Bmat.to(device=coords.device, dtype=torch.float64).T
    return torch.cat([torch.sin(phase), torch.cos(phase)], dim=1)


def periodic_dilation(mask: torch.Tensor, layers: int = 1) -> torch.Tensor:
    """Binary dilation of (B, n_x, n_y, n_z) by the 3x3x3 cube, periodic wrap."""
    m = mask[:, None].to(torch.float32)
    for _ in range(layers):
        m = F.max_pool3d(F.pad(m, (1, 1, 1, 1, 1, 1), mode="circular"), 3, stride=1)
    return m[:, 0] > 0


def solid_mask(mu: torch.Tensor, threshold: float = 1e-3) -> torch.Tensor:
    """Solid voxels of a cell given its shear modulus field (B, ...): mu above
    threshold x max(mu) (the soft void is 1e-6 x)."""
    return mu > threshold * mu.amax(dim=(-3, -2, -1), keepdim=True)
