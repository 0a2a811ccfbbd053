"""``python -m microstructures`` end to end, in subprocesses."""
import os
import subprocess
import sys

import numpy as np
import pytest

from microstructures import read_cell
from microstructures.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
if not os.path.exists(PYTHON):
    PYTHON = sys.executable


def run(*args, cwd=None):
    return subprocess.run([PYTHON, "-m", "microstructures", *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=120)


def test_generate_then_info(tmp_path):
    out, vti = tmp_path / "g.h5", tmp_path / "g.vti"
    r = run("tpms", "gyroid", "--form", "sheet", "--vf", "0.2", "-n", "24", "-o", out, "--vti", vti)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and "24x24x24" in r.stdout and "level c =" in r.stdout
    cell = read_cell(out)
    assert abs(cell.volume_fraction - 0.2) <= 0.005 and cell.params["form"] == "sheet"
    assert vti.exists()
    r = run("info", out)
    assert r.returncode == 0, r.stderr
    for text in ("24 x 24 x 24", "void", "E = 1, nu = 0.3", "volume fraction (solid) 0.2", "x yes, y yes, z yes"):
        assert text in r.stdout


def test_other_generators(tmp_path):
    cases = [
        ("lattice", "octet", "--vf", "0.2", "-n", "16", "--E", "5"),
        ("shell", "sc", "--vf", "0.15", "-n", "16", "--outer-radius", "0.25"),
        ("laminate", "--fractions", "0.25", "0.75", "--E", "1", "10", "--nu", "0.3", "0.2", "-n", "8"),
        ("inclusions", "--vf", "0.1", "--count", "1", "--E", "0", "1", "-n", "16"),
        ("voronoi", "--grains", "6", "--E", "1", "2", "3", "--nu", "0.3", "0.3", "0.3", "-n", "8"),
    ]
    for i, args in enumerate(cases):
        out = tmp_path / f"c{i}.h5"
        r = run(*args, "-o", out)
        assert r.returncode == 0, (args, r.stderr)
        assert read_cell(out).generator == args[0]
        if args[0] == "inclusions":  # a lone sphere in void: warned, still written
            assert "does not connect opposite faces in x, y, z" in r.stderr


def test_lattice_list():
    r = run("lattice", "--list")
    assert r.returncode == 0
    names = [line.split()[0] for line in r.stdout.splitlines()]
    assert len(names) >= 11 and {"octet", "kelvin", "random"} <= set(names)


@pytest.mark.parametrize("args,fragment", [
    (("tpms", "gyroid", "--vf", "1.5"), "vf must lie in (0, 1)"),
    (("tpms", "gyroid", "--vf", "abc"), "invalid float value"),
    (("tpms", "nonesuch", "--vf", "0.2"), "unknown TPMS surface"),
    (("tpms", "P", "--vf", "0.2", "-n", "8", "9"), "-n takes 1 or 3 integers"),
    (("lattice", "nonesuch", "--vf", "0.2"), "unknown lattice topology"),
    (("lattice", "--vf", "0.2"), "give a topology"),
    (("inclusions", "--vf", "0.2", "--radius", "0.1", "--count", "3"), "not allowed with argument"),
    (("voronoi", "--E", "1", "2", "--nu", "0.3", "0.3", "0.3"), "one E and one nu per phase"),
    (("laminate", "--fractions", "0.5", "0.6"), "sum to 1"),
    (("laminate", "--periods", "5", "-n", "8"), "5 periods along z need at least 10 voxels"),
    (("tpms", "G", "--vf", "0.3", "--periods", "7", "-n", "8"), "7 periods along x need at least 14 voxels"),
    (("lattice", "octet", "--vf", "0.3", "--periods", "1", "5", "1", "-n", "8"), "5 periods along y need at least 10"),
    (("tpms", "G", "--vf", "0.3", "-n", "8", "--tol", "nan"), "tol must lie in [0, 1)"),
    (("lattice", "octet", "--vf", "0.3", "-n", "16", "--tol", "-1"), "tol must lie in [0, 1)"),
    (("voronoi", "--grains", "3", "--seed", "-1", "-n", "8"), "seed must be an integer >= 0"),
    (("lattice", "random", "--vf", "0.2", "--seed", "-1", "-n", "16"), "seed must be an integer >= 0"),
    (("inclusions", "--vf", "0.2", "--seed", "-1", "-n", "16"), "seed must be an integer >= 0"),
    (("inclusions", "--vf", "0.2", "--radius", "0.02", "-n", "16"), "below one voxel"),
    (("tpms", "G", "--vf", "0.001", "-n", "8"), "the cell is all void"),
])
def test_bad_arguments_one_line_exit_2_nothing_written(tmp_path, capsys, args, fragment):
    # in-process (cli.main) to keep the suite fast; the subprocess path is checked below
    try:
        status = main([*args, "-o", str(tmp_path / "bad.h5")])
    except SystemExit as e:  # argparse's own errors
        status = e.code
    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1 and fragment in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("vti,fragment", [("bad.h5", "must end in .vti"), ("v.vti/", "is a directory"),
                                          ("no/v.vti", "does not exist")])
def test_bad_vti_is_caught_before_anything_is_written(tmp_path, capsys, vti, fragment):
    """--vti equal to -o (not a .vti name), a directory or a missing directory: one line, exit 2, and neither file"""
    status = main(["tpms", "P", "--vf", "0.3", "-n", "8", "-o", str(tmp_path / "bad.h5"),
                   "--vti", str(tmp_path) + os.sep + vti])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and fragment in err, err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("out,fragment", [("c.vti", "a cell file is HDF5, not .vti"),
                                          ("c.npy", "a cell file is HDF5, not .npy")])
def test_a_cell_file_named_for_another_format_is_refused(tmp_path, capsys, out, fragment):
    status = main(["tpms", "P", "--vf", "0.3", "-n", "8", "-o", str(tmp_path / out)])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and fragment in err, err
    status = main(["tpms", "P", "--vf", "0.3", "-n", "8", "-o", str(tmp_path / "c.h5"), "--vti", str(tmp_path / "c.vtk")])
    err = capsys.readouterr().err
    assert status == 2 and "must end in .vti" in err, err
    assert os.listdir(tmp_path) == []


def test_a_failed_generation_leaves_an_old_vti_in_place(tmp_path, capsys):
    """An all-void result is refused before anything is written: an existing .vti stays."""
    (tmp_path / "keep.vti").write_text("OLD")
    status = main(["tpms", "gyroid", "--vf", "0.001", "-n", "8", "-o", str(tmp_path / "keep.h5"),
                   "--vti", str(tmp_path / "keep.vti")])
    assert status == 2 and "all void" in capsys.readouterr().err
    assert (tmp_path / "keep.vti").read_text() == "OLD" and not (tmp_path / "keep.h5").exists()


def test_a_failed_cell_write_takes_the_vti_with_it(tmp_path, capsys, monkeypatch):
    import microstructures.cli as cli

    def fail(cell, path):
        raise OSError("disk full")
    monkeypatch.setattr(cli, "write_cell", fail)
    with pytest.raises(OSError):
        main(["tpms", "P", "--vf", "0.3", "-n", "8", "-o", str(tmp_path / "c.h5"), "--vti", str(tmp_path / "c.vti")])
    assert os.listdir(tmp_path) == []


def test_bad_argument_in_a_subprocess(tmp_path):
    r = run("tpms", "gyroid", "--vf", "1.5", "-o", tmp_path / "bad.h5")
    assert r.returncode == 2 and r.stderr == "python -m microstructures tpms: error: vf must lie in (0, 1), got 1.5\n"
    assert os.listdir(tmp_path) == []


def test_missing_output_and_bad_directory(tmp_path):
    r = run("tpms", "P", "--vf", "0.3")
    assert r.returncode == 2 and "required: -o/--output" in r.stderr
    r = run("tpms", "P", "--vf", "0.3", "-o", tmp_path / "no" / "x.h5")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr


def test_info_and_convert_bad_input(tmp_path):
    r = run("info", tmp_path / "missing.h5")
    assert r.returncode == 1 and r.stderr.strip().endswith("no such file") and r.stderr.count("\n") == 1
    notes = tmp_path / "notes.h5"
    notes.write_text("hello")
    r = run("info", notes)
    assert r.returncode == 1 and "not an HDF5 file" in r.stderr


def test_convert_npy(tmp_path):
    phases = np.zeros((6, 6, 6), np.uint8)
    phases[:, :, :3] = 1
    np.save(tmp_path / "scan.npy", phases)
    r = run("convert", tmp_path / "scan.npy", "-o", tmp_path / "scan.h5")
    assert r.returncode == 1 and "give the materials" in r.stderr
    r = run("convert", tmp_path / "scan.npy", "--E", "0", "1", "--nu", "0.3", "0.3", "-o", tmp_path / "scan.h5")
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(read_cell(tmp_path / "scan.h5").phases, phases)
    r = run("convert", tmp_path / "scan.h5", "-o", tmp_path / "scan.vti")
    assert r.returncode == 0 and (tmp_path / "scan.vti").read_text().startswith("<?xml")
    # the input is never overwritten, and a .npy output (which would hold HDF5) is refused
    before = (tmp_path / "scan.npy").read_bytes()
    for out in ("scan.npy", "other.npy"):
        r = run("convert", tmp_path / "scan.npy", "--E", "0", "1", "--nu", "0.3", "0.3", "-o", tmp_path / out)
        assert r.returncode == 2 and "not .npy" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = run("convert", tmp_path / "scan.h5", "-o", tmp_path / "scan.h5")
    assert r.returncode == 2 and "is the input file" in r.stderr, r.stderr
    assert (tmp_path / "scan.npy").read_bytes() == before and not (tmp_path / "other.npy").exists()
    np.testing.assert_array_equal(read_cell(tmp_path / "scan.h5").phases, phases)


def test_inclusions_that_touch_in_the_voxel_image_are_reported(tmp_path):
    r = run("inclusions", "--vf", "0.2", "--radius", "0.1", "-o", tmp_path / "c.h5")
    assert r.returncode == 0, r.stderr
    cell = read_cell(tmp_path / "c.h5")
    assert cell.params["clusters"] < cell.params["count"]
    assert f"({cell.params['clusters']} separate in the voxel image)" in r.stdout
    assert "separate clusters in the voxel image" in r.stderr
    r = run("inclusions", "--vf", "0.2", "--radius", "0.1", "--gap", "0.04", "-o", tmp_path / "d.h5")
    cell = read_cell(tmp_path / "d.h5")
    assert r.returncode == 0 and cell.params["clusters"] == cell.params["count"] and "separate" not in r.stdout
