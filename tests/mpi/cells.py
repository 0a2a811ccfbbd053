"""Deterministic test cells built with numpy only (shared by the MPI scripts and tests)."""
from __future__ import annotations

import numpy as np

from microstructures.cell import Cell


def gyroid_phases(shape, t: float = 0.6) -> np.ndarray:
    """Gyroid sheet: solid (1) where |sin x cos y + sin y cos z + sin z cos x| < t at voxel
    centres, void (0) elsewhere; one period per cell edge."""
    ax = [2 * np.pi * (np.arange(n) + 0.5) / n for n in shape]
    x, y, z = np.meshgrid(*ax, indexing="ij")
    f = np.sin(x) * np.cos(y) + np.sin(y) * np.cos(z) + np.sin(z) * np.cos(x)
    return (np.abs(f) < t).astype(np.uint8)


def gyroid_cell(shape, t: float = 0.6) -> Cell:
    """Two-phase gyroid sheet cell with void (E = 0) phase 0."""
    return Cell(phases=gyroid_phases(shape, t), E=[0.0, 1.0], nu=[0.3, 0.3], size=(1.0, 1.0, 1.0))


def random_three_phase_cell(shape, seed: int = 0) -> Cell:
    """Random voxels of void, a stiff and a soft phase (a hard case for block boundaries)."""
    rng = np.random.default_rng(seed)
    ph = rng.choice(3, size=shape, p=[0.2, 0.5, 0.3]).astype(np.uint8)
    return Cell(phases=ph, E=[0.0, 10.0, 1.0], nu=[0.3, 0.25, 0.35], size=(1.0, 1.2, 0.9))


def write_h5(path, cell: Cell):
    import h5py
    with h5py.File(path, "w") as f:
        f["phases"] = cell.phases
        f["materials/E"] = cell.E
        f["materials/nu"] = cell.nu
        f.attrs["size"] = np.asarray(cell.size)
