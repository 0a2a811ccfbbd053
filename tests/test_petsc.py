"""PETSc reference (solver/petsc_ref.py) and the comparison CLI (hpc/compare.py).

Oracles: solver/assembled.py's matrix and right-hand sides, direct_chom, our PCG at
rtol 1e-10 (float64), the closed form of a homogeneous cell, equality across rank
counts (mpirun -n 2 via tests/mpi_petsc_check.py). The cells have void (contrast
1e-6), where PETSc 3.18 GAMG with its own defaults can break down.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from mpi_petsc_check import CELLS, lattice_cell  # noqa: E402

INSTALL = "apt-get install python3-petsc4py openmpi-bin (and a venv with --system-site-packages)"
MPIRUN = ["mpirun", "--allow-run-as-root", "--oversubscribe"]


def _petsc():
    try:
        from petsc4py import PETSc  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"petsc4py is required for the PETSc reference: {INSTALL} ({exc})")
    from solver import petsc_ref
    return petsc_ref


def _mpirun():
    if shutil.which("mpirun") is None:
        pytest.fail(f"mpirun not found: {INSTALL}")
    return MPIRUN


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONPATH=ROOT)
    return env


def _rel(A, B):
    return float(np.linalg.norm(A - B) / np.linalg.norm(B))


_OURS = {}


def ours(name):
    """Our PCG C^H (float64, rtol 1e-10) for a named test cell, cached."""
    if name not in _OURS:
        from solver import homogenize
        res = homogenize(CELLS[name](), rtol=1e-10, precision="float64")
        assert res.converged
        _OURS[name] = res.C
    return _OURS[name]


def test_matrix_and_rhs_equal_assembled_oracle():
    pr = _petsc()
    from solver.assembled import assemble
    cell = CELLS["tiny"]()
    system = pr.PetscSystem(cell)
    K, F, _ = assemble(cell.phases, cell.E, cell.nu, h=system.h)
    # one rank: PETSc's global ordering is the DMDA natural ordering == ours
    assert np.array_equal(system.natural_dof_indices(), np.arange(K.shape[0]))
    A = system.A.convert("dense").getDenseArray()
    assert np.abs(A - K.toarray()).max() <= 1e-14 * np.abs(K).max()
    assert len(system.f) == 6
    for i, f in enumerate(system.f):
        Fi = F[:, i] - np.repeat(F[:, i].reshape(-1, 3).mean(0)[None], F.shape[0] // 3, 0).ravel()
        assert np.abs(f.getArray() - Fi).max() <= 1e-13 * np.abs(F).max()
    system.destroy()


@pytest.mark.parametrize("pc", ["gamg", "jacobi"])
def test_tiny_chom_equals_direct_solve(pc):
    pr = _petsc()
    from solver.assembled import direct_chom
    cell = CELLS["tiny"]()
    C0, chi0 = direct_chom(cell.phases, cell.E, cell.nu, size=cell.size)
    res = pr.petsc_homogenize(cell, rtol=1e-11, pc=pc, keep_fields=True)
    assert _rel(res.C, C0) <= 1e-8
    assert res.chi.shape == (6, 3) + cell.shape                  # our layout, mean-free
    assert np.abs(res.chi - chi0).max() <= 1e-7 * np.abs(chi0).max()
    assert res.solver == "petsc" and res.preconditioner == pc and res.domain["ranks"] == 1


@pytest.mark.parametrize("name", ["gyroid", "lattice"])
@pytest.mark.parametrize("pc", ["gamg", "jacobi"])
def test_chom_equals_ours_with_void(name, pc):
    pr = _petsc()
    cell = CELLS[name]()
    assert cell.volume_fraction < 0.9 and (cell.E == 0).any()     # void, contrast 1e-6
    res = pr.petsc_homogenize(cell, rtol=1e-10, pc=pc)
    reasons = res.extra["converged_reason"]
    assert all(r.startswith("CONVERGED") for r in reasons), reasons
    assert max(res.residuals) <= 1e-9
    assert _rel(res.C, ours(name)) <= 1e-6
    assert np.allclose(res.C, res.C.T)


def test_two_ranks_match_ours_and_matrix():
    _petsc()
    cmd = _mpirun() + ["-n", "2", sys.executable, os.path.join(HERE, "mpi_petsc_check.py"),
                       "matrix:lattice", "solve:gyroid:gamg:1e-10", "solve:lattice:gamg:1e-10",
                       "solve:lattice:jacobi:1e-10"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = {d["task"]: d for d in map(json.loads, (ln for ln in p.stdout.splitlines() if ln.startswith("{")))}
    assert len(out) == 4, p.stdout
    m = out["matrix:lattice"]
    assert m["ranks"] == 2 and m["max_abs_diff"] <= 1e-14 * m["scale"]
    for task in ("solve:gyroid:gamg:1e-10", "solve:lattice:gamg:1e-10", "solve:lattice:jacobi:1e-10"):
        d = out[task]
        assert d["ranks"] == 2 and int(np.prod(d["dims"])) == 2
        assert all(r.startswith("CONVERGED") for r in d["reasons"]), d["reasons"]
        assert _rel(np.array(d["C"]), ours(task.split(":")[1])) <= 1e-6


def test_homogeneous_cell_is_exact_without_iterations():
    pr = _petsc()
    from microstructures.cell import Cell
    from solver.materials import isotropic_voigt
    cell = Cell(np.zeros((4, 5, 6), dtype=np.uint8), [2.0], [0.3], size=(1.0, 2.0, 3.0))
    res = pr.petsc_homogenize(cell, rtol=1e-8)
    assert res.iterations == [0] * 6 and res.extra["converged_reason"] == ["ZERO_RHS"] * 6
    assert _rel(res.C, isotropic_voigt(2.0, 0.3)) <= 1e-12


@pytest.mark.parametrize("opt", ["-ksp_max_it", "-homog_ksp_max_it"])
def test_iteration_limit_gives_an_unconverged_result(opt):
    """as solver.pcg at maxiter: a result with converged = False and the reason per case;
    also: a user option given with the prefix is the same option (not -homog_homog_...)"""
    pr = _petsc()
    res = pr.petsc_homogenize(CELLS["tiny"](), rtol=1e-12, pc="jacobi", options=[opt, "2"])
    assert not res.converged
    assert res.iterations == [2] * 6 and res.extra["converged_reason"] == ["DIVERGED_MAX_IT"] * 6
    assert min(res.residuals) > 1e-12


def test_failed_solve_raises_with_reason_name():
    pr = _petsc()
    with pytest.raises(pr.PetscSolveError, match="DIVERGED_DTOL"):
        pr.petsc_homogenize(CELLS["tiny"](), rtol=1e-12, pc="jacobi", options=["-ksp_divtol", "0.5"])


def test_user_options_pass_through_and_do_not_leak():
    pr = _petsc()
    from petsc4py import PETSc
    assert pr._parse_options(["-ksp_monitor", "-pc_gamg_threshold", "0.01", "-a=-1"]) == \
        {"ksp_monitor": "", "pc_gamg_threshold": "0.01", "a": "-1"}
    res = pr.petsc_homogenize(CELLS["tiny"](), rtol=1e-8, options={"pc_gamg_threshold": 0.01,
                                                                    "mg_levels_ksp_max_it": 3})
    assert res.extra["options"]["pc_gamg_threshold"] == "0.01"
    assert res.extra["options"]["pc_gamg_use_sa_esteig"] == "false"      # defaults kept
    assert not PETSc.Options().hasName("homog_pc_gamg_threshold")


def test_cell_path_reads_blocks(tmp_path):
    pr = _petsc()
    import h5py
    cell = lattice_cell((6, 7, 8), r=0.2)
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:                 # docs/DESIGN.md section 4 schema
        f["phases"] = cell.phases
        f["materials/E"] = cell.E
        f["materials/nu"] = cell.nu
        f.attrs["size"] = np.asarray(cell.size)
    a = pr.petsc_homogenize(str(path), rtol=1e-10)
    b = pr.petsc_homogenize(cell, rtol=1e-10)
    assert _rel(a.C, b.C) <= 1e-12


def test_compare_end_to_end(tmp_path):
    _petsc()
    _mpirun()
    import h5py
    from hpc.compare import format_table
    cell = lattice_cell((6, 7, 8), r=0.2)
    path = tmp_path / "tiny.h5"
    with h5py.File(path, "w") as f:
        f["phases"] = cell.phases
        f["materials/E"] = cell.E
        f["materials/nu"] = cell.nu
        f.attrs["size"] = np.asarray(cell.size)
    launcher = " ".join(MPIRUN) + " -n {ranks}"
    p = subprocess.run([sys.executable, "-m", "hpc.compare", str(path), "--json", "--ranks", "2",
                        "--launcher", launcher], capture_output=True, text=True, env=_env(), cwd=ROOT,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    rows = {r["solver"]: r for r in report["rows"]}
    assert set(rows) == {"jacobi", "multigrid", "petsc-gamg", "petsc-jacobi"}
    assert report["reference"]["status"] == "ok" and report["reference"]["rtol"] == 1e-10
    for name, r in rows.items():
        assert r["status"] == "ok", r
        assert r["dC"] <= 1e-5, (name, r["dC"])
        assert r["peak_mb"] > 0 and r["iterations"] >= 1
    assert rows["petsc-gamg"]["ranks"] == 2 and rows["jacobi"]["ranks"] == 1
    table = format_table(report)
    assert all(name in table for name in rows) and "reference:" in table


def test_a_petsc_row_that_fails_on_two_ranks_ends_with_its_reason(tmp_path):
    """A PETSc child that fails under mpirun reports its row with the reason (a failing
    rank now ends the job with MPI Abort after printing its row, instead of waiting in
    an allreduce that ranks stuck elsewhere never join: compare hung on such a failure),
    and a launcher's boxed message gives its error line, not the box's row of dashes."""
    _petsc()
    _mpirun()
    import h5py
    from hpc.compare import failure_line
    cell = lattice_cell((6, 7, 8), r=0.2)
    path = tmp_path / "thin.h5"
    with h5py.File(path, "w") as f:
        f["phases"] = cell.phases[:, :, :2]                     # 2 voxels along z: PETSc refuses
        f["materials/E"] = cell.E
        f["materials/nu"] = cell.nu
    launcher = " ".join(MPIRUN) + " -n {ranks}"
    p = subprocess.run([sys.executable, "-m", "hpc.compare", str(path), "--json", "--ranks", "2", "--solvers",
                        "petsc-gamg", "--launcher", launcher, "--timeout", "120"], capture_output=True, text=True,
                       env=_env(), cwd=ROOT, timeout=300)
    rows = {r["solver"]: r for r in json.loads(p.stdout.strip().splitlines()[-1])["rows"]}
    row = rows["petsc-gamg"]
    assert row["status"] == "failed" and "at least 3 voxels per axis" in row["reason"], row["reason"]
    box = ("------------------------------------------------\nmpirun has detected an attempt to run as root.\n"
           "Running as root is *strongly* discouraged.\n------------------------------------------------\n")
    assert failure_line(box) == "mpirun has detected an attempt to run as root."
    assert failure_line("Traceback ...\nValueError: bad\n") == "ValueError: bad"
    child_then_box = ("error: the cell is bad\n" + box.replace("an attempt to run as root", "that one or more "
                      "processes exited with non-zero status"))
    assert failure_line(child_then_box) == "error: the cell is bad"


@pytest.mark.parametrize("case", ["not_hdf5", "rtol", "no_file"])
def test_compare_refuses_bad_input_before_spawning_solvers(case, tmp_path, capsys, monkeypatch):
    """exit 2 with one line, and no solver subprocess (each would fail the same way)"""
    from hpc import compare
    from microstructures.io import write_cell
    path = tmp_path / "a.h5"
    if case == "not_hdf5":
        path.write_text("not a cell")
    else:
        write_cell(lattice_cell((4, 4, 4), r=0.2), str(path))
    args = [str(path if case != "no_file" else tmp_path / "none.h5")] + (["--rtol", "0"] if case == "rtol" else [])
    monkeypatch.setattr(compare, "spawn_one", lambda *a, **k: pytest.fail("a solver was spawned"))
    assert compare.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
