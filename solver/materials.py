"""Isotropic materials and tensor notation.

Voigt order 11, 22, 33, 23, 13, 12 with engineering shear strains (gamma_23 =
2 eps_23, ...). Mandel order is the same with sqrt(2) on the shear rows/columns, so
that Mandel 6x6 matrices are tensors (eigenvalues, norms, PSD layers). Convert
explicitly with the functions below.
"""
from __future__ import annotations

import numpy as np

SQRT2 = np.sqrt(2.0)
#: Voigt index -> (i, j) tensor indices
VOIGT_PAIRS = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))
_MANDEL_SCALE = np.array([1.0, 1.0, 1.0, SQRT2, SQRT2, SQRT2])


def lame(E, nu):
    """Lame parameters (lambda, mu) of an isotropic material."""
    E = np.asarray(E, dtype=np.float64)
    nu = np.asarray(nu, dtype=np.float64)
    lam = E * nu / ((1.0 + nu) * (1.0 - 2.0 * nu))
    mu = E / (2.0 * (1.0 + nu))
    return lam, mu


def isotropic_voigt(E: float, nu: float) -> np.ndarray:
    """6x6 Voigt stiffness C(E, nu) = lambda m m^T + mu diag(2,2,2,1,1,1)."""
    lam, mu = lame(E, nu)
    m = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    return lam * np.outer(m, m) + mu * np.diag([2.0, 2.0, 2.0, 1.0, 1.0, 1.0])


def voigt_to_mandel(C: np.ndarray) -> np.ndarray:
    """Stiffness (engineering-shear Voigt) -> Mandel."""
    return C * np.outer(_MANDEL_SCALE, _MANDEL_SCALE)


def mandel_to_voigt(M: np.ndarray) -> np.ndarray:
    return M / np.outer(_MANDEL_SCALE, _MANDEL_SCALE)


def voigt_to_tensor4(C: np.ndarray) -> np.ndarray:
    """Voigt stiffness -> 4th-order tensor C_ijkl (minor and major symmetric)."""
    T = np.zeros((3, 3, 3, 3))
    for I, (i, j) in enumerate(VOIGT_PAIRS):
        for J, (k, l) in enumerate(VOIGT_PAIRS):
            for a, b in ((i, j), (j, i)):
                for c, d in ((k, l), (l, k)):
                    T[a, b, c, d] = C[I, J]
    return T


def tensor4_to_voigt(T: np.ndarray) -> np.ndarray:
    C = np.empty((6, 6))
    for I, (i, j) in enumerate(VOIGT_PAIRS):
        for J, (k, l) in enumerate(VOIGT_PAIRS):
            C[I, J] = T[i, j, k, l]
    return C


def rotate_voigt(C: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Stiffness of the material rotated by R: C'_ijkl = R_ia R_jb R_kc R_ld C_abcd."""
    T = voigt_to_tensor4(C)
    return tensor4_to_voigt(np.einsum("ia,jb,kc,ld,abcd->ijkl", R, R, R, R, T))


def unit_strain_tensor(i: int) -> np.ndarray:
    """Strain tensor of the i-th unit Voigt strain (engineering shear: eps_23 = 1/2)."""
    a, b = VOIGT_PAIRS[i]
    e = np.zeros((3, 3))
    if a == b:
        e[a, a] = 1.0
    else:
        e[a, b] = e[b, a] = 0.5
    return e


ENGINEERING_KEYS = ("E1", "E2", "E3", "G23", "G13", "G12", "nu12", "nu13", "nu23",
                    "nu21", "nu31", "nu32", "bulk_modulus", "zener_ratio")


def engineering_constants(C: np.ndarray) -> dict:
    """Engineering constants from a Voigt stiffness (compliance S = C^-1).

    nu_ij = -S_ji / S_ii is the contraction along j under uniaxial stress along i.
    The Zener ratio 2 <C44> / (<C11> - <C12>) uses the means over the three axes
    (exact for cubic symmetry). The bulk modulus is the Reuss one, 1 / sum(S[:3,:3]).
    """
    S = np.linalg.inv(C)
    out = {
        "E1": 1.0 / S[0, 0], "E2": 1.0 / S[1, 1], "E3": 1.0 / S[2, 2],
        "G23": 1.0 / S[3, 3], "G13": 1.0 / S[4, 4], "G12": 1.0 / S[5, 5],
        "nu12": -S[0, 1] / S[0, 0], "nu13": -S[0, 2] / S[0, 0], "nu23": -S[1, 2] / S[1, 1],
        "nu21": -S[1, 0] / S[1, 1], "nu31": -S[2, 0] / S[2, 2], "nu32": -S[2, 1] / S[2, 2],
        "bulk_modulus": 1.0 / S[:3, :3].sum(),
    }
    c11 = np.mean([C[0, 0], C[1, 1], C[2, 2]])
    c12 = np.mean([C[0, 1], C[0, 2], C[1, 2]])
    c44 = np.mean([C[3, 3], C[4, 4], C[5, 5]])
    out["zener_ratio"] = 2.0 * c44 / (c11 - c12) if c11 != c12 else float("inf")
    return {k: float(v) for k, v in out.items()}


def phase_lame(E, nu, soft: float = 1e-6, present=None):
    """Per-phase (lambda, mu) with void phases (E == 0) replaced by the soft material
    E_soft = soft * max(E), keeping that phase's nu (docs/DESIGN.md section 2). The max runs
    over the phases ``present`` in the cell (a boolean mask per phase; default all): a
    listed phase that no voxel uses must not change C^H through the void."""
    E = np.asarray(E, dtype=np.float64).copy()
    nu = np.asarray(nu, dtype=np.float64)
    used = E if present is None else E[np.asarray(present, dtype=bool)[:E.size]]
    Emax = float(used.max()) if used.size and used.max() > 0 else float(E.max())   # all-void: the listed max
    E[E == 0] = soft * Emax
    return lame(E, nu)


def phases_present(phases, n_phases: int) -> np.ndarray:
    """Boolean mask (n_phases,): which phase ids occur in ``phases``."""
    ids = np.unique(np.asarray(phases))
    out = np.zeros(n_phases, dtype=bool)
    out[ids[(ids >= 0) & (ids < n_phases)].astype(np.int64)] = True
    return out


def voigt_reuss_bounds(volume_fractions, E, nu, soft: float = 1e-6):
    """Voigt (arithmetic) and Reuss (harmonic) bounds of the effective stiffness
    for the given phase volume fractions (void as the soft material)."""
    lam, mu = phase_lame(E, nu, soft, present=np.asarray(volume_fractions) > 0)
    Cs = [lam_p * np.outer([1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]) + mu_p * np.diag([2, 2, 2, 1, 1, 1.0])
          for lam_p, mu_p in zip(lam, mu)]
    f = np.asarray(volume_fractions, dtype=np.float64)
    CV = sum(fp * Cp for fp, Cp in zip(f, Cs))
    CR = np.linalg.inv(sum(fp * np.linalg.inv(Cp) for fp, Cp in zip(f, Cs)))
    return CV, CR
