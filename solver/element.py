"""Trilinear hexahedron (Q1, 8 nodes) on a voxel of size h = (h_x, h_y, h_z).

Local node a = 4 a_x + 2 a_y + a_z for corner offsets a_x, a_y, a_z in {0, 1}, so a
voxel (i, j, k) has nodes (i + a_x, j + a_y, k + a_z); element dof 3 a + c.
For an isotropic material C = lambda m m^T + mu diag(2,2,2,1,1,1), so

    k_e = integral B^T C B dV = lambda_e K_lambda + mu_e K_mu,

with K_lambda, K_mu fixed 24x24 matrices (exact 2x2x2 Gauss quadrature). The solver
stores only (lambda, mu) per voxel.
"""
from __future__ import annotations

import itertools

import numpy as np

from .materials import unit_strain_tensor

#: corner offsets (a_x, a_y, a_z) in local node order
CORNERS = np.array(list(itertools.product((0, 1), repeat=3)), dtype=np.int64)

_GAUSS = 0.5 + np.array([-0.5, 0.5]) / np.sqrt(3.0)   # 2-point rule on [0, 1]


def shape_gradients(xi, h) -> np.ndarray:
    """dN_a/dx at reference point xi in [0,1]^3: array (8, 3)."""
    h = np.asarray(h, dtype=np.float64)
    g = np.empty((8, 3))
    for a, off in enumerate(CORNERS):
        # 1-D factors: N = xi if off == 1 else 1 - xi
        f = [xi[d] if off[d] else 1.0 - xi[d] for d in range(3)]
        df = [1.0 if off[d] else -1.0 for d in range(3)]
        g[a, 0] = df[0] * f[1] * f[2] / h[0]
        g[a, 1] = f[0] * df[1] * f[2] / h[1]
        g[a, 2] = f[0] * f[1] * df[2] / h[2]
    return g


def strain_displacement(xi, h) -> np.ndarray:
    """B (6, 24): Voigt strain (engineering shear) from element dofs."""
    g = shape_gradients(xi, h)
    B = np.zeros((6, 24))
    for a in range(8):
        gx, gy, gz = g[a]
        c = 3 * a
        B[0, c] = gx
        B[1, c + 1] = gy
        B[2, c + 2] = gz
        B[3, c + 1], B[3, c + 2] = gz, gy      # gamma_23
        B[4, c + 0], B[4, c + 2] = gz, gx      # gamma_13
        B[5, c + 0], B[5, c + 1] = gy, gx      # gamma_12
    return B


def gauss_points():
    """(point, weight) pairs of the 2x2x2 rule on [0,1]^3 (weights sum to 1)."""
    for p in itertools.product(_GAUSS, repeat=3):
        yield np.array(p), 0.125


def lame_stiffness_matrices(h=(1.0, 1.0, 1.0)):
    """(K_lambda, K_mu), each (24, 24), so that k_e = lambda K_lambda + mu K_mu."""
    h = np.asarray(h, dtype=np.float64)
    vol = float(np.prod(h))
    m = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    D_mu = np.diag([2.0, 2.0, 2.0, 1.0, 1.0, 1.0])
    K_lam = np.zeros((24, 24))
    K_mu = np.zeros((24, 24))
    for xi, w in gauss_points():
        B = strain_displacement(xi, h)
        Bm = m @ B
        K_lam += w * vol * np.outer(Bm, Bm)
        K_mu += w * vol * B.T @ D_mu @ B
    return K_lam, K_mu


def element_stiffness(lam: float, mu: float, h=(1.0, 1.0, 1.0)) -> np.ndarray:
    K_lam, K_mu = lame_stiffness_matrices(h)
    return lam * K_lam + mu * K_mu


def affine_element_displacements(h=(1.0, 1.0, 1.0)) -> np.ndarray:
    """chi0 on one element for the six unit Voigt strains: array (6, 24),
    u0^i(x) = eps^i . x at the corners x_a = a * h (local coordinates; k_e
    annihilates the translation that global coordinates would add)."""
    h = np.asarray(h, dtype=np.float64)
    U = np.zeros((6, 24))
    for i in range(6):
        eps = unit_strain_tensor(i)
        for a, off in enumerate(CORNERS):
            U[i, 3 * a:3 * a + 3] = eps @ (off * h)
    return U
