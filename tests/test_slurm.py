"""The sbatch scripts against a real (local, single-node) Slurm (issue 4).

Needs Debian's slurm-wlm and munge (scripts/setup_env.sh installs them); without
them these tests fail with the install command, they never skip."""
import os

import numpy as np
import pytest

from hpc.results import read_result
from microstructures.cell import Cell
from microstructures.io import write_cell

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def laminate_cell(tmp_path):
    ph = np.zeros((8, 6, 6), np.uint8)
    ph[4:] = 1
    p = str(tmp_path / "lam.h5")
    write_cell(Cell(ph, [1.0, 10.0], [0.3, 0.3]), p)
    return p


def _log(tmp_path, job_out):
    return open(job_out).read() if os.path.exists(job_out) else f"(no job output {job_out})"


@pytest.mark.parametrize("ntasks", [1, 2])
def test_homogenize_sbatch(slurm, laminate_cell, tmp_path, ntasks):
    out = str(tmp_path / f"res{ntasks}.h5")
    job_out = str(tmp_path / f"job{ntasks}.out")
    r = slurm.sbatch([f"--ntasks={ntasks}", f"--output={job_out}", "--export=ALL",
                      os.path.join(ROOT, "slurm", "homogenize.sbatch"), laminate_cell,
                      "--rtol", "1e-10", "-o", out], cwd=ROOT)
    assert r.returncode == 0, r.stderr + _log(tmp_path, job_out)
    res = read_result(out)
    assert int(res["attrs"]["ranks"]) == ntasks, _log(tmp_path, job_out)
    assert bool(res["attrs"]["converged"])
    # the laminate's closed form (see test_solver)
    from test_solver import laminate_closed_form
    from solver import isotropic_voigt
    ref = laminate_closed_form(isotropic_voigt(1.0, 0.3), isotropic_voigt(10.0, 0.3), 0.5)
    assert np.allclose(res["C"], ref, rtol=1e-8, atol=1e-8 * np.abs(ref).max())


def test_compare_sbatch_runs_the_petsc_rows_on_the_ranks_asked(slurm, laminate_cell, tmp_path):
    """slurm/compare.sbatch: the PETSc rows are job steps of RANKS ranks of one MPI job
    (srun --mpi=$SRUN_MPI), not RANKS separate one-rank solves; every row agrees with the
    reference."""
    job_out = str(tmp_path / "cmp.out")
    env = f"ALL,CELL={laminate_cell},RANKS=2,SOLVERS=petsc-gamg,SRUN_MPI=pmix"   # (--export splits at commas)
    r = slurm.sbatch(["--ntasks=2", "--mem-per-cpu=0", f"--output={job_out}", f"--export={env}",   # the node declares no memory
                      os.path.join(ROOT, "slurm", "compare.sbatch")], cwd=ROOT)
    log = _log(tmp_path, job_out)
    assert r.returncode == 0, r.stderr + log
    rows = {ln.split()[0]: ln.split() for ln in log.splitlines() if ln.split()[:1] == ["petsc-gamg"]}
    assert set(rows) == {"petsc-gamg"}, log
    assert rows["petsc-gamg"][1] == "2", log
    assert all(float(r[-1]) <= 1e-5 for r in rows.values()), log
    assert "reference: " in log
