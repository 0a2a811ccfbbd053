"""Self-check of the peer runners against the direct solve (solver/assembled.py
direct_chom) on a small gyroid: every runner must reproduce its C^H, which shows
that they solve the same discretized problem and convert C^H to our Voigt
convention (11, 22, 33, 23, 13, 12, engineering shear) correctly.

    python bench/peers/check_peers.py [--n 12] [--tol 1e-5]

Exit status 1 if a runner disagrees; a runner that cannot run (muGrid venv
missing, multigrid not there) is reported as such and also fails the check.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

RUNNERS = {
    "ours-mg": [sys.executable, os.path.join(HERE, "ours_runner.py"), "{cell}", "--precond", "multigrid"],
    "ours-jacobi": [sys.executable, os.path.join(HERE, "ours_runner.py"), "{cell}", "--precond", "jacobi"],
    "petsc-gamg": [sys.executable, os.path.join(HERE, "petsc_runner.py"), "{cell}"],
    "pyamg-sa": [sys.executable, os.path.join(HERE, "pyamg_runner.py"), "{cell}"],
    "mugrid-green": [os.path.join(ROOT, ".venv-mugrid", "bin", "python"),
                     os.path.join(HERE, "mugrid_runner.py"), "{cell}", "--precond", "green"],
}


def main() -> int:
    from microstructures.generators import tpms

    from bench.peers.cellfile import write_cell
    from solver.assembled import direct_chom

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--tol", type=float, default=1e-5)
    a = ap.parse_args()
    cell = tpms("G", "sheet", vf=0.25, n=a.n)
    C_ref, _ = direct_chom(cell.phases, cell.E, cell.nu, cell.size, soft=1e-6)
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "cell.npz")
        write_cell(path, cell, soft=1e-6)
        for name, cmd in RUNNERS.items():
            cmd = [c.format(cell=path) for c in cmd]
            out = subprocess.run(cmd, capture_output=True, text=True,
                                 env=dict(os.environ, OMP_NUM_THREADS="1"))
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if out.returncode != 0 or not lines:
                print(f"{name:14s} FAILED to run: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
                bad += 1
                continue
            C = np.array(json.loads(lines[-1])["C"])
            d = float(np.linalg.norm(C - C_ref) / np.linalg.norm(C_ref))
            ok = d < a.tol
            bad += not ok
            print(f"{name:14s} ||C - C_direct||_F / ||C_direct||_F = {d:.1e} {'ok' if ok else 'MISMATCH'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
