"""Jacobi-PCG baseline (issue 2): iterations, time and peak memory for a gyroid sheet
(VF 0.2) and an octet lattice (VF 0.15), soft void 1e-6, six load cases at once,
rtol 1e-6, float32 storage with float64 reductions.

    python bench/bench_jacobi.py --n 32 64 128 [--write]

Each case runs in a fresh subprocess so its peak RSS is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, machine_line, markdown_table, peak_rss_mb, update_section  # noqa: E402

def _gyroid(n):
    from microstructures.generators import tpms
    return tpms("G", "sheet", vf=0.2, n=n)


def _octet(n):
    from microstructures.generators import lattice
    return lattice("octet", vf=0.15, n=n)


CELLS = {"gyroid-sheet-0.20": _gyroid, "octet-0.15": _octet}


def run_one(cell_name, n, rtol, precision, preconditioner, maxiter):
    import torch
    from solver import homogenize
    t0 = time.perf_counter()
    cell = CELLS[cell_name](n)
    t_gen = time.perf_counter() - t0
    res = homogenize(cell, rtol=rtol, precision=precision, preconditioner=preconditioner,
                     maxiter=maxiter)
    return {"cell": cell_name, "n": n, "vf": cell.volume_fraction, "iterations": res.iterations,
            "converged": res.converged, "residual": max(res.residuals),
            "err_est": res.error_estimate, "setup_s": res.times["setup"],
            "solve_s": res.times["solve"], "total_s": res.times["total"], "gen_s": t_gen,
            "peak_mb": peak_rss_mb(), "threads": torch.get_num_threads(),
            "C11": float(res.C[0, 0]), "C44": float(res.C[3, 3])}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--cells", nargs="+", default=list(CELLS))
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--preconditioner", default="jacobi")
    ap.add_argument("--maxiter", type=int, default=50000)
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    ap.add_argument("--one", nargs=2, metavar=("CELL", "N"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(a.one[0], int(a.one[1]), a.rtol, a.precision, a.preconditioner, a.maxiter)))
        return
    rows = []
    for n in a.n:
        for c in a.cells:
            cmd = [sys.executable, __file__, "--one", c, str(n), "--rtol", str(a.rtol),
                   "--precision", a.precision, "--preconditioner", a.preconditioner,
                   "--maxiter", str(a.maxiter)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                raise SystemExit(f"{c} n={n} failed")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{c:20s} n={n:4d} vf={r['vf']:.3f} it={r['iterations']} conv={r['converged']} "
                  f"setup={r['setup_s']:.2f}s solve={r['solve_s']:.1f}s peak={r['peak_mb']:.0f}MB",
                  flush=True)
    m = machine()
    table = markdown_table(
        ["cell", "n", "VF", "iterations (max / min over 6 cases)", "setup s", "solve s", "s / iteration",
         "peak RSS MB", "est. C^H error"],
        [[r["cell"], r["n"], f"{r['vf']:.3f}", f"{max(r['iterations'])} / {min(r['iterations'])}",
          f"{r['setup_s']:.2f}", f"{r['solve_s']:.1f}", f"{r['solve_s'] / max(1, max(r['iterations'])):.3f}",
          f"{r['peak_mb']:.0f}", f"{r['err_est']:.1e}"] for r in rows])
    text = (f"## {a.preconditioner.capitalize()}-PCG baseline ({a.precision}, rtol {a.rtol:g}, soft void 1e-6)\n\n"
            f"Machine: {machine_line(m)}.\n"
            f"Command: `python bench/bench_jacobi.py --n {' '.join(map(str, a.n))} --preconditioner "
            f"{a.preconditioner} --write`\n\n{table}\n")
    print(text)
    if a.write:
        update_section(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "BENCHMARKS.md"), f"bench-{a.preconditioner}", text)


if __name__ == "__main__":
    from common import on_tcmalloc
    on_tcmalloc()
    main()
