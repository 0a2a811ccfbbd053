"""Where the CGINS error lives on the multigrid's coarse grids (issue 5, session 38).

For held-out cells of an `hpc.evaluate` report, the network's start u0 (t = 0) and its
t-step Jacobi-PCG iterate u_t are compared with the converged field u* (multigrid-PCG,
float64, rtol 1e-10). Their error e = u - u* is split in the energy norm over the
Galerkin coarse spaces of the solver's own hierarchy (solver.multigrid.build_multigrid:
32^3 -> 16^3 -> 8^3, K_l = P_l^T K P_l): the share of ||e||_K^2 that lies in range(P_l)
is b_l . K_l^+ b_l / e . K e with b_l = P_l^T K e (the K-orthogonal projection onto the
coarse space). A large share on 8^3 says the start misses smooth, cell-scale modes that
t Jacobi steps cannot reach; a small share says the error is local (walls, joints).

Then the same question as an experiment: one exact coarse-grid correction of the start,
u0 + P_l K_l^+ P_l^T (f - K u0), before the t steps ("cc16", "cc8"), from the network and
from zero, and after the t steps ("t_cc16", "t_cc8": the error left then loses exactly its
coarse part). delta = ||C^H - C^H_ref||_F / ||C^H_ref||_F against the report's C_ref.

    python bench/probe_coarse.py REPORT.json[.gz] MODEL.pt --data data/heldout32 \
        [--family shell] [--kind random] [--n 15] [--t 10] [-o out.json]
"""
import argparse
import gzip
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hpc.evaluate import load_eval_model, open_dataset, predict  # noqa: E402
from model.embedded_pcg import embedded_pcg  # noqa: E402
from model.train import cell_operator  # noqa: E402
from solver.multigrid import MultigridPreconditioner, build_multigrid  # noqa: E402
from solver.pcg import pcg  # noqa: E402
from solver.transfer import prolong, restrict  # noqa: E402


def _dot(a, b):
    return torch.sum(a.to(torch.float64) * b.to(torch.float64), dim=(1, 2, 3, 4))


def _mean_free(x):
    return x - x.mean(dim=(2, 3, 4), keepdim=True)


def coarse_cg(op, b, precond, rtol=1e-11, maxiter=500):
    """Mean-free PCG for a (singular, periodic) Galerkin level operator: K_l x = b."""
    b = _mean_free(b)
    x = torch.zeros_like(b)
    r = b.clone()
    z = _mean_free(precond(r))
    p = z.clone()
    rz = _dot(r, z)
    bn = _dot(b, b).sqrt().clamp_min(1e-300)
    for _ in range(maxiter):
        q = op.apply(p)
        a = rz / _dot(p, q)
        x += a[:, None, None, None, None] * p
        r -= a[:, None, None, None, None] * q
        if bool((_dot(r, r).sqrt() / bn <= rtol).all()):
            break
        z = _mean_free(precond(r))
        rz_new = _dot(r, z)
        p = z + (rz_new / rz)[:, None, None, None, None] * p
        rz = rz_new
    return x


class CoarseSpaces:
    """Restriction to, exact solves on, and prolongation from the hierarchy's levels."""

    def __init__(self, M):
        self.M = M
        self.levels = M.levels

    def down(self, v, l):
        for k in range(l):
            v = restrict(v, self.levels[k + 1].domain, self.levels[k].ratios)
        return v

    def up(self, v, l):
        for k in range(l, 0, -1):
            v = prolong(v, self.levels[k].domain, self.levels[k - 1].domain.local_shape, self.levels[k - 1].ratios)
        return v

    def solve(self, b, l):
        if l == len(self.levels) - 1:
            return self.M.coarse_solver(b)
        sub = MultigridPreconditioner(self.levels[l:], self.M.coarse_solver, options=self.M.options)
        return coarse_cg(self.levels[l].op, b, sub)

    def correction(self, r, l):
        """P_l K_l^+ P_l^T r (the exact coarse-grid correction of residual r)."""
        return self.up(self.solve(self.down(r, l), l), l)

    def share(self, op, e, l):
        """Share of ||e||_K^2 in range(P_l), summed over the load cases."""
        Ke = op.apply(e)
        b = self.down(Ke, l)
        x = self.solve(b, l)
        return float(_dot(x, b).sum() / _dot(e, Ke).sum())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report", help="an hpc.evaluate JSON report (C_ref per cell)")
    ap.add_argument("model", help="CGINS checkpoint")
    ap.add_argument("--data", default="data/heldout32", help="the report's data set")
    ap.add_argument("--family", default=None, help="only cells of this family")
    ap.add_argument("--kind", default=None, help="only cells of this kind (named, random, sheet, network)")
    ap.add_argument("--n", type=int, default=None, help="the first N selected cells")
    ap.add_argument("--t", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--output", default=None, help="per-cell JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with (gzip.open if args.report.endswith(".gz") else open)(args.report, "rt") as fh:
        rep = json.load(fh)
    cells = [c for c in rep["cells"] if (args.kind is None or c.get("kind") == args.kind)
             and (args.family is None or c["family"] == args.family)][:args.n]
    ds, _ = open_dataset(args.data)
    net = load_eval_model("m", args.model, "cpu").net
    rows = []
    for c in cells:
        tc = time.perf_counter()
        op = cell_operator(ds.cell(c["row"]), dtype=torch.float64, soft=1e-6)
        C_ref = np.asarray(c["C_ref"])

        def delta(u):
            return float(np.linalg.norm(op.chom(u).cpu().numpy() - C_ref) / np.linalg.norm(C_ref))

        with torch.no_grad():
            f = op.rhs()
            M = build_multigrid(op)
            cs = CoarseSpaces(M)
            ustar, info = pcg(op, f, precond=M, rtol=1e-10, maxiter=500)
            u0 = predict(net, op, 0).to(torch.float64)
            ut = embedded_pcg(op, f, u0, args.t)
            r = {"ref_delta": delta(ustar), "net_t0": delta(u0), "net_t": delta(ut)}
            for name, u in (("t0", u0), ("t", ut)):
                e = u - ustar
                r[f"share16_{name}"] = cs.share(op, e, 1)
                r[f"share8_{name}"] = cs.share(op, e, 2)
            for l, tag in ((1, "cc16"), (2, "cc8")):
                v = u0 + cs.correction(f - op.apply(u0), l)
                r[f"net_{tag}_t0"], r[f"net_{tag}_t"] = delta(v), delta(embedded_pcg(op, f, v, args.t))
                w = cs.correction(f, l)
                r[f"zero_{tag}_t"] = delta(embedded_pcg(op, f, w, args.t))
                r[f"net_t_{tag}"] = delta(ut + cs.correction(f - op.apply(ut), l))
            r["zero_t"] = delta(embedded_pcg(op, f, torch.zeros_like(u0), args.t))
        rows.append({"id": c["id"], "family": c["family"], "kind": c.get("kind"), "vf": c["vf"], **r})
        print(c["id"], " ".join(f"{k} {v:.4f}" for k, v in r.items()), f"| {time.perf_counter() - tc:.1f} s",
              file=sys.stderr, flush=True)
    keys = [k for k in rows[0] if k not in ("id", "family", "kind", "vf")]
    groups = sorted({(r["family"], r["kind"]) for r in rows})
    print(f"means over the cells, t = {args.t}; delta columns: C^H error, share columns: share of the energy-norm error")
    print("| family | kind | n | " + " | ".join(keys) + " |")
    print("|---" * (3 + len(keys)) + "|")
    for g in groups:
        sel = [r for r in rows if (r["family"], r["kind"]) == g]
        print(f"| {g[0]} | {g[1]} | {len(sel)} | " + " | ".join(f"{np.mean([r[k] for r in sel]):.4f}" for k in keys) + " |")
    if args.output:
        with open(args.output, "w") as fh:
            json.dump({"argv": sys.argv, "t": args.t, "model": args.model, "cells": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
