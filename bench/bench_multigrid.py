"""Multigrid-PCG vs Jacobi-PCG on a gyroid sheet (VF 0.25) and an octet lattice
(VF 0.15) with soft void (E_soft = 1e-6 E), rtol 1e-6, six load cases as one block.

    python bench/bench_multigrid.py --n 32 64 [--jacobi] [--dtype float32] [--device cuda]

Prints a table: n, cell, preconditioner, iterations (max over load cases), setup s,
solve s, peak RSS MB. Each (n, cell, preconditioner) runs in its own process so the
peak RSS belongs to that run alone. The cells come from the small generators below
(level-set gyroid sheet; octet truss by distance to the FCC nearest-neighbour struts).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from solver.operator import ElasticityOperator  # noqa: E402
from solver.pcg import pcg  # noqa: E402


def gyroid_sheet(n: int, vf: float = 0.25) -> np.ndarray:
    """Solid where |sin x cos y + sin y cos z + sin z cos x| < t, t set so the solid
    volume fraction is vf (voxel centres, one period per cell)."""
    x = 2 * np.pi * (np.arange(n) + 0.5) / n
    X, Y, Z = np.meshgrid(x, x, x, indexing="ij")
    phi = np.abs(np.sin(X) * np.cos(Y) + np.sin(Y) * np.cos(Z) + np.sin(Z) * np.cos(X))
    return (phi <= np.quantile(phi, vf)).astype(np.uint8)


def octet_lattice(n: int, vf: float = 0.15) -> np.ndarray:
    """Struts between FCC nearest neighbours (octet truss), radius set so the solid
    volume fraction is vf: solid where the distance to the nearest strut is small."""
    base = np.array([[0, 0, 0], [.5, .5, 0], [.5, 0, .5], [0, .5, .5]])
    dirs = np.array([d for d in itertools.product((-.5, 0, .5), repeat=3)
                     if sum(abs(v) > 0 for v in d) == 2 and (d > tuple(-v for v in d))])
    A = np.array([b + s for b in base for s in itertools.product((-1, 0, 1), repeat=3)])
    seg_a = np.repeat(A, len(dirs), axis=0)
    seg_d = np.tile(dirs, (len(A), 1))
    keep = np.all((np.minimum(seg_a, seg_a + seg_d) < 1.3) & (np.maximum(seg_a, seg_a + seg_d) > -0.3), axis=1)
    a = torch.as_tensor(seg_a[keep])
    d = torch.as_tensor(seg_d[keep])
    dd = (d * d).sum(1)
    c = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    P = torch.stack(torch.meshgrid(c, c, c, indexing="ij"), -1).reshape(-1, 3)
    dist = torch.empty(P.shape[0], dtype=torch.float64)
    for i in range(0, P.shape[0], 1 << 14):
        p = P[i:i + (1 << 14)]
        rel = p[:, None, :] - a[None]
        t = ((rel * d[None]).sum(-1) / dd).clamp(0, 1)
        dist[i:i + (1 << 14)] = (rel - t[..., None] * d[None]).norm(dim=-1).min(1).values
    dist = dist.numpy().reshape(n, n, n)
    return (dist <= np.quantile(dist, vf)).astype(np.uint8)


def make_cell(name: str, n: int) -> np.ndarray:
    return {"gyroid": gyroid_sheet, "octet": octet_lattice}[name](n)


def run_one(n, cell, precond, dtype, device, rtol, maxiter, mg_opts):
    ph = make_cell(cell, n)
    E, nu = [0.0, 1.0], [0.3, 0.3]                    # phase 0 void (soft 1e-6), phase 1 solid
    op = ElasticityOperator.from_phases(ph, E, nu, h=(1.0 / n,) * 3, dtype=getattr(torch, dtype),
                                        device=device)
    f = op.rhs()
    t0 = time.perf_counter()
    if precond == "multigrid":
        from solver.multigrid import build_multigrid
        M = build_multigrid(op, **mg_opts)
        desc = repr(M)
    else:
        dinv = 1.0 / op.diagonal()
        M = lambda r: r * dinv  # noqa: E731
        desc = "jacobi"
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t_setup = time.perf_counter() - t0
    x, info = pcg(op, f, precond=M, rtol=rtol, maxiter=maxiter)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t_solve = time.perf_counter() - t0 - t_setup
    C = op.chom(x).cpu().numpy()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return dict(n=n, cell=cell, precond=precond, iters=max(info.iterations), iters_all=info.iterations,
                converged=info.all_converged, setup=t_setup, solve=t_solve, rss=rss,
                C11=float(C[0, 0]), C44=float(C[3, 3]), vf=float(ph.mean()), desc=desc)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--cells", nargs="+", default=["gyroid", "octet"])
    ap.add_argument("--jacobi", action="store_true", help="also run Jacobi-PCG")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rtol", type=float, default=1e-6)
    ap.add_argument("--maxiter", type=int, default=20000)
    ap.add_argument("--mg", default="{}", help="JSON dict of build_multigrid options")
    ap.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--precond", default="multigrid", help=argparse.SUPPRESS)
    ap.add_argument("--show", action="store_true", help="print the multigrid hierarchy")
    a = ap.parse_args(argv)
    if a.single:
        r = run_one(a.n[0], a.cells[0], a.precond, a.dtype, a.device, a.rtol, a.maxiter, json.loads(a.mg))
        print("RESULT " + json.dumps(r))
        return
    print(f"# bench_multigrid {datetime.date.today()}  {platform.node()}  {platform.processor() or platform.machine()}"
          f"  torch {torch.__version__}  threads {torch.get_num_threads()}  dtype {a.dtype}  device {a.device}"
          f"  rtol {a.rtol}  mg {a.mg}")
    print(f"{'n':>5} {'cell':>7} {'precond':>10} {'VF':>6} {'iters':>6} {'setup s':>9} {'solve s':>9} "
          f"{'s/iter':>8} {'peak RSS MB':>12} {'C11':>10} {'C44':>10}")
    pcs = ["multigrid"] + (["jacobi"] if a.jacobi else [])
    for n in a.n:
        for cell in a.cells:
            for pc in pcs:
                cmd = [sys.executable, os.path.abspath(__file__), "--single", "--n", str(n), "--cells", cell,
                       "--precond", pc, "--dtype", a.dtype, "--device", a.device, "--rtol", str(a.rtol),
                       "--maxiter", str(a.maxiter), "--mg", a.mg]
                out = subprocess.run(cmd, capture_output=True, text=True)
                line = [s for s in out.stdout.splitlines() if s.startswith("RESULT ")]
                if not line:
                    print(f"{n:>5} {cell:>7} {pc:>10}  FAILED: {out.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(line[0][7:])
                it = f"{r['iters']}" + ("" if r["converged"] else "*")
                print(f"{n:>5} {cell:>7} {pc:>10} {r['vf']:>6.3f} {it:>6} {r['setup']:>9.2f} {r['solve']:>9.2f} "
                      f"{r['solve'] / max(1, r['iters']):>8.3f} {r['rss']:>12.0f} {r['C11']:>10.5f} {r['C44']:>10.5f}",
                      flush=True)
                if a.show and pc == "multigrid":
                    print(r["desc"])


if __name__ == "__main__":
    main()
