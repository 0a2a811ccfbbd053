"""The unit cell: a periodic voxel grid of phase ids plus isotropic phase materials.

Schema (docs/DESIGN.md section 4): ``phases`` is (n_x, n_y, n_z) uint8/uint16, array index
order [x, y, z]; ``E[p]`` and ``nu[p]`` are the Young's modulus and Poisson ratio of
phase p; ``E[p] == 0`` marks void (replaced by a soft material in the solver).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np


class CellError(ValueError):
    """A cell that cannot be homogenized; ``str(err)`` is one line for the user."""


def json_default(o):
    """json.dumps hook: numpy arrays and scalars as plain lists and numbers."""
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


@dataclasses.dataclass
class Cell:
    """phases (n_x, n_y, n_z) phase ids; E, nu (P,) per phase; size (3,) physical edge lengths;
    name, generator and params (JSON-serializable) describe where the cell came from."""
    phases: np.ndarray
    E: np.ndarray
    nu: np.ndarray
    size: tuple = (1.0, 1.0, 1.0)
    name: str = ""
    generator: str = ""
    params: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.E = np.atleast_1d(np.asarray(self.E, dtype=np.float64))
        self.nu = np.atleast_1d(np.asarray(self.nu, dtype=np.float64))
        self.size = tuple(float(s) for s in np.broadcast_to(np.asarray(self.size, dtype=np.float64), (3,)))
        ph = np.asarray(self.phases)
        if ph.dtype.kind in "iu" and ph.size and ph.min() >= 0 and ph.max() < 65536:
            ph = ph.astype(np.uint8 if ph.max() < 256 else np.uint16, copy=False)
        self.phases = ph

    @property
    def shape(self) -> tuple:
        return tuple(self.phases.shape)

    @property
    def n_phases(self) -> int:
        return int(self.E.shape[0])

    @property
    def solid_mask(self) -> np.ndarray:
        """True where the voxel's phase is not void (E > 0)."""
        return (self.E > 0)[self.phases]

    @property
    def volume_fraction(self) -> float:
        """Fraction of non-void voxels."""
        return float(self.solid_mask.mean())

    def validate(self) -> "Cell":
        """Raise CellError (one line) if the cell cannot be homogenized."""
        ph = self.phases
        if ph.ndim != 3:
            raise CellError(f"phases must be a 3-D array, got {ph.ndim}-D with shape {ph.shape}")
        if ph.size == 0 or min(ph.shape) < 1:
            raise CellError(f"phases is empty (shape {ph.shape})")
        if ph.dtype.kind not in "iu":
            raise CellError(f"phases must be integer phase ids, got dtype {ph.dtype}")
        if int(ph.min()) < 0:
            raise CellError(f"phase ids must be >= 0, found {int(ph.min())}")
        if self.E.shape != self.nu.shape or self.E.ndim != 1:
            raise CellError(f"materials/E and materials/nu must have the same length, got {self.E.shape} and {self.nu.shape}")
        if not (np.all(np.isfinite(self.E)) and np.all(np.isfinite(self.nu))):
            raise CellError("materials contain NaN or inf")
        if not all(np.isfinite(s) and s > 0 for s in self.size):
            raise CellError(f"cell size must be positive and finite, got {self.size}")
        pmax = int(ph.max())
        if int(ph.min()) < 0 or pmax >= self.n_phases:
            raise CellError(f"phase id {pmax} has no material (materials given for {self.n_phases} phases: 0..{self.n_phases - 1})")
        used = np.unique(ph)
        for p in used:
            E, nu = self.E[p], self.nu[p]
            if E < 0:
                raise CellError(f"phase {p}: E = {E:g} must be > 0 (or 0 for void)")
            if not (-1.0 < nu < 0.5):
                raise CellError(f"phase {p}: nu = {nu:g} must lie in (-1, 0.5)")
        if not np.any(self.E[used] > 0):
            raise CellError("the cell is all void: no phase with E > 0 is present")
        return self

    def summary(self) -> str:
        """One line: shape, phases, solid volume fraction, generator."""
        shape = " x ".join(str(s) for s in self.shape)
        gen = f", {self.generator}" if self.generator else ""
        name = f"{self.name}: " if self.name else ""
        return (f"{name}{shape} voxels, {self.n_phases} phases, "
                f"volume fraction {self.volume_fraction:.4f}{gen}")

    def params_json(self) -> str:
        """The generator parameters as a JSON string (TypeError if they are not serializable)."""
        return json.dumps(self.params, default=json_default)

    def attrs(self) -> dict[str, Any]:
        return {"size": np.asarray(self.size), "name": self.name, "generator": self.generator,
                "params": dict(self.params)}
