"""python -m hpc.homogenize end to end, and its answers to bad input (issue 2)."""
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from hpc.homogenize import EXIT_INPUT, EXIT_OK, EXIT_UNCONVERGED, main
from hpc.results import read_result
from microstructures.cell import Cell
from microstructures.io import write_cell
from solver import isotropic_voigt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_raw(path, phases=None, E=None, nu=None):
    with h5py.File(path, "w") as fh:
        if phases is not None:
            fh["phases"] = phases
        if E is not None:
            fh["materials/E"] = np.asarray(E, dtype=np.float64)
        if nu is not None:
            fh["materials/nu"] = np.asarray(nu, dtype=np.float64)


def two_phase(n=6):
    ph = np.zeros((n, n, n), np.uint8)
    ph[: n // 2] = 1
    return ph


BAD = {
    "missing": (None, "no such file"),
    "not_hdf5": ("text", "not an HDF5 file"),
    "no_phases": (dict(E=[1.0], nu=[0.3]), "/phases"),
    "not_3d": (dict(phases=np.zeros((4, 4), np.uint8), E=[1.0], nu=[0.3]), "3-D"),
    "empty": (dict(phases=np.zeros((0, 4, 4), np.uint8), E=[1.0], nu=[0.3]), "empty"),
    "no_material": (dict(phases=two_phase() * 2, E=[1.0, 2.0], nu=[0.3, 0.3]), "phase id 2"),
    "negative_E": (dict(phases=two_phase(), E=[1.0, -2.0], nu=[0.3, 0.3]), "E"),
    "nu_range": (dict(phases=two_phase(), E=[1.0, 2.0], nu=[0.3, 0.5]), "nu"),
    "nan": (dict(phases=two_phase(), E=[1.0, np.nan], nu=[0.3, 0.3]), "NaN"),
    "inf": (dict(phases=two_phase(), E=[1.0, 2.0], nu=[np.inf, 0.3]), "NaN or inf"),
    "all_void": (dict(phases=two_phase(), E=[0.0, 0.0], nu=[0.3, 0.3]), "void"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_exit_2_nothing_written(case, tmp_path, capsys):
    spec, needle = BAD[case]
    path = str(tmp_path / "cell.h5")
    if spec == "text":
        with open(path, "w") as fh:
            fh.write("phases: 1 2 3\n")
    elif spec is not None:
        write_raw(path, **spec)
    before = set(os.listdir(tmp_path))
    code = main([path, "-q"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_INPUT
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    assert needle.lower() in err.lower(), err
    assert set(os.listdir(tmp_path)) == before      # nothing written, no temp files


def test_directory_is_unreadable(tmp_path, capsys):
    d = tmp_path / "adir.h5"
    d.mkdir()
    assert main([str(d), "-q"]) == EXIT_INPUT
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_npy_input_needs_materials(tmp_path, capsys):
    p = str(tmp_path / "ph.npy")
    np.save(p, two_phase())
    assert main([p, "-q"]) == EXIT_INPUT
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    out = str(tmp_path / "r.h5")
    assert main([p, "--E", "1", "2", "--nu", "0.3", "0.3", "-o", out, "-q"]) == EXIT_OK
    assert read_result(out)["C"].shape == (6, 6)


def test_bad_flags_exit_2(tmp_path, capsys):
    p = str(tmp_path / "c.h5")
    write_cell(Cell(two_phase(), [1.0, 2.0], [0.3, 0.3]), p)
    assert main([p, "--rtol", "-1", "-q"]) == EXIT_INPUT
    import torch
    assert main([p, "--device", f"cuda:{torch.cuda.device_count()}", "-q"]) == EXIT_INPUT   # never there
    assert not os.path.exists(str(tmp_path / "c.result.h5"))


@pytest.mark.parametrize("flags,needle", [
    (["-o", "{tmp}/nodir/r.h5"], "does not exist"),
    (["-o", "{tmp}"], "is a directory"),
    (["--device", "foo"], "not a torch device"),
    (["--device", "meta"], "only cpu and cuda"),
    (["--threads", "0"], "--threads"),
    (["--solver", "cgins"], "divisible by 2^depth"),      # a 6^3 cell; the shipped model needs 4 | n
])
def test_bad_flags_are_caught_before_the_solve(flags, needle, tmp_path, capsys):
    """one line, exit 2, nothing written: checked before any work that a typo would lose"""
    p = str(tmp_path / "c.h5")
    write_cell(Cell(two_phase(), [1.0, 2.0], [0.3, 0.3]), p)
    before = set(os.listdir(tmp_path))
    assert main([p, "-q"] + [f.format(tmp=tmp_path) for f in flags]) == EXIT_INPUT
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and needle in err, err
    assert set(os.listdir(tmp_path)) == before


def test_result_records_the_materials_size_and_petsc_options(tmp_path, capsys):
    """--E / --nu / --size overrides change C^H, so the result file must say what was solved;
    --solver petsc records the KSP and PC that ran, with every option set."""
    p = str(tmp_path / "ph.npy")
    np.save(p, two_phase())
    out = str(tmp_path / "r.h5")
    assert main([p, "-q", "--E", "1", "5", "--nu", "0.3", "0.2", "--size", "1", "2", "3", "-o", out,
                 "--solver", "petsc", "--petsc-options", "-ksp_type gmres -pc_type jacobi"]) == EXIT_OK
    assert "PETSc GMRES + jacobi" in capsys.readouterr().out
    a = read_result(out)["attrs"]
    assert list(a["E"]) == [1.0, 5.0] and list(a["nu"]) == [0.3, 0.2] and list(a["size"]) == [1.0, 2.0, 3.0]
    assert a["solver"] == "petsc" and a["ksp_type"] == "gmres" and a["pc_type"] == "jacobi"
    assert a["preconditioner"] == "jacobi"
    opts = json.loads(a["options"])
    assert opts["ksp_type"] == "gmres" and opts["pc_type"] == "jacobi"
    reasons = list(a["converged_reason"])       # a laminate: some load cases need no iteration
    assert len(reasons) == 6 and "CONVERGED_RTOL" in reasons and set(reasons) <= {"CONVERGED_RTOL", "ZERO_RHS"}


def test_petsc_at_maxiter_is_unconverged_and_a_failure_is_one_line(tmp_path, capsys):
    """--solver petsc keeps the exit-status contract of the PCG path: 3 and a result file
    marked not converged at --maxiter; any other KSP failure is one line and exit 1."""
    from hpc.homogenize import EXIT_FAIL
    p = str(tmp_path / "c.h5")
    ph = np.random.default_rng(0).integers(0, 2, size=(6, 6, 6)).astype(np.uint8)
    write_cell(Cell(ph, [1.0, 20.0], [0.3, 0.3]), p)
    out = str(tmp_path / "r.h5")
    assert main([p, "-q", "--solver", "petsc", "--maxiter", "2", "-o", out]) == EXIT_UNCONVERGED
    assert "not converged" in capsys.readouterr().err
    a = read_result(out)["attrs"]
    assert not bool(a["converged"]) and list(a["iterations"]) == [2] * 6
    os.unlink(out)
    assert main([p, "-q", "--solver", "petsc", "--petsc-options", "-ksp_divtol 0.5", "-o", out]) == EXIT_FAIL
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "DIVERGED_DTOL" in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(out)


def test_unconverged_has_its_own_exit_status(tmp_path, capsys):
    p = str(tmp_path / "c.h5")
    ph = np.random.default_rng(0).integers(0, 2, size=(6, 6, 6)).astype(np.uint8)
    write_cell(Cell(ph, [1.0, 20.0], [0.3, 0.3]), p)
    assert main([p, "--maxiter", "2", "-q", "--preconditioner", "jacobi"]) == EXIT_UNCONVERGED
    assert "not converged" in capsys.readouterr().err
    r = read_result(str(tmp_path / "c.result.h5"))
    assert not bool(r["attrs"]["converged"])
    assert list(r["attrs"]["iterations"]) == [2] * 6


def test_non_percolating_solid_warns(tmp_path, capsys):
    ph = np.zeros((8, 8, 8), np.uint8)
    ph[2:5, 2:5, 2:5] = 1                       # an isolated cube inclusion in void
    p = str(tmp_path / "c.h5")
    write_cell(Cell(ph, [0.0, 1.0], [0.3, 0.3]), p)
    main([p, "-q", "--maxiter", "50", "--preconditioner", "jacobi"])
    assert "does not percolate" in capsys.readouterr().err
    ph = np.zeros((8, 8, 8), np.uint8)          # rods along x, y and z that never touch
    ph[:, 0, 0] = ph[3, :, 3] = ph[6, 6, :] = 1
    write_cell(Cell(ph, [0.0, 1.0], [0.3, 0.3]), p)
    main([p, "-q", "--maxiter", "50", "--preconditioner", "jacobi"])
    assert "no single solid cluster spans three directions" in capsys.readouterr().err


def test_end_to_end_on_a_generated_cell(tmp_path):
    """Generate a laminate with the microstructures CLI, homogenize it with the
    homogenize CLI in a subprocess, and check the file against the closed form."""
    from test_solver import laminate_closed_form
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cell = str(tmp_path / "lam.h5")
    gen = subprocess.run([sys.executable, "-m", "microstructures", "laminate", "--axis", "x",
                          "--fractions", "0.5", "0.5", "--E", "1", "10", "--nu", "0.3", "0.3",
                          "-n", "8", "4", "4", "-o", cell], capture_output=True, text=True, env=env, cwd=ROOT)
    assert gen.returncode == 0, gen.stderr
    out = str(tmp_path / "res.h5")
    run = subprocess.run([sys.executable, "-m", "hpc.homogenize", cell, "-o", out, "--rtol", "1e-10",
                          "--json", "--fields"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    js = json.loads(run.stdout)
    ref = laminate_closed_form(isotropic_voigt(1.0, 0.3), isotropic_voigt(10.0, 0.3), 0.5)
    r = read_result(out)
    assert np.allclose(r["C"], ref, rtol=1e-8, atol=1e-8 * np.abs(ref).max())
    assert np.allclose(js["C"], r["C"])
    a = r["attrs"]
    assert bool(a["converged"]) and a["precision"] == "float64" and a["solver"] == "pcg"
    assert len(a["iterations"]) == 6 and max(a["residuals"]) <= 1e-9
    import hashlib
    assert a["input_sha256"] == hashlib.sha256(open(cell, "rb").read()).hexdigest()
    assert r["engineering"]["E1"] == pytest.approx(1.0 / np.linalg.inv(ref)[0, 0], rel=1e-8)
    u = r["displacement"]
    assert u.shape == (6, 3, 8, 4, 4) and u.dtype == np.float32
    xdmf = open(str(tmp_path / "res.xdmf")).read()
    assert "res.h5:/displacement" in xdmf and xdmf.count("<Attribute") == 7
    # the result is marked with the tool's provenance
    assert a["version"] and a["convention"].startswith("Voigt")


@pytest.mark.parametrize("extra", [["--solver", "petsc"], ["--solver", "petsc", "--petsc-pc", "jacobi"],
                                   ["--preconditioner", "jacobi"], ["--precision", "float32"]])
def test_solvers_agree_on_the_laminate(extra, tmp_path, capsys):
    from test_solver import laminate_closed_form
    ph = np.zeros((8, 4, 4), np.uint8)
    ph[4:] = 1
    p = str(tmp_path / "lam.h5")
    write_cell(Cell(ph, [1.0, 10.0], [0.3, 0.3]), p)
    rtol = "1e-7" if "float32" in extra else "1e-10"
    assert main([p, "-q", "--rtol", rtol, "-o", str(tmp_path / "r.h5")] + extra) == EXIT_OK
    r = read_result(str(tmp_path / "r.h5"))
    ref = laminate_closed_form(isotropic_voigt(1.0, 0.3), isotropic_voigt(10.0, 0.3), 0.5)
    tol = 1e-5 if "float32" in extra else 1e-8
    assert np.abs(r["C"] - ref).max() <= tol * np.abs(ref).max()
    assert r["attrs"]["solver"] == ("petsc" if "petsc" in extra else "pcg")


def test_cgins_without_a_model_is_an_input_error(tmp_path, capsys):
    p = str(tmp_path / "c.h5")
    write_cell(Cell(two_phase(), [1.0, 2.0], [0.3, 0.3]), p)
    assert main([p, "-q", "--baseline"]) == EXIT_INPUT
    assert "needs --solver cgins" in capsys.readouterr().err
    assert main([p, "-q", "--solver", "cgins", "--model", str(tmp_path / "none.pt")]) == EXIT_INPUT
    assert "no such checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main([p, "-q", "--solver", "cgins", "--model", str(bad)]) == EXIT_INPUT
    assert not os.path.exists(str(tmp_path / "c.result.h5"))


def test_cgins_keeps_the_answer_and_records_what_it_saved(tmp_path, capsys):
    """--solver cgins with the shipped default model: the same C^H as the multigrid
    solve to the tolerance (the network only moves the start); the result records the
    model, its sha256 and the inference time, and with --baseline the zero-start solve's
    iterations, the iterations saved (zero minus warm, per load case) and the time."""
    import hashlib

    from microstructures.generators.minimal_surfaces import tpms
    p = str(tmp_path / "g.h5")
    write_cell(tpms("G", "sheet", vf=0.3, n=16), p)
    assert main([p, "-q", "--rtol", "1e-8", "-o", str(tmp_path / "mg.h5")]) == EXIT_OK
    capsys.readouterr()
    assert main([p, "-q", "--rtol", "1e-8", "--solver", "cgins", "--baseline", "--json",
                 "-o", str(tmp_path / "nn.h5")]) == EXIT_OK
    js = json.loads(capsys.readouterr().out)
    mg, nn = read_result(str(tmp_path / "mg.h5")), read_result(str(tmp_path / "nn.h5"))
    assert np.linalg.norm(nn["C"] - mg["C"]) <= 1e-6 * np.linalg.norm(mg["C"])
    a = nn["attrs"]
    model = os.path.join(ROOT, "models", "cgins_default.pt")
    assert a["solver"] == "cgins+pcg" and a["model"] == "cgins_default.pt"
    assert a["model_sha256"] == hashlib.sha256(open(model, "rb").read()).hexdigest()
    assert a["time_inference"] > 0 and bool(a["zero_start_converged"])
    assert list(a["iterations_zero_start"]) == list(mg["attrs"]["iterations"])   # the same zero-start solve
    assert list(a["iterations_saved"]) == [z - w for z, w in zip(a["iterations_zero_start"], a["iterations"])]
    assert a["time_saved"] == pytest.approx(a["time_zero_start"] - a["time_total"])
    assert a["zero_start_chom_rel_diff"] <= 1e-6
    assert js["iterations_saved"] == list(a["iterations_saved"]) and js["model"] == "cgins_default.pt"


def test_cli_runs_on_tcmalloc_and_records_it(tmp_path):
    """The command line re-executes itself with tcmalloc preloaded (hpc.allocator);
    HPC_ALLOCATOR=system keeps glibc. Both are recorded in the result."""
    from hpc.allocator import find_tcmalloc
    assert find_tcmalloc() is not None, "tcmalloc missing: apt-get install libtcmalloc-minimal4 (scripts/setup_env.sh)"
    cell = tmp_path / "c.npy"
    np.save(cell, (np.indices((8, 8, 8)).sum(0) % 3 > 0).astype(np.uint8))
    for mode, want in (("tcmalloc", "tcmalloc"), ("system", "system")):
        env = dict(os.environ, HPC_ALLOCATOR=mode)
        env.pop("LD_PRELOAD", None)
        p = subprocess.run([sys.executable, "-m", "hpc.homogenize", str(cell), "--E", "0", "1", "--nu", "0.3", "0.3",
                            "--json", "-o", str(tmp_path / f"{mode}.h5")], capture_output=True, text=True, env=env)
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["allocator"] == want
        # one Poisson ratio on CPU: the fused C apply served, and the result says so
        assert json.loads(p.stdout)["operator_apply"] == "native"
