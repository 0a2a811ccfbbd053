"""Our solvers against the peers (issue 3, part 6), side by side on the same cells:
gyroid sheet VF 0.25 and octet lattice VF 0.15, E = 1, nu = 0.3, soft void 1e-6 E,
six unit-strain load cases, rtol 1e-6 on ||f - K chi|| / ||f|| (2-norm) for every
solver, all on the same periodic Q1 (trilinear hex, 2x2x2 Gauss) discretization.

    python bench/bench_peers.py --n 32 64 [128] [--write] [--solvers ...] [--threads 1]

Solvers (each in a fresh subprocess, so peak RSS is its own; bench/peers/):

    ours-mg        solver.homogenize, PCG + geometric multigrid, float32 storage
    ours-mg-g6     the same, the six load cases one after another (groups=6: less memory)
    ours-jacobi    solver.homogenize, PCG + Jacobi, float32 storage
    petsc-gamg     solver.petsc_ref, PETSc CG + GAMG (rigid-body near-null space), float64
    pyamg-sa       PyAMG smoothed aggregation (rigid-body B) + CG on solver/assembled.py's K
    mugrid-green   muGrid CG + Fourier reference-material (Green) preconditioner, float64
    mugrid-gj      muGrid CG + Green-Jacobi (J-FFT) preconditioner, float64

"C^H diff" is ||C - C_ref||_F / ||C_ref||_F against a tight reference: our multigrid
PCG in float64 to rtol 1e-9 (--ref-rtol), whose energy-form C^H error is far below
every row's; the agreement of the independent codes with it is the cross-check.
muGrid runs from its own venv (scripts/setup_mugrid.sh; numpy >= 2.1).
Times are wall-clock seconds on a shared machine: the load average before and after
is recorded next to them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from common import machine, machine_line, markdown_table, update_section  # noqa: E402

MARKER = "bench-peers"


def _gyroid(n):
    from microstructures.generators import tpms
    return tpms("G", "sheet", vf=0.25, n=n)


def _octet(n):
    from microstructures.generators import lattice
    return lattice("octet", vf=0.15, n=n)


CELLS = {"gyroid-sheet-0.25": _gyroid, "octet-0.15": _octet}

PEERS = os.path.join(HERE, "peers")
MUGRID_PY = os.path.join(ROOT, ".venv-mugrid", "bin", "python")

#: name -> (label, command builder(cell_path, args))
SOLVERS = {
    "ours-mg": ("ours PCG + multigrid (f32)", lambda p, a: [
        sys.executable, os.path.join(PEERS, "ours_runner.py"), p, "--precond", "multigrid",
        "--precision", "float32", "--rtol", str(a.rtol), "--threads", str(a.threads)]),
    "ours-mg-g6": ("ours PCG + multigrid (f32), one case at a time", lambda p, a: [
        sys.executable, os.path.join(PEERS, "ours_runner.py"), p, "--precond", "multigrid",
        "--precision", "float32", "--rtol", str(a.rtol), "--threads", str(a.threads),
        "--groups", "6"]),
    "ours-jacobi": ("ours PCG + Jacobi (f32)", lambda p, a: [
        sys.executable, os.path.join(PEERS, "ours_runner.py"), p, "--precond", "jacobi",
        "--precision", "float32", "--rtol", str(a.rtol), "--threads", str(a.threads)]),
    "petsc-gamg": ("PETSc CG + GAMG (f64)", lambda p, a: [
        sys.executable, os.path.join(PEERS, "petsc_runner.py"), p, "--pc", "gamg",
        "--rtol", str(a.rtol)]),
    "pyamg-sa": ("PyAMG SA + CG (f64)", lambda p, a: [
        sys.executable, os.path.join(PEERS, "pyamg_runner.py"), p, "--rtol", str(a.rtol)]),
    "mugrid-green": ("muGrid CG + Green (f64)", lambda p, a: [
        a.mugrid_python, os.path.join(PEERS, "mugrid_runner.py"), p, "--precond", "green",
        "--rtol", str(a.rtol)]),
    "mugrid-gj": ("muGrid CG + Green-Jacobi (f64)", lambda p, a: [
        a.mugrid_python, os.path.join(PEERS, "mugrid_runner.py"), p, "--precond",
        "green-jacobi", "--rtol", str(a.rtol)]),
}


def loadavg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def run_json(cmd, threads: int, timeout: float) -> dict:
    """Run one runner; its last stdout line is JSON. Failures come back as a dict
    with 'error' so the table can say what happened."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    except OSError as exc:
        return {"error": f"could not start: {exc}"}
    lines = [ln for ln in out.stdout.strip().splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        return {"error": f"exit {out.returncode}: {tail[:300]}"}
    r = json.loads(lines[-1])
    r["wall_s"] = time.perf_counter() - t0
    return r


def reference(cell_path: str, a) -> dict:
    cmd = [sys.executable, os.path.join(PEERS, "ours_runner.py"), cell_path, "--precond",
           "multigrid", "--precision", "float64", "--rtol", str(a.ref_rtol),
           "--threads", str(a.threads)]
    r = run_json(cmd, a.threads, a.timeout)
    if "error" in r:      # multigrid not there: PETSc GAMG, float64, as the reference
        cmd = [sys.executable, os.path.join(PEERS, "petsc_runner.py"), cell_path, "--pc",
               "gamg", "--rtol", str(a.ref_rtol)]
        r = run_json(cmd, a.threads, a.timeout)
    return r


def rel_diff(C, Cref) -> float:
    import numpy as np
    C, Cref = np.asarray(C), np.asarray(Cref)
    return float(np.linalg.norm(C - Cref) / np.linalg.norm(Cref))


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    ap.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=list(SOLVERS))
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--ref-rtol", type=float, default=1e-9)
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for every solver (torch, BLAS); 1 = all serial")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per solver run")
    ap.add_argument("--mugrid-python", default=MUGRID_PY)
    ap.add_argument("--json", default=None, help="also write all rows to this JSON file")
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    ap.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                    help="no runs: print (and with --write, write) the table of earlier --json files")
    a = ap.parse_args()
    if a.merge:
        return merge(a)

    m = machine()
    load_before, t_start = loadavg(), time.perf_counter()
    print(f"# {machine_line(m)}\n# load average before: {load_before}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_peers_") as tmp:
        from bench.peers.cellfile import write_cell
        for n in a.n:
            for cname in a.cells:
                cell = CELLS[cname](n)
                path = os.path.join(tmp, f"{cname}-{n}.npz")
                write_cell(path, cell, soft=1e-6)
                ref = reference(path, a)
                Cref = ref.get("C")
                print(f"{cname} n={n}: reference {ref.get('solver', '?')} rtol {a.ref_rtol:g}"
                      f" {ref.get('error', '')}", flush=True)
                for s in a.solvers:
                    label, build = SOLVERS[s]
                    if s.startswith("mugrid") and not os.path.exists(a.mugrid_python):
                        r = {"error": f"{a.mugrid_python} missing: run scripts/setup_mugrid.sh"}
                    else:
                        r = run_json(build(path, a), a.threads, a.timeout)
                    r.update(key=s, label=label, cell=cname, n=n, load=loadavg())
                    if "error" not in r and Cref is not None:
                        r["c_diff"] = rel_diff(r["C"], Cref)
                    rows.append(r)
                    print(format_row(r), flush=True)
    load_after = loadavg()
    elapsed = time.perf_counter() - t_start
    print(f"# load average after: {load_after}; elapsed {elapsed:.0f} s")
    table = markdown_table(HEADER, [table_row(r) for r in rows])
    print(table)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"machine": m, "load_before": load_before, "load_after": load_after,
                       "elapsed_s": elapsed, "args": vars(a), "rows": rows}, fh, indent=1)
    if a.write:
        update_section(os.path.join(ROOT, "BENCHMARKS.md"), MARKER,
                       section(m, a, rows, load_before, load_after, elapsed))
        print("updated BENCHMARKS.md")


def merge(a):
    """One table from several --json files (e.g. n = 32 and n = 64 run separately)."""
    runs = [json.load(open(p)) for p in a.merge]
    rows = [r for run in runs for r in run["rows"]]
    first = runs[0]
    for k in ("rtol", "ref_rtol", "threads"):
        setattr(a, k, first["args"][k])
    a.n = sorted({r["n"] for r in rows})
    loads_b = " / ".join(run["load_before"] for run in runs)
    loads_a = " / ".join(run["load_after"] for run in runs)
    elapsed = sum(run["elapsed_s"] for run in runs)
    print(markdown_table(HEADER, [table_row(r) for r in rows]))
    if a.write:
        update_section(os.path.join(ROOT, "BENCHMARKS.md"), MARKER,
                       section(first["machine"], a, rows, loads_b, loads_a, elapsed))
        print("updated BENCHMARKS.md")


HEADER = ["solver", "cell", "n", "iterations max/min", "setup s", "solve s", "total s",
          "peak RSS MB", "C^H diff"]


def table_row(r) -> list:
    if "error" in r:
        return [r["label"], r["cell"], r["n"], "unavailable: " + r["error"].replace("|", "/"),
                "", "", "", "", ""]
    it = r["iterations"]
    conv = "" if r.get("converged", True) else " (not converged)"
    return [r["label"], r["cell"], r["n"], f"{max(it)}/{min(it)}{conv}", f"{r['setup_s']:.2f}",
            f"{r['solve_s']:.2f}", f"{r['total_s']:.2f}", f"{r['peak_mb']:.0f}",
            f"{r['c_diff']:.1e}" if "c_diff" in r else "n/a"]


def format_row(r) -> str:
    if "error" in r:
        return f"  {r['label']:32s} {r['cell']:18s} n={r['n']:4d} unavailable: {r['error']}"
    return (f"  {r['label']:32s} {r['cell']:18s} n={r['n']:4d} it={r['iterations']} "
            f"setup={r['setup_s']:.2f}s solve={r['solve_s']:.2f}s total={r['total_s']:.2f}s "
            f"peak={r['peak_mb']:.0f}MB dC={r.get('c_diff', float('nan')):.1e} load={r['load']}")


def section(m, a, rows, load_before, load_after, elapsed) -> str:
    versions = {}
    for r in rows:
        if "version" in r:
            versions[r["label"].split(" (")[0]] = r["version"]
    vers = "; ".join(f"{k}: {v}" for k, v in sorted(versions.items()))
    busy = ""
    try:
        loads = (load_before + " " + load_after).replace("/", " ").split()
        if max(float(x) for x in loads) > 0.5 * (os.cpu_count() or 1):
            busy = ("**Timings were taken while other work ran on this machine** (load average "
                    f"{load_before} before, {load_after} after, on {os.cpu_count()} cores); "
                    "compare them with care, iteration counts and C^H are unaffected. ")
    except ValueError:
        pass
    return "\n".join([
        "## Peers: muGrid, PyAMG, PETSc and ours on the same cells",
        "",
        f"`python bench/bench_peers.py --n {' '.join(map(str, a.n))} --threads {a.threads} --write`"
        f" ({elapsed / 60:.1f} min in all)",
        "",
        f"Machine: {machine_line(m)}. Versions: {vers}.",
        "",
        "Gyroid sheet VF 0.25 and octet lattice VF 0.15, E = 1, nu = 0.3, void = 1e-6 E, six "
        f"unit-strain load cases, rtol {a.rtol:g} on ||f - K chi||_2 / ||f||_2 for every solver, "
        "the same periodic Q1 voxel discretization (trilinear hex, 2x2x2 Gauss) everywhere. "
        f"Every solver runs with {a.threads} thread(s) in a fresh process (peak RSS is its own). "
        f"C^H diff = ||C - C_ref||_F / ||C_ref||_F, C_ref from our multigrid PCG in float64 to "
        f"rtol {a.ref_rtol:g}. " + busy,
        "",
        markdown_table(HEADER, [table_row(r) for r in rows]),
        "",
        "Notes:",
        "- muGrid (PyPI wheel, own venv from `scripts/setup_mugrid.sh`): "
        "`IsotropicStiffnessOperator3D` with `FEMElement.q1` (the same K as ours; on a 16^3 "
        "gyroid its C^H matches our direct solve to 1e-7), `Solvers.conjugate_gradients` with "
        "`make_reference_stiffness_preconditioner` (Green, reference Lame = volume means) or "
        "`make_green_jacobi_preconditioner`; one load case at a time; C^H from the volume-"
        "averaged stress (`average_stress`), which is first order in the solver error where "
        "the energy form used by the other rows is second order.",
        "- PyAMG: `smoothed_aggregation_solver(K, B=rigid-body modes, symmetry='symmetric')`, "
        "symmetric block Gauss-Seidel, as the preconditioner of `pyamg.krylov.cg`; K from "
        "`solver/assembled.py`, whose COO assembly sets the peak memory (setup s includes it).",
        "- PETSc: `solver/petsc_ref.py`, DMDA assembly, CG + GAMG with `GAMG_DEFAULTS`, 1 rank.",
        "- ours: `solver.homogenize(cell, precision='float32')`, the six cases as one block.",
    ])


if __name__ == "__main__":
    main()
