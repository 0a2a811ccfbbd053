"""Throughput of the matrix-free operator apply (issue 3 item 3) next to the machine's
measured matrix-multiply rate, and the per-rank numbers the scaling model uses.

    python bench/bench_operator.py --n 32 64 128 [--threads 1 2] [--write]
    python bench/bench_operator.py --chunk-sweep --n 64 128 [--threads 1 2]

``--chunk-sweep`` times the apply of the fine operator and of the first coarse level
(the multigrid's GalerkinCoefficientOperator) for slab sizes 2^15 .. 2^20 voxel-cases,
six load cases and one, the sizes interleaved over three rounds (median of the
rounds, two applies each): how solver.operator.default_chunk was chosen.

FLOPs are counted for the form that computes the apply. With one Poisson ratio
everywhere (a solid and its soft void, "one nu") the CPU apply is the fused C kernel
(solver/native.py): f_e = mu_e K0 u_e, 2 * 24 * 24 = 1152 flop per voxel and load
case (it skips the 3 columns that meet the zeros of u_e minus its corner 0, so it
executes 2 * 24 * 21). The convolution form ("conv") is k_e = G^T S_e G, 2 * (rows *
24 * 2) per voxel and load case: G has 18 rows with one Poisson ratio (1728 flop) and
25 when lambda and mu vary independently ("lambda, mu": 2400 flop), the only form
there. All are timed on the same gyroid ("lambda, mu" gives the void nu = 0.2), six
cases at once.
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

FORMS = ("one nu, native", "one nu, conv", "lambda, mu, conv")


def flop_per_voxel_case(op, form: str) -> int:
    if form.endswith("native"):
        return 2 * 24 * 24
    return 2 * op.weight.shape[0] * 24 * 2


def apply_of(op, form: str):
    """The apply that ``form`` names: op.apply (which takes the fused C kernel with one
    Poisson ratio) or the gather convolutions, float32 (the scatter form in float64)."""
    if form.endswith("native"):
        assert op.apply_form() == "native", "the fused C apply did not serve: " + op.apply_form()
        return op.apply
    if op.dtype == torch.float64:
        return op._apply_scatter
    return op._apply_gather


def timeit(fn, reps):
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def matmul_rate(dtype=torch.float32, n=2048):
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    return 2 * n ** 3 / timeit(lambda: a @ b, 5) / 1e9


CHUNKS = [1 << k for k in range(20, 14, -1)]


def chunk_sweep(a):
    from microstructures.generators import tpms
    from solver.multigrid import build_multigrid
    from solver.operator import ElasticityOperator, default_chunk
    torch.set_flush_denormal(True)
    cl = torch.channels_last_3d
    rows = []
    for th in a.threads:
        torch.set_num_threads(th)
        for n in a.n:
            cell = tpms("G", "sheet", vf=0.25, n=n)
            op = ElasticityOperator.from_phases(cell.phases, cell.E, cell.nu, (1.0 / n,) * 3, dtype=torch.float32)
            lev1 = build_multigrid(op).levels[1].op
            for name, o, dflt in (("fine", op, default_chunk("cpu")), ("level 1", lev1, default_chunk("cpu", True))):
                for B in (6, 1):
                    u = torch.randn(B, 3, *o.domain.local_shape, generator=torch.Generator().manual_seed(0))
                    u = u.contiguous(memory_format=cl)
                    ms = {c: [] for c in CHUNKS}
                    for c in CHUNKS:
                        o.chunk = c
                        o.apply(u)
                    for _ in range(3):
                        for c in CHUNKS:
                            o.chunk = c
                            ms[c].append(timeit(lambda: o.apply(u), 2) * 1e3)
                    med = {c: sorted(v)[1] for c, v in ms.items()}
                    best = min(med, key=med.get)
                    rows.append([th, n, name, B] + [f"**{med[c]:.0f}**" if c == best else f"{med[c]:.0f}" for c in CHUNKS]
                                + [f"{med[CHUNKS[0]] / med[dflt]:.2f}x"])
                    print(rows[-1], flush=True)
                o.chunk = dflt
    m = machine()
    print(f"Machine: {machine_line(m)}.\n")
    print(markdown_table(["threads", "n", "operator", "cases"] + [f"2^{c.bit_length() - 1}" for c in CHUNKS]
                         + ["2^20 / default"], rows))


def main():
    from microstructures.generators import tpms
    from solver.operator import ElasticityOperator
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--chunk-sweep", action="store_true", help="apply ms against the slab size (see above)")
    a = ap.parse_args()
    if a.chunk_sweep:
        return chunk_sweep(a)
    # as solver.homogenize does (flush_denormal=True): soft-void products underflow
    # into denormal floats, which the CPU handles ~3x slower
    torch.set_flush_denormal(True)
    rows = []
    for th in a.threads:
        torch.set_num_threads(th)
        mm = matmul_rate()
        for n in a.n:
            cell = tpms("G", "sheet", vf=0.25, n=n)
            for form in FORMS:
                one = form.startswith("one nu")
                nu = list(cell.nu) if one else [0.2] + list(cell.nu)[1:]
                for dt in (torch.float32, torch.float64):
                    if dt == torch.float64 and (n > 64 or not one):
                        continue
                    op = ElasticityOperator.from_phases(cell.phases, cell.E, nu, (1.0 / n,) * 3, dtype=dt)
                    assert (op.lame_ratio is not None) == one, form
                    u = op.rhs()
                    reps = max(2, int(2e7 / n ** 3))
                    fn = apply_of(op, form)
                    t_apply = timeit(lambda: fn(u), reps)
                    t_ghost = timeit(lambda: op.domain.ghost(u, hi=1), reps)
                    t_dot = timeit(lambda: op.dot(u, u), reps)
                    fl = flop_per_voxel_case(op, form)
                    gf = fl * 6 * n ** 3 / t_apply / 1e9
                    rows.append([th, n, str(dt).replace("torch.", ""), f"{form} ({fl})",
                                 f"{t_apply * 1e3:.1f}", f"{6 * n ** 3 / t_apply / 1e6:.1f}", f"{gf:.1f}",
                                 f"{mm:.0f}", f"{100 * gf / mm:.0f}%", f"{t_ghost * 1e3:.1f}",
                                 f"{t_dot * 1e3:.2f}"])
                    print(rows[-1], flush=True)
    m = machine()
    table = markdown_table(["threads", "n", "dtype", "form (flop per voxel-case)", "apply ms (6 cases)", "Mvoxel-cases/s", "GFLOP/s",
                            "sgemm GFLOP/s", "of sgemm", "ghost ms", "dot ms"], rows)
    text = (f"## Operator apply throughput (matrix-free hex8, six load cases)\n\n"
            f"Machine: {machine_line(m)}.\n"
            f"Command: `python bench/bench_operator.py --n {' '.join(map(str, a.n))} --threads "
            f"{' '.join(map(str, a.threads))} --write`. Gyroid sheet VF 0.25. GFLOP/s counts the flop "
            f"of the form timed: 'native', the fused C kernel that serves one Poisson ratio on CPU "
            f"(f_e = mu_e K0 u_e, 2 * 24 * 24 per voxel-case); 'conv', the convolution form k_e = "
            f"G^T S_e G (G has 18 rows with one Poisson ratio, 25 rows otherwise, 'lambda, mu': the "
            f"same cell with void nu 0.2; float64 takes its scatter variant); sgemm is a "
            f"2048^2 float32 matmul in the same process and thread count; denormals flushed to zero, as "
            f"solver.homogenize does.\n\n{table}\n")
    print(text)
    if a.write:
        update_section(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                    "BENCHMARKS.md"), "bench-operator", text)


if __name__ == "__main__":
    from common import on_tcmalloc
    on_tcmalloc()
    main()
