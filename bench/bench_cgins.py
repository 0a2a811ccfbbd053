"""The shipped CGINS warm start against a zero start (issue 5), on held-out cells
generated from configs/data_heldout.yaml (a seed the training set does not use).

    python bench/bench_cgins.py --model models/cgins_default.pt --per-family 4 [--write]

For each cell: delta = ||C^H(u) - C_ref||_F / ||C_ref||_F of the network output (after
its embedded PCG steps) and of the zero start after the same number of Jacobi-PCG
steps; then PCG iterations and time to rtol 1e-6 (multigrid and Jacobi, float32)
from zero and from the network, inference included. C_ref: multigrid PCG, float64,
rtol 1e-9.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, machine_line, markdown_table, update_section  # noqa: E402


def main():
    from microstructures.cell import Cell
    from model.data import DataConfig, make_sample
    from model.train import load_model, warm_start
    from solver import homogenize
    from solver.operator import ElasticityOperator
    from solver.pcg import pcg

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/cgins_default.pt")
    ap.add_argument("--data", default="configs/data_heldout.yaml")
    ap.add_argument("--per-family", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = DataConfig.from_yaml(a.data)
    net = load_model(a.model)
    t_embedded = net.cfg.t if hasattr(net, "cfg") else None
    fams = {}
    i = 0
    while min([len(fams.get(f, [])) for f in ("tpms", "lattice", "shell")] or [0]) < a.per_family and i < 300:
        ph, p = make_sample(cfg, i)
        i += 1
        fam = p["family"]
        if len(fams.setdefault(fam, [])) < a.per_family:
            fams[fam].append((ph, p))
    rows = []
    for fam, items in fams.items():
        for ph, p in items:
            cell = Cell(ph, [0.0, p["E"]], [p["nu"], p["nu"]])
            n = ph.shape[0]
            ref = homogenize(cell, rtol=1e-9, preconditioner="multigrid").C
            nref = np.linalg.norm(ref)
            op = ElasticityOperator.from_phases(ph, cell.E, cell.nu, (1.0 / n,) * 3, dtype=torch.float32)
            t0 = time.perf_counter()
            u = warm_start(net, op)
            t_inf = time.perf_counter() - t0
            d_net = np.linalg.norm(op.chom(u).numpy() - ref) / nref
            steps = getattr(getattr(net, "cfg", None), "t", 4)
            x, _ = pcg(op, op.rhs(), rtol=0.0, maxiter=max(1, steps))
            d_zero = np.linalg.norm(op.chom(x).numpy() - ref) / nref
            out = [fam, f"{p['vf_achieved']:.2f}", f"{d_zero:.3f}", f"{d_net:.3f}", f"{t_inf:.2f}"]
            for pc in ("multigrid", "jacobi"):
                r0 = homogenize(cell, rtol=1e-6, precision="float32", preconditioner=pc)
                r1 = homogenize(cell, rtol=1e-6, precision="float32", preconditioner=pc,
                                x0=lambda o: warm_start(net, o).to(o.dtype))
                out += [f"{max(r0.iterations)} -> {max(r1.iterations)}",
                        f"{r0.times['total']:.1f} -> {r1.times['total']:.1f}"]
            rows.append(out)
            print(out, flush=True)
    m = machine()
    table = markdown_table(["family", "VF", f"delta zero+{steps} Jacobi-PCG", f"delta network (+{steps} embedded)",
                            "inference s", "MG-PCG it. zero -> net", "MG total s", "Jacobi-PCG it. zero -> net",
                            "Jacobi total s"], rows)
    text = (f"## CGINS warm start (shipped model) vs zero start\n\n"
            f"Machine: {machine_line(m)}. Model: `{a.model}` (sha256 {net.sha256[:12]}), cells from "
            f"`{a.data}` (held-out seed), {a.per_family} per family, 32^3, rtol 1e-6, float32; delta against "
            f"multigrid PCG float64 rtol 1e-9.\nCommand: `python bench/bench_cgins.py --per-family {a.per_family}"
            f" --write`\n\n{table}\n")
    print(text)
    if a.write:
        update_section(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "BENCHMARKS.md"), "bench-cgins", text)


if __name__ == "__main__":
    from common import on_tcmalloc
    on_tcmalloc()
    main()
