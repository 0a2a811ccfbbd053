"""Result files (docs/DESIGN.md section 4): HDF5, written atomically.

    /C              float64 (6, 6) Voigt 11,22,33,23,13,12, engineering shear
    /engineering/*  float64 scalars: E1 E2 E3 G23 G13 G12 nu12 nu13 nu23 nu21 nu31
                    nu32 bulk_modulus zener_ratio
    /displacement   optional float32 (6, 3, n_x, n_y, n_z): total displacement
                    u^i = eps^i . x - chi^i at the nodes x = (i h_x, j h_y, k h_z)
                    of the six unit strains (+ an .xdmf sidecar for ParaView)
    attrs           convention, solver, preconditioner, precision, rtol, ctol,
                    iterations, residuals (per load case), converged,
                    chom_error_estimate, chom_error_estimate_cases (per load case),
                    time_setup/solve/total, ranks, dims, devices, version, allocator,
                    input, input_sha256, shape, soft, size (the cell's edge lengths),
                    E and nu (per phase: the materials the solve used, after any
                    --E / --nu override), and what the solver adds
                    (multigrid: one string naming its levels, cycle and smoother; operator_apply; groups;
                    cgins: model, model_sha256, time_inference; with --baseline also
                    iterations_zero_start, iterations_saved (per load case), time_zero_start,
                    time_saved, zero_start_converged, zero_start_chom_rel_diff;
                    petsc: ksp_type, pc_type, converged_reason (per load case),
                    petsc_version, options (JSON: every option set under the prefix
                    homog_, the built-in GAMG defaults and the user's --petsc-options))
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile

import h5py
import numpy as np

from hpc.allocator import active_allocator
from microstructures.atomic import chmod_like_open
from solver.materials import unit_strain_tensor

VERSION = "0.1.0"
CONVENTION = "Voigt 11,22,33,23,13,12; engineering shear strains; C^H = energy form"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), for provenance lines."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def result_attrs(res, input_path=None, input_sha=None, size=None, materials=None) -> dict:
    a = {
        "convention": CONVENTION,
        "solver": res.solver,
        "preconditioner": res.preconditioner,
        "precision": res.precision,
        "rtol": res.rtol,
        "ctol": res.ctol if res.ctol is not None else float("nan"),
        "iterations": np.asarray(res.iterations, dtype=np.int64),
        "residuals": np.asarray(res.residuals, dtype=np.float64),
        "converged": bool(res.converged),
        "chom_error_estimate": float(res.error_estimate),
        "chom_error_estimate_cases": np.asarray(res.error_estimate_cases, dtype=np.float64),
        "time_setup": res.times.get("setup", float("nan")),
        "time_solve": res.times.get("solve", float("nan")),
        "time_total": res.times.get("total", float("nan")),
        "ranks": int(res.domain.get("ranks", 1)),
        "dims": np.asarray(res.domain.get("dims", [1, 1, 1]), dtype=np.int64),
        "devices": res.device,
        "shape": np.asarray(res.shape, dtype=np.int64),
        "soft": res.soft,
        "version": VERSION,
        "allocator": active_allocator(),
    }
    if input_path is not None:
        a["input"] = os.path.abspath(str(input_path))
    if input_sha is not None:
        a["input_sha256"] = input_sha
    if size is not None:
        a["size"] = np.asarray(size, dtype=np.float64)
    if materials is not None:
        a["E"] = np.asarray(materials[0], dtype=np.float64)
        a["nu"] = np.asarray(materials[1], dtype=np.float64)
    for k, v in res.extra.items():
        if k == "history":                                 # written as JSON by write_result
            continue
        if isinstance(v, (int, float, str, bool)):
            a[k] = v
        elif isinstance(v, dict):
            a[k] = json.dumps(v, sort_keys=True)
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v):
            a[k] = np.asarray(v, dtype=h5py.string_dtype())
        elif (isinstance(v, (list, tuple)) and v
              and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
            a[k] = np.asarray(v, dtype=np.int64 if all(isinstance(x, int) for x in v) else np.float64)
    return a


def total_displacement(chi: np.ndarray, size) -> np.ndarray:
    """u^i = eps^i . x - chi^i at the nodes, float32 (6, 3, n_x, n_y, n_z)."""
    shape = chi.shape[2:]
    h = [s / n for s, n in zip(size, shape)]
    X = np.meshgrid(*[np.arange(n) * hh for n, hh in zip(shape, h)], indexing="ij")
    u = np.empty(chi.shape, dtype=np.float32)
    for i in range(6):
        eps = unit_strain_tensor(i)
        for c in range(3):
            u[i, c] = sum(eps[c, d] * X[d] for d in range(3)) - chi[i, c]
    return u


def _atomic_path(path):
    """A temporary file beside ``path``, for os.replace onto it once written, with the
    mode an ordinary open() would give (mkstemp makes 0600: a result shared on a cluster
    must be readable by the group as any other file is)."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    os.close(fd)
    chmod_like_open(tmp)
    return tmp


def write_result(path, res, input_path=None, input_sha=None, displacement=None, phases=None,
                 size=(1.0, 1.0, 1.0), materials=None) -> None:
    """Write the result HDF5 (and the .xdmf sidecar when fields are given) atomically;
    ``materials``: (E, nu) per phase, recorded with ``size`` in the attributes."""
    tmp = _atomic_path(path)
    try:
        with h5py.File(tmp, "w") as fh:
            fh.create_dataset("C", data=np.asarray(res.C, dtype=np.float64))
            g = fh.create_group("engineering")
            for k, v in res.engineering.items():
                g.create_dataset(k, data=np.float64(v))
            if displacement is not None:
                fh.create_dataset("displacement", data=displacement.astype(np.float32),
                                  chunks=True, compression=None)
                if phases is not None:
                    fh.create_dataset("phases", data=np.asarray(phases).astype(np.uint16))
            for k, v in result_attrs(res, input_path, input_sha, size=size, materials=materials).items():
                fh.attrs[k] = v
            fh.attrs["history"] = json.dumps(res.extra.get("history", [])[-2000:])
        if displacement is not None:
            write_xdmf(os.path.splitext(path)[0] + ".xdmf", os.path.basename(path),
                       displacement.shape[2:], size, phases is not None)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_xdmf(xdmf_path, h5_name, shape, size, with_phases=True):
    """XDMF sidecar: node-centred displacement of each load case on a
    3DCoRectMesh of n_x x n_y x n_z points (the periodic nodes).

    XDMF lists dimensions slowest-first, so ParaView's X axis is our z axis (array
    index order [x, y, z]); vectors are joined as (u_z, u_y, u_x) to stay
    consistent with that relabelling."""
    nx, ny, nz = shape
    h = [s / n for s, n in zip(size, shape)]
    dims = f"{nx} {ny} {nz}"
    names = ["11", "22", "33", "23", "13", "12"]

    def slab(i, c):
        return (f'<DataItem ItemType="HyperSlab" Dimensions="{dims}" Type="HyperSlab">'
                f'<DataItem Dimensions="3 5" Format="XML">{i} {c} 0 0 0  1 1 1 1 1  1 1 {dims}</DataItem>'
                f'<DataItem Dimensions="6 3 {dims}" NumberType="Float" Precision="4" Format="HDF">'
                f'{h5_name}:/displacement</DataItem></DataItem>')

    attrs = []
    for i in range(6):
        join = "".join(slab(i, c) for c in (2, 1, 0))
        attrs.append(f'<Attribute Name="u_{names[i]}" AttributeType="Vector" Center="Node">'
                     f'<DataItem ItemType="Function" Function="JOIN($0, $1, $2)" Dimensions="{dims} 3">'
                     f'{join}</DataItem></Attribute>')
    if with_phases:
        attrs.append(f'<Attribute Name="phase" AttributeType="Scalar" Center="Node">'
                     f'<DataItem Dimensions="{dims}" NumberType="UInt" Precision="2" Format="HDF">'
                     f'{h5_name}:/phases</DataItem></Attribute>')
    text = f"""<?xml version="1.0" ?>
<Xdmf Version="3.0">
 <Domain>
  <Grid Name="cell" GridType="Uniform">
   <Topology TopologyType="3DCoRectMesh" Dimensions="{dims}"/>
   <Geometry GeometryType="ORIGIN_DXDYDZ">
    <DataItem Dimensions="3" Format="XML">0 0 0</DataItem>
    <DataItem Dimensions="3" Format="XML">{h[0]} {h[1]} {h[2]}</DataItem>
   </Geometry>
   {"".join(attrs)}
  </Grid>
 </Domain>
</Xdmf>
"""
    tmp = _atomic_path(xdmf_path)
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, xdmf_path)


def read_result(path) -> dict:
    """Read a result file back: {'C', 'engineering', 'attrs', 'displacement'?}."""
    with h5py.File(path, "r") as fh:
        out = {"C": fh["C"][()], "engineering": {k: float(v[()]) for k, v in fh["engineering"].items()},
               "attrs": {k: (v.decode() if isinstance(v, bytes) else v) for k, v in fh.attrs.items()}}
        if "displacement" in fh:
            out["displacement"] = fh["displacement"][()]
    return out
