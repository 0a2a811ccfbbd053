"""hpc.batch: many cells on a dask LocalCluster, failures isolated, reruns skip (issue 4).

The Slurm test needs Debian's slurm-wlm and munge (scripts/setup_env.sh installs them);
without them it fails with the install command, it never skips."""
import os
import shutil

import numpy as np
import pytest

from hpc import batch
from microstructures.generators import laminate, lattice, tpms
from microstructures.io import read_cell, write_cell

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-8


def _cells():
    """Seven valid cells, n = 8..12, from three generator families."""
    return {
        "gyroid.h5": tpms("G", "network", 0.3, 10),
        "p_sheet.h5": tpms("P", "sheet", 0.3, 12),
        "diamond.h5": tpms("D", "network", 0.35, 8),
        "octet.h5": lattice("octet", 0.3, 12),
        "random.h5": lattice("random", 0.3, 10, seed=3),
        "lam_z.h5": laminate(n=8),
        "lam_x.h5": laminate(fractions=(0.25, 0.75), axis="x", n=12),
    }


@pytest.fixture(scope="module")
def cell_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cells")
    for name, cell in _cells().items():
        write_cell(cell, str(d / name))
    with open(d / "corrupt.h5", "wb") as fh:
        fh.write(np.random.default_rng(0).bytes(4096))
    return d


@pytest.fixture(scope="module")
def client():
    from distributed import Client
    cluster = batch.local_cluster(workers=2, threads=1)   # processes=True, 2 x 1 thread
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def _paths(d):
    return sorted(str(p) for p in d.glob("*.h5"))


def test_batch_isolates_failure_and_rerun_skips(cell_dir, client, tmp_path):
    out = str(tmp_path / "results.csv")
    paths = _paths(cell_dir)
    assert len(paths) == 8
    corrupt = str(cell_dir / "corrupt.h5")
    s = batch.run_batch(paths, out, client, {"rtol": RTOL}, retries=1, flush_seconds=0.0)
    assert (s.ok, s.failed, s.skipped, s.unconverged) == (7, 1, 0, 0), s.line()
    assert s.exit_status == batch.EXIT_CELLS_FAILED
    rows = {r["path"]: r for r in batch.read_table(out)}
    assert sorted(rows) == paths
    bad = rows[corrupt]
    assert bad["status"] == "failed" and "not an HDF5 file" in bad["error"] and "\n" not in bad["error"]
    assert np.isnan(bad["C11"]) and bad["name"] == "corrupt" and bad["shape"] == ""   # unreadable: no shape
    for p, r in rows.items():
        if p == corrupt:
            continue
        assert r["status"] == "ok" and r["error"] == "" and r["converged"] == 1, r
        assert r["residual_max"] <= 10 * RTOL
        C = batch.row_matrix(r)
        assert np.all(np.linalg.eigvalsh(C) > 0)             # SPD effective stiffness
        assert r["input_sha256"] and r["shape"].count("x") == 2
        cell = read_cell(p)
        assert r["volume_fraction"] == pytest.approx(float(cell.solid_mask.mean()))

    # rerun: only the failed cell is submitted again; the ok rows are untouched
    before = batch.read_table(out)
    s2 = batch.run_batch(paths, out, client, {"rtol": RTOL}, retries=0)
    assert s2.submitted == [corrupt]
    assert (s2.skipped, s2.failed, s2.ok) == (7, 1, 0)
    after = batch.read_table(out)
    assert after == _nan_safe(before, after)

    # nothing left to do: the table is not even rewritten
    good = [p for p in paths if p != corrupt]
    mtime = os.stat(out).st_mtime_ns
    s3 = batch.run_batch(good, out, client, {"rtol": RTOL})
    assert s3.submitted == [] and s3.skipped == 7 and s3.exit_status == batch.EXIT_OK
    assert os.stat(out).st_mtime_ns == mtime
    s3f = batch.run_batch(good[:1], out, client, {"rtol": RTOL}, force=True)
    assert s3f.submitted == good[:1] and s3f.ok == 1

    # a changed input (new sha256) is homogenized again
    changed = str(tmp_path / "lam_z.h5")
    shutil.copy(str(cell_dir / "lam_z.h5"), changed)
    s4 = batch.run_batch([changed], out, client, {"rtol": RTOL})
    assert s4.submitted == [changed] and s4.ok == 1
    write_cell(laminate(fractions=(0.5, 0.5), E=(1.0, 20.0), n=8), changed)
    s5 = batch.run_batch([changed], out, client, {"rtol": RTOL})
    assert s5.submitted == [changed] and s5.ok == 1
    rows = {r["path"]: r for r in batch.read_table(out)}
    assert len(rows) == 9 and rows[changed]["C33"] > rows[str(cell_dir / "lam_z.h5")]["C33"]


def _nan_safe(before, after):
    """``before`` with its NaN fields replaced by the same NaN objects of ``after`` where
    ``after`` is NaN too (NaN != NaN), so that == compares everything else."""
    out = []
    for b, a in zip(before, after):
        row = dict(b)
        for k, v in b.items():
            if isinstance(v, float) and np.isnan(v) and isinstance(a.get(k), float) and np.isnan(a[k]):
                row[k] = a[k]
        out.append(row)
    return out


def test_batch_C_matches_direct_homogenize(cell_dir, client, tmp_path):
    from solver.homogenize import homogenize
    out = str(tmp_path / "one.h5")                              # the HDF5 table format
    path = str(cell_dir / "gyroid.h5")
    s = batch.run_batch([path], out, client, {"rtol": RTOL, "precision": "float64"})
    assert s.ok == 1
    (row,) = batch.read_table(out)
    ref = homogenize(read_cell(path), rtol=RTOL)
    assert np.allclose(batch.row_matrix(row), ref.C, rtol=1e-12, atol=1e-14)
    assert row["iterations_max"] == max(ref.iterations)
    for k in batch.ENGINEERING:
        assert row[k] == pytest.approx(ref.engineering[k], rel=1e-12)


@pytest.mark.parametrize("ext", [".csv", ".h5"])
def test_table_roundtrip(tmp_path, ext):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(3):
        A = rng.standard_normal((6, 6))
        rows.append(batch.empty_row(path=f"/x/c{i}, \"quoted\".h5", name="é", status="ok", shape="8x8x8",
                                    iterations_max=i, converged=1, **batch.upper_triangle(A + A.T)))
    rows.append(batch.empty_row(path="/x/bad.h5", status="failed", error="CellError: bad, really"))
    p = str(tmp_path / ("t" + ext))
    batch.write_table(p, rows)
    back = batch.read_table(p)
    assert len(back) == 4 and list(back[0]) == list(batch.COLUMNS)
    for r, b in zip(rows, back):
        for k, t in batch.COLUMNS.items():
            if t == "float" and np.isnan(r[k]):
                assert np.isnan(b[k])
            else:
                assert b[k] == r[k], k
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]   # atomic: no leftovers


def test_table_write_is_atomic(tmp_path, monkeypatch):
    p = str(tmp_path / "t.csv")
    batch.write_table(p, [batch.empty_row(path="a", status="ok")])
    before = open(p).read()

    class Boom(Exception):
        pass

    def bad_rows():
        yield batch.empty_row(path="b", status="ok")
        raise Boom
    with pytest.raises(Boom):
        batch.write_table(p, bad_rows())
    assert open(p).read() == before
    assert os.listdir(tmp_path) == ["t.csv"]


def test_bad_usage_exit_status(tmp_path):
    assert batch.main([str(tmp_path / "none*.h5"), "-o", str(tmp_path / "r.csv")]) == batch.EXIT_USAGE
    assert batch.main([str(tmp_path / "x.h5"), "-o", str(tmp_path / "r.txt")]) == batch.EXIT_USAGE


def test_inputs_leave_out_the_table_and_result_files_and_a_named_missing_file_is_an_error(tmp_path, caplog):
    """'cells/*.h5' once matched the batch's own .h5 table (and hpc.homogenize's
    *.result.h5 files): every rerun then had a failed row for it. A file named on the
    command line that does not exist is exit 2, not a warning and a short table."""
    for name in ("a.h5", "b.h5", "table.h5", "a.result.h5"):
        (tmp_path / name).write_text("x")
    got = batch.expand_inputs([str(tmp_path / "*.h5")], exclude=[str(tmp_path / "table.h5")])
    assert got == [str(tmp_path / "a.h5"), str(tmp_path / "b.h5")]
    # named explicitly, a result file is taken (and fails as a cell, in its row)
    assert batch.expand_inputs([str(tmp_path / "a.result.h5")]) == [str(tmp_path / "a.result.h5")]
    assert batch.main([str(tmp_path / "a.h5"), str(tmp_path / "missing.h5"), "-o",
                       str(tmp_path / "r.csv")]) == batch.EXIT_USAGE
    assert "missing.h5: no such file" in caplog.text and not (tmp_path / "r.csv").exists()


@pytest.mark.parametrize("flags,needle", [
    (["-o", "{tmp}/nodir/r.csv"], "does not exist"),
    (["-o", "{tmp}/cell.h5"], "is not a table written by hpc.batch"),     # a cell, not a table
    (["-o", "{tmp}/notes.csv"], "is not a table written by hpc.batch"),
    (["-o", "{tmp}/r.csv", "--soft", "-1"], "--soft must be a positive number"),
    (["-o", "{tmp}/r.csv", "--rtol", "nan"], "--rtol must be a positive number"),
    (["-o", "{tmp}/r.csv", "--rtol", "2"], "asks for no accuracy at all"),
    (["-o", "{tmp}/r.csv", "--maxiter", "0"], "--maxiter must be >= 1"),
])
def test_bad_options_and_tables_are_caught_before_the_cluster_starts(flags, needle, tmp_path, caplog, monkeypatch):
    """exit 2 with one error line, and no solve: a bad -o found after the solves would lose
    them (the cluster is never started: local_cluster fails the test if called)"""
    write_cell(laminate(n=4), str(tmp_path / "cell.h5"))
    (tmp_path / "notes.csv").write_text("a,b\n1,2\n")
    before = sorted(os.listdir(tmp_path))
    monkeypatch.setattr(batch, "local_cluster", lambda *a, **k: pytest.fail("the cluster was started"))
    assert batch.main([str(tmp_path / "cell.h5"), "-q"] + [f.format(tmp=tmp_path) for f in flags]) == batch.EXIT_USAGE
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and needle in errors[0], errors
    assert sorted(os.listdir(tmp_path)) == before


def test_slurm_cluster_job_script():
    """--slurm: the dask-jobqueue job script asks for what the flags say (no jobs started)."""
    args = batch.build_parser().parse_args(["c.h5", "--slurm", "--queue", "gpu", "--cores", "8",
                                            "--threads-per-worker", "2", "--memory", "8GB",
                                            "--walltime", "00:10:00", "--jobs", "0",
                                            "--prologue", "source .venv/bin/activate"])
    cluster = batch.slurm_cluster(args)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -p gpu" in script and "#SBATCH --cpus-per-task=8" in script
    assert "#SBATCH -t 00:10:00" in script
    assert "--nworkers 4" in script and "--resources cells=1" in script
    assert "source .venv/bin/activate" in script and "OMP_NUM_THREADS=2" in script


# ----------------------------------------------------------------------------- Slurm

def test_batch_sbatch(slurm, tmp_path):
    d = tmp_path / "cells"
    d.mkdir()
    for i, cell in enumerate([tpms("G", "network", 0.3, 8), lattice("bcc", 0.3, 8), laminate(n=8)]):
        write_cell(cell, str(d / f"c{i}.h5"))
    out = str(tmp_path / "results.csv")
    job_out = str(tmp_path / "job.out")
    env_export = f"--export=ALL,CELLS={d}/*.h5,OUT={out}"
    r = slurm.sbatch(["--cpus-per-task=2", f"--output={job_out}", env_export,
                      os.path.join(ROOT, "slurm", "batch.sbatch"), "--rtol", "1e-8", "-q"], cwd=ROOT)
    log = open(job_out).read() if os.path.exists(job_out) else "(no job output)"
    assert r.returncode == 0, r.stderr + log
    assert "2 workers x 1 threads" in log, log
    rows = batch.read_table(out)
    assert sorted(os.path.basename(r["path"]) for r in rows) == ["c0.h5", "c1.h5", "c2.h5"]
    assert all(r["status"] == "ok" for r in rows), rows
    from solver.homogenize import homogenize          # the job's answers are this process's answers
    for row in rows:
        ref = homogenize(read_cell(row["path"]), rtol=1e-8)
        assert np.allclose(batch.row_matrix(row), ref.C, rtol=1e-6, atol=1e-9 * np.abs(ref.C).max()), row["path"]


def test_batch_dask_jobqueue_on_slurm(slurm, tmp_path):
    """--slurm: dask-jobqueue submits the workers as a Slurm job; the cells come back."""
    import subprocess
    import sys
    d = tmp_path / "cells"
    d.mkdir()
    write_cell(tpms("P", "network", 0.3, 8), str(d / "p.h5"))
    write_cell(laminate(n=8), str(d / "lam.h5"))
    out = str(tmp_path / "results.h5")
    # the local node declares no memory: leave --mem out of the worker job
    r = subprocess.run([sys.executable, "-m", "hpc.batch", f"{d}/*.h5", "-o", out, "--slurm", "--queue", "debug",
                        "--cores", "2", "--memory", "2GB", "--walltime", "00:05:00", "--jobs", "1",
                        "--skip-directive=--mem", "--interface", "lo", "-q"],
                       env=slurm.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = batch.read_table(out)
    assert sorted(os.path.basename(x["path"]) for x in rows) == ["lam.h5", "p.h5"]
    assert all(x["status"] == "ok" for x in rows) and all(x["worker"].startswith("tcp://") for x in rows)
    # the workers were a Slurm job (a LocalCluster would pass the checks above too)
    jobs = subprocess.run(["scontrol", "show", "job"], env=slurm.env, capture_output=True, text=True).stdout
    assert "JobName=dask-worker" in jobs, jobs[-2000:]
