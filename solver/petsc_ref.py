"""PETSc reference and fallback solver: the same periodic hex8 system, assembled.

An independent path on purpose (docs/DESIGN.md s.3): it shares only the element
matrices (solver/element.py) and the soft-void rule (solver/materials.py) with the
matrix-free code, and solves with PETSc's KSP (CG) and GAMG or Jacobi.

Grid and ordering
-----------------
The nodes live on a periodic 3-D DMDA (dof 3, box stencil of width 1). The DMDA's
first axis (the fastest-varying one in PETSc's natural ordering) is our z axis and
its last is our x, so the DMDA natural ordering of dof c at node (i, j, k) is

    3 * ((i * n_y + j) * n_z + k) + c,

exactly solver/assembled.py's ordering. On one rank PETSc's global ordering is the
natural one; on several ranks ``dm.getAO()`` maps between them.

Each rank owns a block of nodes; voxel (i, j, k) belongs to the owner of its
(-,-,-) corner node (i, j, k), so its element touches owned nodes and the
high-side ghost layer only. Element matrices k_e = lambda_e K_lambda + mu_e K_mu
(element dof 3 a + c, local node a = 4 a_x + 2 a_y + a_z) are inserted in batches
of voxels with MatSetValuesBlockedLocal (``setValuesBlockedLocalRCV``: one call per
batch, the loop over elements runs in C), ADD_VALUES.

System and C^H
--------------
K chi^i = f^i, f^i = sum_e k_e chi0^i_e (docs/DESIGN.md s.2). K is singular with the
three rigid translations as null space: they are attached to K (MatNullSpace,
orthonormal constant vectors per component) and removed from every f^i and chi^i.
GAMG additionally gets the six rigid-body modes (translations and rotations built
from the nodal coordinates) as near-null space. On a periodic cell the rotations are
not periodic (they jump across the wrap), so they are not in K's kernel globally; they
are still the local low-energy modes that smoothed aggregation wants on each
aggregate, which is what the near-null space is for (``near_null='translations'``
keeps only the translations).

C^H is evaluated with global PETSc products only (no gather):

    |Omega| C_ij = |Omega| <C>_ij - f^i.chi^j - f^j.chi^i + chi^i.K chi^j

which equals the element energy form sum_e (chi0^i - chi^i)_e^T k_e (chi0^j - chi^j)_e
(solver/operator.py ``ElasticityOperator.chom``).

GAMG trap
---------
PETSc 3.18 GAMG at a void contrast of 1e-6 is fragile in its Chebyshev smoother
bounds: the smoother amplifies every mode above the estimated lambda_max, and an
underestimate makes the V-cycle indefinite. Measured on 14^3-24^3 gyroids and two
strut lattices: with the smoothed-aggregation estimate (-pc_gamg_use_sa_esteig true),
or a 10-step GMRES estimate with the default safety factor 1.1, or a tighter 1.05,
CG stops with DIVERGED_INDEFINITE_PC after 3-5 iterations (one lattice failed with
PETSc's own defaults); a CG estimate (-mg_levels_esteig_ksp_type cg) stagnated
(> 300 iterations) on a gyroid. GAMG_DEFAULTS below (per-level 30-step GMRES
estimate, bounds [0.1, 1.2] x lambda_max, SA estimate off) converged on all of them,
on 1 and 2 ranks, in 23-68 iterations at rtol 1e-8. Every load case's converged
reason is checked: DIVERGED_MAX_IT makes the result not converged, any other negative
one raises ``PetscSolveError`` with its name.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Optional, Sequence, Union

import numpy as np

from .element import CORNERS, affine_element_displacements, lame_stiffness_matrices
from .homogenize import HomogenizationResult
from .materials import phase_lame, phases_present

log = logging.getLogger(__name__)

#: options set under the solver's prefix unless the user or the command line sets them
GAMG_DEFAULTS = {
    "pc_gamg_use_sa_esteig": "false",
    "mg_levels_ksp_type": "chebyshev",
    "mg_levels_pc_type": "jacobi",
    "mg_levels_esteig_ksp_type": "gmres",
    "mg_levels_esteig_ksp_max_it": "30",
    "mg_levels_ksp_chebyshev_esteig": "0,0.1,0,1.2",
}

#: preconditioner name in the result (HomogenizationResult.preconditioner)
_PC_NAMES = {"gamg": "gamg", "jacobi": "jacobi"}

#: voxels per MatSetValuesBlockedLocal batch (bounds the (batch, 24, 24) temporary)
_BATCH = 4096


class PetscSolveError(RuntimeError):
    """A KSP solve that did not converge (negative KSPConvergedReason)."""


def _petsc():
    try:
        from petsc4py import PETSc
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError("petsc4py is not installed: apt-get install python3-petsc4py openmpi-bin "
                          f"(and use a venv with --system-site-packages): {exc}") from None
    return PETSc


def reason_name(reason: int) -> str:
    """KSPConvergedReason code -> its name (e.g. -8 -> 'DIVERGED_INDEFINITE_PC')."""
    PETSc = _petsc()
    for k, v in vars(PETSc.KSP.ConvergedReason).items():
        if not k.startswith("_") and isinstance(v, int) and v == reason and k.upper() == k:
            return k
    return str(reason)


def _as_comm(comm):
    PETSc = _petsc()
    if comm is None:
        return PETSc.COMM_WORLD
    if isinstance(comm, PETSc.Comm):
        return comm
    return PETSc.Comm(comm)                      # an mpi4py communicator


def _parse_options(options) -> dict:
    """dict {'pc_gamg_threshold': 0.01} or list ['-ksp_monitor', '-pc_gamg_threshold', '0.01']
    (also '-key=value') -> {key: str value} without the leading dash."""
    if options is None:
        return {}
    if isinstance(options, dict):
        return {str(k).lstrip("-"): ("" if v is None else str(v)) for k, v in options.items()}
    out, key = {}, None
    for tok in ([options] if isinstance(options, str) else list(options)):
        for t in str(tok).split():
            if t.startswith("-") and not _is_number(t):
                if "=" in t:
                    k, v = t.split("=", 1)
                    out[k.lstrip("-")] = v
                    key = None
                else:
                    key = t.lstrip("-")
                    out[key] = ""
            elif key is not None:
                out[key] = t
                key = None
            else:
                raise ValueError(f"PETSc option value {t!r} without an option name")
    return out


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


class _CellBlock:
    """The rank's block of a cell: global shape, size, materials and owned phases."""

    def __init__(self, shape, size, E, nu, phases_block):
        self.shape, self.size = tuple(int(n) for n in shape), tuple(float(s) for s in size)
        self.E, self.nu = np.asarray(E, dtype=np.float64), np.asarray(nu, dtype=np.float64)
        self.phases = phases_block


def _cell_header(cell):
    """(global shape, size, E, nu, reader(slices) -> phases block) for a Cell or the
    path of a cell file; from a path, each rank reads only its block of /phases."""
    if isinstance(cell, (str, os.PathLike)):
        path = os.fspath(cell)
        try:
            from microstructures.io import read_header, read_phases_block
        except ImportError:                       # the I/O module not there: plain h5py
            return _h5_header(path)
        head = read_header(path)
        if head["E"] is None:
            raise ValueError(f"{path}: the file has no /materials; pass a Cell instead")

        def read(sl):
            return read_phases_block(path, [s.start for s in sl], [s.stop for s in sl])
        return head["shape"], head["size"], head["E"], head["nu"], read
    phases = np.asarray(cell.phases)
    return phases.shape, tuple(cell.size), cell.E, cell.nu, lambda sl: phases[sl]


def _h5_header(path):
    """_cell_header for an HDF5 cell (docs/DESIGN.md s.4) read with h5py directly."""
    import h5py
    with h5py.File(path, "r") as f:
        shape = f["phases"].shape
        E, nu = f["materials/E"][()], f["materials/nu"][()]
        size = tuple(np.broadcast_to(np.asarray(f.attrs.get("size", (1.0, 1.0, 1.0)),
                                                dtype=np.float64).ravel(), (3,)))

    def read(sl):                                 # h5py reads only the hyperslab
        with h5py.File(path, "r") as f:
            return f["phases"][sl]
    return shape, size, E, nu, read


class PetscSystem:
    """The assembled periodic system on a DMDA: K, f^i (6 Vecs), null spaces.

    Axes in this class are ours ([x, y, z]); ``self.ranges`` are the owned node
    (= voxel) ranges and ``self.ghost_ranges`` the ghosted ones, per our axis.
    """

    def __init__(self, cell, soft: float = 1e-6, comm=None, near_null: str = "rigid"):
        PETSc = _petsc()
        self.comm = _as_comm(comm)
        shape, size, E, nu, read = _cell_header(cell)
        self.shape = tuple(int(n) for n in shape)
        self.size = tuple(float(s) for s in size)
        if min(self.shape) < 3:
            raise ValueError(f"the PETSc path needs at least 3 voxels per axis, got {self.shape}")
        self.h = tuple(s / n for s, n in zip(self.size, self.shape))
        self.n_global = int(np.prod(self.shape))
        self.volume = float(np.prod(self.size))
        nx, ny, nz = self.shape
        P = PETSc.DM.BoundaryType.PERIODIC
        # DMDA axis 0 (fastest) = our z, axis 2 = our x: natural ordering == ours
        self.dm = PETSc.DMDA().create(dim=3, dof=3, sizes=(nz, ny, nx), boundary_type=(P, P, P),
                                      stencil_type=PETSc.DMDA.StencilType.BOX, stencil_width=1,
                                      comm=self.comm, setup=False)
        self.dm.setUp()
        self.ranges = tuple(reversed(self.dm.getRanges()))
        self.ghost_ranges = tuple(reversed(self.dm.getGhostRanges()))
        self.proc_sizes = tuple(reversed(self.dm.getProcSizes()))
        sl = tuple(slice(a, b) for a, b in self.ranges)
        pid = np.asarray(read(sl)).astype(np.int64)
        present = phases_present(pid, len(np.atleast_1d(E))).astype(np.int64)
        if self.comm.getSize() > 1:
            from mpi4py import MPI                      # petsc4py's MPI is mpi4py's
            self.comm.tompi4py().Allreduce(MPI.IN_PLACE, present, op=MPI.MAX)
        lam_p, mu_p = phase_lame(E, nu, soft, present=present > 0)      # the soft E from the phases used
        self.lam, self.mu = lam_p[pid], mu_p[pid]                     # owned voxels
        self.K_lam, self.K_mu = lame_stiffness_matrices(self.h)
        self.U0 = affine_element_displacements(self.h)                 # (6, 24)
        self.A = self._assemble_matrix()
        self.f, self.fscale = self._assemble_rhs()
        self.nullspace = self._translations()
        self.A.setNullSpace(self.nullspace)
        for fi in self.f:
            self.nullspace.remove(fi)
        self.near_null = near_null
        if near_null == "rigid":
            self.A.setNearNullSpace(PETSc.NullSpace().createRigidBody(self._coordinates()))
        elif near_null == "translations":
            self.A.setNearNullSpace(self.nullspace)
        else:
            raise ValueError(f"near_null must be 'rigid' or 'translations', got {near_null!r}")

    # -- index helpers ----------------------------------------------------------
    @property
    def local_shape(self):
        return tuple(b - a for a, b in self.ranges)

    @property
    def ghost_shape(self):
        return tuple(b - a for a, b in self.ghost_ranges)

    def _corner_local_nodes(self) -> np.ndarray:
        """(n_owned_voxels, 8) ghosted-local node indices of each owned voxel's corners."""
        (xs, _), (ys, _), (zs, _) = self.ranges
        (gx, _), (gy, _), (gz, _) = self.ghost_ranges
        _, gny, gnz = self.ghost_shape
        lx, ly, lz = self.local_shape
        i, j, k = np.meshgrid(np.arange(lx) + xs - gx, np.arange(ly) + ys - gy,
                              np.arange(lz) + zs - gz, indexing="ij")
        nodes = np.empty((lx * ly * lz, 8), dtype=PETSc_int())
        for a, (ax, ay, az) in enumerate(CORNERS):
            nodes[:, a] = (((i + ax) * gny + (j + ay)) * gnz + (k + az)).ravel()
        return nodes

    # -- assembly ---------------------------------------------------------------
    def _assemble_matrix(self):
        PETSc = _petsc()
        A = self.dm.createMatrix()
        A.setOption(PETSc.Mat.Option.NEW_NONZERO_ALLOCATION_ERR, True)
        nodes = self._corner_local_nodes()
        lam, mu = self.lam.ravel(), self.mu.ravel()
        for s in range(0, nodes.shape[0], _BATCH):
            e = slice(s, s + _BATCH)
            ke = lam[e, None, None] * self.K_lam + mu[e, None, None] * self.K_mu
            A.setValuesBlockedLocalRCV(nodes[e], nodes[e], ke.reshape(ke.shape[0], -1),
                                       addv=PETSc.InsertMode.ADD_VALUES)
        A.assemble()
        return A

    def _voxel_to_global(self, ve: np.ndarray):
        """Assemble per-voxel element vectors ve (B, 24, l_x, l_y, l_z) into B global Vecs."""
        PETSc = _petsc()
        lx, ly, lz = self.local_shape
        (xs, _), (ys, _), (zs, _) = self.ranges
        (gx, _), (gy, _), (gz, _) = self.ghost_ranges
        ox, oy, oz = xs - gx, ys - gy, zs - gz
        out = []
        for b in range(ve.shape[0]):
            loc = self.dm.createLocalVec()
            arr = np.zeros(self.ghost_shape + (3,))
            for a, (ax, ay, az) in enumerate(CORNERS):
                arr[ox + ax:ox + ax + lx, oy + ay:oy + ay + ly, oz + az:oz + az + lz, :] += \
                    np.moveaxis(ve[b, 3 * a:3 * a + 3], 0, -1)
            loc.setArray(arr.ravel())
            g = self.dm.createGlobalVec()
            g.set(0.0)
            self.dm.localToGlobal(loc, g, addv=PETSc.InsertMode.ADD_VALUES)
            loc.destroy()
            out.append(g)
        return out

    def _assemble_rhs(self):
        """f^i = sum_e k_e chi0^i_e (6 Vecs) and ||sum_e |k_e chi0^i_e| || (6,), the scale
        against which a cancelling f^i counts as zero (as in solver/pcg.py)."""
        fl, fm = self.U0 @ self.K_lam, self.U0 @ self.K_mu                # (6, 24)
        ve = fl[:, :, None, None, None] * self.lam + fm[:, :, None, None, None] * self.mu
        f = self._voxel_to_global(ve)
        fa = self._voxel_to_global(np.abs(ve))
        scale = np.array([v.norm() for v in fa])
        for v in fa:
            v.destroy()
        return f, scale

    def _translations(self):
        PETSc = _petsc()
        vecs = []
        for c in range(3):
            v = self.dm.createGlobalVec()
            a = np.zeros((v.getLocalSize() // 3, 3))
            a[:, c] = 1.0 / math.sqrt(self.n_global)
            v.setArray(a.ravel())
            vecs.append(v)
        return PETSc.NullSpace().create(constant=False, vectors=vecs, comm=self.comm)

    def _coordinates(self):
        """Nodal coordinates (x, y, z) in our component order (block size 3)."""
        v = self.dm.createGlobalVec()
        (xs, xe), (ys, ye), (zs, ze) = self.ranges
        X = np.stack(np.meshgrid(np.arange(xs, xe) * self.h[0], np.arange(ys, ye) * self.h[1],
                                 np.arange(zs, ze) * self.h[2], indexing="ij"), axis=-1)
        v.setArray(X.ravel())
        return v

    def mean_stiffness(self) -> np.ndarray:
        """|Omega| <C> (6, 6) = sum_e chi0^T k_e chi0, summed over all ranks."""
        s = np.array([self.lam.sum(), self.mu.sum()])
        s = self.comm.tompi4py().allreduce(s)
        return s[0] * (self.U0 @ self.K_lam @ self.U0.T) + s[1] * (self.U0 @ self.K_mu @ self.U0.T)

    def chom(self, chi) -> np.ndarray:
        """Energy-form C^H (6, 6) from the six solution Vecs (global products only)."""
        y = []
        for x in chi:
            t = x.duplicate()
            self.A.mult(x, t)
            y.append(t)
        Fc = np.array([[self.f[i].dot(chi[j]) for j in range(6)] for i in range(6)])
        G = np.array([[chi[i].dot(y[j]) for j in range(6)] for i in range(6)])
        for t in y:
            t.destroy()
        C = (self.mean_stiffness() + G - Fc - Fc.T) / self.volume
        return 0.5 * (C + C.T)

    def to_natural(self, v, root_only: bool = True) -> Optional[np.ndarray]:
        """A global Vec as a (3, n_x, n_y, n_z) array in our layout (collective);
        on rank 0 only unless ``root_only`` is False."""
        PETSc = _petsc()
        nat = self.dm.createNaturalVec()
        self.dm.globalToNatural(v, nat)
        sc, out = (PETSc.Scatter.toZero if root_only else PETSc.Scatter.toAll)(nat)
        sc.scatter(nat, out, PETSc.InsertMode.INSERT_VALUES, PETSc.ScatterMode.FORWARD)
        arr = out.getArray().copy() if (not root_only or self.comm.getRank() == 0) else None
        sc.destroy(), out.destroy(), nat.destroy()
        if arr is None:
            return None
        return np.moveaxis(arr.reshape(self.shape + (3,)), -1, 0)

    def natural_dof_indices(self) -> np.ndarray:
        """Natural (our) dof index of each owned PETSc row, in the rank's row order."""
        r0, r1 = self.A.getOwnershipRange()
        ao = self.dm.getAO()
        return np.asarray(ao.petsc2app(np.arange(r0, r1, dtype=PETSc_int())))

    def destroy(self):
        for v in self.f:
            v.destroy()
        self.A.destroy()
        self.nullspace.destroy()
        self.dm.destroy()


def PETSc_int():
    """numpy dtype of PetscInt."""
    return _petsc().IntType


def petsc_homogenize(cell, rtol: float = 1e-6, ksp: str = "cg", pc: str = "gamg",
                     options: Union[dict, Sequence[str], None] = None, soft: float = 1e-6,
                     comm=None, monitor: bool = False, maxiter: int = 20000,
                     near_null: str = "rigid", options_prefix: str = "homog_",
                     keep_fields: bool = False) -> HomogenizationResult:
    """Effective stiffness C^H (docs/DESIGN.md s.2) with PETSc: KSP ``ksp`` + PC ``pc``.

    ``cell``: a Cell (replicated on every rank; each rank uses its block) or the path
    of a cell HDF5 file (each rank reads only its block of /phases). ``rtol`` is
    relative to ||f^i|| in the unpreconditioned 2-norm (as solver.pcg). ``options``
    are PETSc options (dict or list of strings) applied under ``options_prefix``
    (given with or without it; so -homog_ksp_monitor on the command line works too) on top of GAMG_DEFAULTS
    for pc='gamg'. Runs on every rank of ``comm`` (default PETSc.COMM_WORLD); all
    ranks return the same result. ``keep_fields``: chi (6, 3, n_x, n_y, n_z) numpy on
    rank 0 (gathered; modest sizes only).

    A load case that reaches ``maxiter`` (DIVERGED_MAX_IT) gives a result with
    ``converged = False``, as solver.pcg does; any other failure of a load case raises
    PetscSolveError (with the KSPConvergedReason name).
    """
    PETSc = _petsc()
    t0 = time.perf_counter()
    if pc not in _PC_NAMES:
        log.info("PETSc PC %r is not one of %s; passing it through", pc, sorted(_PC_NAMES))
    system = PetscSystem(cell, soft=soft, comm=comm, near_null=near_null)
    k = PETSc.KSP().create(system.comm)
    k.setOptionsPrefix(options_prefix)
    k.setOperators(system.A)
    k.setType(ksp)
    k.getPC().setType(pc)
    k.setTolerances(rtol=rtol, atol=0.0, max_it=maxiter)
    k.setNormType(PETSc.KSP.NormType.UNPRECONDITIONED)
    db = PETSc.Options()
    # "-homog_ksp_monitor" as well as "-ksp_monitor": the prefix is added once, below
    user = {(k[len(options_prefix):] if options_prefix and k.startswith(options_prefix) else k): v
            for k, v in _parse_options(options).items()}
    inserted = {}
    if pc == "gamg":
        for key, val in GAMG_DEFAULTS.items():
            if key not in user and not db.hasName(options_prefix + key):
                inserted[key] = val
    inserted.update(user)
    for key, val in inserted.items():
        db.setValue(options_prefix + key, val)
    try:
        return _setup_and_solve(system, k, ksp, pc, rtol, inserted, options_prefix, monitor,
                                keep_fields, near_null, soft, t0)
    finally:
        # GAMG reads its level options in PCSetUp and viewers run after KSPSolve:
        # the options stay in the database for the whole call, not longer
        for key in inserted:
            db.delValue(options_prefix + key)
        k.destroy()
        system.destroy()


def _setup_and_solve(system, k, ksp, pc, rtol, inserted, options_prefix, monitor, keep_fields,
                     near_null, soft, t0):
    PETSc = _petsc()
    k.setFromOptions()
    if monitor:
        k.setMonitor(lambda _k, it, rnorm: log.info("KSP %s/%s it %d |r| %.3e", ksp, pc, it, rnorm))
    k.setConvergenceHistory()
    k.setUp()                                   # PCSetUp once; the six solves reuse it
    t_setup = time.perf_counter() - t0

    chi, iters, res, reasons, history = [], [], [], [], []
    converged = True
    r = system.f[0].duplicate()
    for i, fi in enumerate(system.f):
        x = fi.duplicate()
        x.set(0.0)
        fnorm = fi.norm()
        if fnorm <= 1e-13 * system.fscale[i]:
            # cancelling load (e.g. a homogeneous cell): chi^i = 0 solves it
            iters.append(0), res.append(0.0), reasons.append("ZERO_RHS"), history.append([])
            chi.append(x)
            continue
        k.solve(fi, x)
        reason = k.getConvergedReason()
        its = k.getIterationNumber()
        if reason == PETSc.KSP.ConvergedReason.DIVERGED_MAX_IT:
            converged = False                   # as solver.pcg at maxiter: a result, not converged
        elif reason < 0:
            raise PetscSolveError(
                f"PETSc KSP {k.getType()} + PC {k.getPC().getType()} failed on load case {i}: "
                f"{reason_name(reason)} after {its} iterations (rtol {rtol:g})"
                + (f"; try the jacobi PC (--petsc-pc jacobi) or other -{options_prefix}mg_levels_* options"
                   if k.getPC().getType() == "gamg" else ""))
        system.nullspace.remove(x)
        system.A.mult(x, r)
        r.aypx(-1.0, fi)                        # r = f - K x
        iters.append(int(its))
        res.append(float(r.norm() / fnorm))
        reasons.append(reason_name(reason))
        history.append([float(v) / fnorm for v in k.getConvergenceHistory()])
        chi.append(x)
    t_solve = time.perf_counter() - t0 - t_setup
    C = system.chom(chi)
    fields = None
    if keep_fields:
        fields = [system.to_natural(x) for x in chi]
        fields = np.stack(fields) if fields[0] is not None else None
    t_total = time.perf_counter() - t0
    pc_type = k.getPC().getType()
    extra = {"converged_reason": reasons, "ksp_type": k.getType(), "pc_type": pc_type,
             "options": {key: val for key, val in inserted.items()}, "history": history,
             "near_null": near_null, "petsc_version": ".".join(map(str, PETSc.Sys.getVersion())),
             "mat_type": system.A.getType()}
    domain = {"ranks": system.comm.getSize(), "dims": list(system.proc_sizes),
              "global_shape": list(system.shape), "backend": "petsc-dmda"}
    r.destroy()
    for x in chi:
        x.destroy()
    log.info("PETSc %s/%s on %d ranks: iterations %s, %.2fs", ksp, pc_type, domain["ranks"], iters, t_total)
    return HomogenizationResult(
        C=C, iterations=iters, residuals=res, converged=converged, error_estimate=math.nan,
        error_estimate_cases=[math.nan] * 6, precision="float64", solver="petsc",
        preconditioner=_PC_NAMES.get(pc_type, pc_type), rtol=rtol, ctol=None,
        times={"setup": t_setup, "solve": t_solve, "total": t_total}, shape=system.shape,
        device="cpu", domain=domain, soft=soft, chi=fields, extra=extra)
