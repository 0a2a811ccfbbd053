"""The MPI Domain (issue 4): the serial numerics run distributed, unchanged.

The checks run under ``mpirun -n P`` (P = 1, 2, 3, 4, 8) in tests/mpi/check_domain.py;
each run writes a JSON report that the tests below read. Oracles: the periodic wrap
of the global array (halo), the periodic fold of every rank's ghosted field
(accumulate) and adjointness <ghost x, y> = <x, accumulate y>, the serial operator,
the global field (gather), and the same C^H and iteration counts on every rank count.
Missing MPI is a failure, not a skip.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "mpi"))

from cells import gyroid_cell, write_h5  # noqa: E402
from hpc.domain import block_starts, multigrid_alignment  # noqa: E402

RANKS = (1, 2, 3, 4, 8)
INSTALL = "MPI is required: install openmpi-bin python3-mpi4py"


def _mpi_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMPI_", "PMIX_", "PMI_"))}
    env.update(OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", PYTHONPATH=ROOT)
    return env


def mpirun(n, *args, timeout=300, env=None):
    """(returncode, stdout, stderr, seconds) of ``mpirun -n n python args`` (``env``:
    extra environment variables)."""
    exe = shutil.which("mpirun") or shutil.which("mpiexec")
    if exe is None:
        pytest.fail(f"mpirun not found: {INSTALL}")
    cmd = [exe, "--allow-run-as-root", "--oversubscribe", "-n", str(n), sys.executable, *args]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**_mpi_env(), **(env or {})},
                       cwd=ROOT)
    return p.returncode, p.stdout, p.stderr, time.perf_counter() - t0


@pytest.fixture(scope="module")
def mpi_available():
    try:
        import mpi4py  # noqa: F401  (not mpi4py.MPI: that would initialise MPI in pytest)
    except ImportError:
        pytest.fail(f"mpi4py not importable: {INSTALL}")
    if shutil.which("mpirun") is None and shutil.which("mpiexec") is None:
        pytest.fail(f"mpirun not found: {INSTALL}")


@pytest.fixture(scope="module")
def reports(tmp_path_factory, mpi_available):
    """JSON report of tests/mpi/check_domain.py per rank count, run once each."""
    d = tmp_path_factory.mktemp("mpi")
    cell = gyroid_cell((24, 24, 24))
    write_h5(d / "cell.h5", cell)
    cell.phases = cell.phases.copy()
    cell.phases[-1, -1, -1] = 5            # a phase without material, in the last rank's block
    write_h5(d / "bad.h5", cell)
    cache = {}

    def get(n):
        if n not in cache:
            out = d / f"report{n}.json"
            extra = ["--mg"] if n in (1, 8) else []
            rc, so, se, _ = mpirun(n, os.path.join(HERE, "mpi", "check_domain.py"), str(out),
                                   str(d / "cell.h5"), str(d / "bad.h5"), *extra)
            assert rc == 0, f"check_domain.py on {n} ranks failed (rc {rc}):\n{so[-3000:]}\n{se[-3000:]}"
            cache[n] = json.loads(out.read_text())
        return cache[n]
    return get


# -- pure layout rules (no MPI) ----------------------------------------------------------
def test_block_rule_first_blocks_one_larger():
    assert block_starts(10, 3) == [0, 4, 7, 10]
    assert block_starts(9, 3) == [0, 3, 6, 9]
    assert block_starts(5, 5) == [0, 1, 2, 3, 4, 5]
    assert block_starts(40, 3, align=8) == [0, 16, 32, 40]      # 5 units of 8: 2, 2, 1
    assert block_starts(41, 3, align=4) == [0, 16, 32, 41]      # 11 units: 4, 4, 3, the last short
    with pytest.raises(ValueError):
        block_starts(2, 3)


def test_multigrid_alignment_covers_every_coarsening():
    from solver.transfer import coarse_shape
    for shape, dims in [((40, 36, 32), (3, 1, 1)), ((24, 24, 24), (2, 2, 2)), ((64, 64, 64), (4, 2, 1))]:
        align = multigrid_alignment(shape, dims)
        starts = [block_starts(n, p, a) for n, p, a in zip(shape, dims, align)]
        s = shape
        while np.prod(s) > 512:                         # build_multigrid's default rule
            r = tuple(2 if n >= 4 else 1 for n in s)
            for ax in range(3):
                if r[ax] == 2:
                    assert all(v % 2 == 0 for v in starts[ax][:-1]), (shape, dims, ax, starts[ax])
                    starts[ax] = [v // 2 for v in starts[ax][:-1]] + [-(-s[ax] // 2)]
            s = coarse_shape(s, r)


# -- distributed ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", RANKS)
def test_halo_exchange_and_accumulate(reports, n):
    rep = reports(n)
    bad = [h for h in rep["halo"] if not h["ok"]]
    assert not bad, f"{len(bad)} halo cases failed, e.g. {bad[:3]}"
    kinds = {sum(d > 1 for d in h["dims"]) for h in rep["halo"]}
    expect = {1: {0}, 2: {1}, 3: {1}, 4: {1, 2}, 8: {1, 2, 3}}[n]
    assert expect <= kinds                                  # 1-D, 2-D, 3-D process grids
    assert {(h["lo"], h["hi"]) for h in rep["halo"]} >= {(0, 1), (2, 2), (2, 0), (1, 2)}
    assert any(min(np.array(h["shape"]) // np.array(h["dims"])) == 1 and h["lo"] == 2
               for h in rep["halo"])                        # ghost wider than a block


@pytest.mark.parametrize("n", RANKS)
def test_operator_apply_matches_serial(reports, n):
    for r in reports(n)["operator"]:
        assert r["rel_err"] < 1e-13, r


@pytest.mark.parametrize("n", RANKS)
def test_block_reading_gather_and_collective_validation(reports, n):
    rep = reports(n)
    assert rep["gather_ok"]
    assert rep["describe"]["ranks"] == n
    assert rep["bad_cell"]["messages_equal"], "ranks disagree on the cell's validity"
    assert "phase id 5" in (rep["bad_cell"]["message"] or ""), rep["bad_cell"]


@pytest.mark.parametrize("n", RANKS[1:])
def test_chom_and_iterations_equal_across_rank_counts(reports, n):
    ref, rep = reports(1)["chom"], reports(n)["chom"]
    for name, r in rep.items():
        C0, C = np.array(ref[name]["C"]), np.array(r["C"])
        assert np.linalg.norm(C - C0) <= 1e-10 * np.linalg.norm(C0), (name, n)
        assert r["iterations"] == ref[name]["iterations"], (name, n)
    assert "h5_mg" in reports(1)["chom"]                    # the multigrid was exercised


def test_exception_on_one_rank_ends_all_ranks(mpi_available):
    rc, so, se, t = mpirun(4, os.path.join(HERE, "mpi", "raise_on_rank.py"), timeout=120)
    assert rc != 0
    assert "rank 1: ValueError: boom on purpose in rank 1" in se, se[-2000:]
    assert t < 30, f"the job took {t:.0f} s to end"


def test_peak_memory_per_rank_at_4_ranks_is_at_most_35_percent(mpi_available, tmp_path):
    """n = 96 gyroid, multigrid PCG (float32), run as hpc.homogenize runs (on tcmalloc,
    hpc.allocator): the problem's peak memory per rank at 4 ranks <= 35% of the
    single-rank one. The problem's memory is the peak RSS minus the RSS after the
    imports and a warm-up solve of an 8^3 cell (Python, torch, MPI and their lazily
    loaded kernels: the same ~0.42 GB on every rank whatever the grid, reported
    separately in BENCHMARKS.md)."""
    from hpc.allocator import find_tcmalloc
    lib = find_tcmalloc()
    assert lib is not None, "tcmalloc missing: apt-get install libtcmalloc-minimal4 (scripts/setup_env.sh)"
    write_h5(tmp_path / "cell.h5", gyroid_cell((96, 96, 96)))
    out = {}
    for n in (1, 4):
        rc, so, se, _ = mpirun(n, os.path.join(HERE, "mpi", "peak_memory.py"),
                               str(tmp_path / "cell.h5"), "float32", "multigrid", timeout=600,
                               env={"LD_PRELOAD": lib})
        assert rc == 0, f"peak_memory.py on {n} ranks failed (rc {rc}):\n{so[-2000:]}\n{se[-2000:]}"
        out[n] = json.loads(so.strip().splitlines()[-1])
    single = out[1]["peak_mb"][0] - out[1]["import_mb"][0]
    per_rank = max(p - b for p, b in zip(out[4]["peak_mb"], out[4]["import_mb"]))
    assert out[4]["dims"] == [2, 2, 1]
    assert out[1]["allocator"] == out[4]["allocator"] == "tcmalloc"
    assert abs(out[4]["C11"] - out[1]["C11"]) <= 1e-5 * abs(out[1]["C11"])
    assert per_rank <= 0.35 * single, (
        f"per-rank problem memory at 4 ranks {per_rank:.0f} MB > 35% of the single rank's "
        f"{single:.0f} MB ({per_rank / single:.0%}); full report {out}")


@pytest.mark.parametrize("solver", ["pcg", "petsc"])
def test_homogenize_cli_overrides_hold_on_two_ranks(mpi_available, tmp_path, solver):
    """`mpirun -n 2 python -m hpc.homogenize cell.h5 --size ... --E ...` computes what the
    serial run computes with the same overrides (the overrides once did not reach the
    distributed cell), and the overrides do change C^H here (the check can fail); with
    --fields both write the same displacement and the cell's phases (PETSc's --fields once
    crashed after the solve, and MPI runs left /phases out)."""
    from hpc.homogenize import main
    from hpc.results import read_result
    cell = gyroid_cell((12, 12, 12))
    write_h5(tmp_path / "cell.h5", cell)
    flags = ["--rtol", "1e-10", "--solver", solver, "-q"]
    over = (["--size", "1", "1", "2", "--E"] + [str(2.0 * e) for e in cell.E]
            + ["--nu"] + [str(v) for v in cell.nu])
    assert main([str(tmp_path / "cell.h5"), *flags, "-o", str(tmp_path / "plain.h5")]) == 0
    assert main([str(tmp_path / "cell.h5"), *flags, *over, "--fields", "-o", str(tmp_path / "serial.h5")]) == 0
    rc, so, se, _ = mpirun(2, "-m", "hpc.homogenize", str(tmp_path / "cell.h5"), *flags, *over, "--fields",
                           "-o", str(tmp_path / "mpi.h5"), timeout=240)
    assert rc == 0, f"rc {rc}:\n{so[-2000:]}\n{se[-2000:]}"
    # --fields: the gathered displacement and phases (PETSc gathers its own fields)
    import h5py
    with h5py.File(tmp_path / "mpi.h5") as fp, h5py.File(tmp_path / "serial.h5") as fs:
        assert np.array_equal(fp["phases"][()], cell.phases) and np.array_equal(fs["phases"][()], cell.phases)
        up, us = fp["displacement"][()], fs["displacement"][()]
        assert up.shape == (6, 3, 12, 12, 12) and np.abs(up - us).max() <= 1e-5 * np.abs(us).max()
    plain, ser, par = (read_result(str(tmp_path / f))["C"] for f in ("plain.h5", "serial.h5", "mpi.h5"))
    assert int(read_result(str(tmp_path / "mpi.h5"))["attrs"]["ranks"]) == 2
    scale = np.abs(ser).max()
    assert np.abs(ser - plain).max() > 0.1 * scale          # E doubled and the cell stretched
    assert np.abs(par - ser).max() <= 1e-7 * scale, (par, ser)


def test_cgins_warm_start_on_two_ranks_is_the_serial_one(mpi_available, tmp_path):
    """`mpirun -n 2 python -m hpc.homogenize --solver cgins`: rank 0 runs the network on the
    gathered cell and every rank starts from its block of that prediction. After one PCG
    iteration C^H still depends strongly on the start (a zero start is far off here, so
    the check can fail); it equals the serial warm-started one to rounding. Converged,
    the answer is the multigrid one."""
    import json as _json
    cell = gyroid_cell((16, 16, 16))
    write_h5(tmp_path / "cell.h5", cell)
    c = str(tmp_path / "cell.h5")
    one = ["--maxiter", "1", "-q", "--json"]

    def run_json(n, *flags):
        rc, so, se, _ = mpirun(n, "-m", "hpc.homogenize", c, *flags, timeout=240)
        assert rc in (0, 3), f"rc {rc}:\n{so[-2000:]}\n{se[-2000:]}"
        return _json.loads(so.strip().splitlines()[-1])

    ser = run_json(1, "--solver", "cgins", *one, "-o", str(tmp_path / "s.h5"))
    par = run_json(2, "--solver", "cgins", *one, "-o", str(tmp_path / "p.h5"))
    zero = run_json(1, *one, "-o", str(tmp_path / "z.h5"))
    S, P, Z = (np.asarray(d["C"]) for d in (ser, par, zero))
    assert par["ranks"] == 2 and par["model"] == ser["model"] and par["model_sha256"] == ser["model_sha256"]
    assert np.abs(P - S).max() <= 1e-10 * np.abs(S).max(), (P, S)
    assert np.abs(Z - S).max() >= 1e-4 * np.abs(S).max()
    conv = run_json(2, "--solver", "cgins", "--rtol", "1e-9", "-q", "--json", "-o", str(tmp_path / "c.h5"))
    mg = run_json(1, "--rtol", "1e-9", "-q", "--json", "-o", str(tmp_path / "m.h5"))
    assert conv["converged"]
    assert np.linalg.norm(np.asarray(conv["C"]) - mg["C"]) <= 1e-7 * np.linalg.norm(mg["C"])


def test_two_ranks_accept_and_refuse_the_files_a_serial_run_does(mpi_available, tmp_path):
    """The distributed reader is the serial one (microstructures.io): an HDF5 cell named
    .hdf and a boolean mask are read on 2 ranks as in a serial run (same C^H), and a file
    with a text size attribute is one error line and exit 2 on both (the MPI path once went
    by the extension, refused bool masks, and ended such files with a traceback)."""
    import h5py
    from hpc.homogenize import main
    from hpc.results import read_result
    mask = gyroid_cell((12, 12, 12)).phases > 0
    with h5py.File(tmp_path / "mask.hdf", "w") as f:
        f["phases"] = mask
        f["materials/E"] = np.array([0.0, 1.0])
        f["materials/nu"] = np.array([0.3, 0.3])
    flags = ["--rtol", "1e-10", "-q"]
    assert main([str(tmp_path / "mask.hdf"), *flags, "-o", str(tmp_path / "serial.h5")]) == 0
    rc, so, se, _ = mpirun(2, "-m", "hpc.homogenize", str(tmp_path / "mask.hdf"), *flags,
                           "-o", str(tmp_path / "mpi.h5"), timeout=240)
    assert rc == 0, f"rc {rc}:\n{so[-2000:]}\n{se[-2000:]}"
    ser, par = (read_result(str(tmp_path / f))["C"] for f in ("serial.h5", "mpi.h5"))
    assert np.abs(ser[0, 0]) > 1e-3 and np.abs(par - ser).max() <= 1e-7 * np.abs(ser).max()
    with h5py.File(tmp_path / "size.h5", "w") as f:
        f["phases"] = mask.astype(np.uint8)
        f["materials/E"] = np.array([0.0, 1.0])
        f["materials/nu"] = np.array([0.3, 0.3])
        f.attrs["size"] = "1 1 1"
    for n in (1, 2):
        rc, so, se, _ = mpirun(n, "-m", "hpc.homogenize", str(tmp_path / "size.h5"), "-q",
                               "-o", str(tmp_path / "never.h5"), timeout=120)
        lines = [ln for ln in se.splitlines() if ln.startswith("error:")]
        assert rc != 0 and lines == [f"error: {tmp_path / 'size.h5'}: attribute size must be numbers, got '1 1 1'"], se
    assert not (tmp_path / "never.h5").exists()


def test_thin_cells_on_more_ranks_than_a_short_axis_holds(mpi_available, tmp_path):
    """3 ranks on a 2 x 16 x 16 cell get a process grid that fits (MPI.Compute_dims gave
    3 x 1 x 1 and every rank aborted), and on 4 x 16 x 16 the multigrid hierarchy stops
    where the rank blocks no longer halve (it aborted with CoarseningError): the same
    C^H as serial. --solver petsc on a 2-voxel axis is one error line and exit 2."""
    from hpc.homogenize import main
    from hpc.results import read_result
    for shape in ((2, 16, 16), (4, 16, 16)):
        cell = gyroid_cell((16, 16, 16))
        cell.phases = np.ascontiguousarray(cell.phases[:shape[0]])
        cell.phases[0, :, :] = 1                      # keep a solid layer
        name = "x".join(map(str, shape))
        write_h5(tmp_path / f"{name}.h5", cell)
        assert main([str(tmp_path / f"{name}.h5"), "--rtol", "1e-10", "-q", "-o", str(tmp_path / f"s{name}.h5")]) == 0
        rc, so, se, _ = mpirun(3, "-m", "hpc.homogenize", str(tmp_path / f"{name}.h5"), "--rtol", "1e-10", "-q",
                               "-o", str(tmp_path / f"m{name}.h5"), timeout=240)
        assert rc == 0, f"{name}: rc {rc}:\n{so[-2000:]}\n{se[-2000:]}"
        ser, par = (read_result(str(tmp_path / f"{p}{name}.h5"))["C"] for p in ("s", "m"))
        assert np.abs(par - ser).max() <= 1e-7 * np.abs(ser).max(), name
    rc, so, se, _ = mpirun(1, "-m", "hpc.homogenize", str(tmp_path / "2x16x16.h5"), "--solver", "petsc", "-q",
                           "-o", str(tmp_path / "never.h5"), timeout=120)
    assert rc == 2 and [ln for ln in se.splitlines() if ln.startswith("error:")] == \
        ["error: --solver petsc needs at least 3 voxels per axis (a periodic box stencil), the cell is 2x16x16: "
         "use --solver pcg"], se
