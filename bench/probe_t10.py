"""Two cheap changes around the embedded PCG, measured on held-out cells without retraining
(issue 5, session 15): does either lower delta at t = 10 where the network is weakest?

- **Galerkin start**: replace the network's output u by the energy-optimal field in a small
  subspace spanned by it before the t PCG steps: ``scale`` (u_i * a_i per load case),
  ``span6`` (each load case in the span of all six predicted fields) and ``span18`` (the
  same with the three components of each field split: 18 vectors). Each is the minimum of
  the potential energy over its subspace, so its own C^H error (energy form) can only be
  lower than the raw output's.
- **Block PCG**: the six load cases share one Krylov space (O'Leary's block CG, Jacobi
  preconditioner, the mean-free projection); ``block18`` splits the components of every
  search block. Each load case then searches a space six (eighteen) times as large for
  the same number of iterations.

Every variant is compared with the per-case Jacobi-PCG of the network (model.embedded_pcg),
from the network's output and from zero; delta against the reference C^H of an
`hpc.evaluate` report (its `C_ref` per cell; the cells are matched by row).

    python bench/probe_t10.py REPORT.json[.gz] MODEL.pt --data data/heldout32 [--kind random] [--n 20]
        [--device cuda] [-o out.json]
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
from model.embedded_pcg import embedded_pcg, mean_free  # noqa: E402
from model.train import cell_operator  # noqa: E402


def pinv_sym(A: torch.Tensor) -> torch.Tensor:
    """Pseudo-inverse of a symmetric (positive semi-definite) matrix: the span of a
    few predicted fields can be rank deficient (a field that is zero in a component)."""
    w, V = torch.linalg.eigh(0.5 * (A + A.T))
    keep = w.abs() > w.abs().max() * 1e-12
    return (V[:, keep] / w[keep]) @ V[:, keep].T


def split_components(X: torch.Tensor) -> torch.Tensor:
    """(b, 3, ...) -> (3b, 3, ...): each field's components as separate vectors."""
    out = torch.zeros(3 * X.shape[0], 3, *X.shape[2:], dtype=X.dtype, device=X.device)
    for j in range(X.shape[0]):
        for c in range(3):
            out[3 * j + c, c] = X[j, c]
    return out


def apply_blocks(op, V: torch.Tensor) -> torch.Tensor:
    return torch.cat([op.apply(V[i:i + 6]) for i in range(0, V.shape[0], 6)])


def combine(a: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """sum_m a[m, i] V[m] for every column i."""
    return torch.einsum("mi,m...->i...", a.to(V.dtype), V)


def galerkin_start(op, u: torch.Tensor, f: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "scale":
        num, den = op.dot(f, u), op.dot(u, op.apply(u))
        return u * (num / den).to(u.dtype)[:, None, None, None, None]
    V = split_components(u) if mode == "span18" else u
    return combine(pinv_sym(op.gram(V, apply_blocks(op, V))) @ op.gram(V, f), V)


def block_pcg(op, F: torch.Tensor, X0: torch.Tensor, t: int, split: bool = False) -> torch.Tensor:
    """t iterations of block Jacobi-PCG for K X = F (all load cases at once)."""
    P_ = lambda v: mean_free(op, v)  # noqa: E731
    dinv = 1.0 / op.diagonal()
    X = P_(X0)
    R = P_(F - op.apply(X))
    Z = P_(R * dinv)
    P = split_components(Z) if split else Z
    for _ in range(t):
        Q = apply_blocks(op, P)
        PQinv = pinv_sym(op.gram(P, Q))
        a = PQinv @ op.gram(P, R)
        X = X + combine(a, P)
        R = P_(R - combine(a, Q))
        Z = P_(R * dinv)
        Zs = split_components(Z) if split else Z
        P = Zs + combine(-(PQinv @ op.gram(Q, Zs)), P)      # K-conjugate to the last block
    return X


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("report", help="an hpc.evaluate JSON report (C_ref per cell)")
    ap.add_argument("model", help="CGINS checkpoint")
    ap.add_argument("--data", default="data/heldout32", help="the report's data set")
    ap.add_argument("--kind", default=None, help="only cells of this kind (named, random, sheet, network)")
    ap.add_argument("--family", default=None, help="only cells of this family")
    ap.add_argument("--n", type=int, default=None, help="the first N selected cells")
    ap.add_argument("--t", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:k]")
    ap.add_argument("-o", "--output", default=None, help="per-cell JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with (gzip.open if args.report.endswith(".gz") else open)(args.report, "rt") as fh:
        rep = json.load(fh)
    cells = [c for c in rep["cells"] if (args.kind is None or c.get("kind") == args.kind)
             and (args.family is None or c["family"] == args.family)][:args.n]
    ds, _ = open_dataset(args.data)
    net = load_eval_model("m", args.model, args.device).net
    rows = []
    for c in cells:
        tc = time.perf_counter()
        op = cell_operator(ds.cell(c["row"]), dtype=torch.float64, device=args.device, soft=1e-6)
        C_ref = np.asarray(c["C_ref"])

        def delta(u):
            return float(np.linalg.norm(op.chom(u).cpu().numpy() - C_ref) / np.linalg.norm(C_ref))

        with torch.no_grad():
            u = predict(net, op, 0).to(torch.float64)
            f = op.rhs()
            zero = torch.zeros_like(u)
            r = {"net_t0": delta(u), "net_pcg": delta(embedded_pcg(op, f, u, args.t)),
                 "zero_pcg": delta(embedded_pcg(op, f, zero, args.t))}
            for mode in ("scale", "span6", "span18"):
                g = galerkin_start(op, u, f, mode)
                r[f"{mode}_t0"], r[f"{mode}_pcg"] = delta(g), delta(embedded_pcg(op, f, g, args.t))
            r["net_block"] = delta(block_pcg(op, f, u, args.t))
            r["net_block18"] = delta(block_pcg(op, f, u, args.t, split=True))
            r["zero_block"] = delta(block_pcg(op, f, zero, args.t))
        rows.append({"id": c["id"], "family": c["family"], "kind": c.get("kind"), "vf": c["vf"], **r})
        print(c["id"], " ".join(f"{k} {v:.4f}" for k, v in r.items()), f"| {time.perf_counter() - tc:.1f} s",
              file=sys.stderr, flush=True)
    keys = [k for k in rows[0] if k not in ("id", "family", "kind", "vf")]
    groups = sorted({(r["family"], r["kind"]) for r in rows})
    print(f"mean delta over the cells, t = {args.t} (t0: the start itself)")
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
