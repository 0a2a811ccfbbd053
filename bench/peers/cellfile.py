"""The cell file the peer runners read: a plain .npz (numpy only, so the muGrid
runner can read it from its own venv with numpy 2).

    phases  uint8/uint16 (n_x, n_y, n_z)   phase id per voxel (0 = void when E = 0)
    E, nu   float64 (P,)                   phase materials as given
    lam, mu float64 (P,)                   Lame parameters with void -> soft * E_max
    size    float64 (3,)                   cell edge lengths
    soft    float64 ()                     the soft-void factor used for lam, mu
"""
from __future__ import annotations

import types

import numpy as np


def write_cell(path: str, cell, soft: float = 1e-6) -> None:
    from solver.materials import phase_lame, phases_present
    lam, mu = phase_lame(cell.E, cell.nu, soft, present=phases_present(cell.phases, len(cell.E)))
    np.savez(path, phases=np.asarray(cell.phases), E=np.asarray(cell.E, dtype=np.float64),
             nu=np.asarray(cell.nu, dtype=np.float64), lam=lam, mu=mu,
             size=np.asarray(cell.size, dtype=np.float64), soft=np.float64(soft))


def read_cell(path: str):
    """A Cell-like namespace (phases, E, nu, size) and the soft factor."""
    d = np.load(path)
    cell = types.SimpleNamespace(phases=d["phases"], E=d["E"], nu=d["nu"],
                                 size=tuple(float(s) for s in d["size"]))
    return cell, float(d["soft"])
