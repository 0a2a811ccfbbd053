"""bench/probe_t10.py: the Galerkin starts and the block PCG it measures.

Oracles: nested subspaces (raw u in the span of its scaling, in the span of the six fields,
in the span of their 18 components) give energies that can only fall; block CG's first
step searches a superset of per-case CG's first step; enough block iterations reach the
solution per-case PCG reaches.
"""
import os
import sys

import numpy as np
import torch

from model.embedded_pcg import embedded_pcg, mean_free
from solver.operator import ElasticityOperator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import probe_t10 as probe  # noqa: E402

sys.path.pop(0)
torch.set_num_threads(1)
F64 = torch.float64


def _op(n=8, seed=0):
    rng = np.random.default_rng(seed)
    phases = (rng.random((n, n, n)) < 0.6).astype(np.uint8)
    return ElasticityOperator.from_phases(phases, [1e-3, 1.0], [0.3, 0.3], (1.0 / n,) * 3, dtype=F64)


def _energy(op, u, f):
    """Per load case 1/2 u.Ku - f.u (6,)."""
    return 0.5 * op.dot(u, op.apply(u)) - op.dot(f, u)


def _start(op, seed=1):
    g = torch.Generator().manual_seed(seed)
    return mean_free(op, 1e-2 * torch.randn(op.rhs().shape, generator=g, dtype=F64))


def test_galerkin_starts_lower_the_energy_in_nested_order():
    op = _op()
    f, u = op.rhs(), _start(op)
    e = {"raw": _energy(op, u, f)}
    for mode in ("scale", "span6", "span18"):
        e[mode] = _energy(op, probe.galerkin_start(op, u, f, mode), f)
    tol = 1e-12 * float(e["raw"].abs().max())
    for a, b in (("raw", "scale"), ("scale", "span6"), ("span6", "span18")):
        assert torch.all(e[b] <= e[a] + tol), (a, b, e[a], e[b])
    assert torch.all(e["span18"] < e["raw"] - 1e-3 * e["raw"].abs())      # a random start is far off


def test_block_pcg_first_step_beats_per_case_and_converges_to_the_same_solution():
    op = _op()
    f, u = op.rhs(), _start(op)
    e_case = _energy(op, embedded_pcg(op, f, u, 1), f)
    e_block = _energy(op, probe.block_pcg(op, f, u, 1), f)
    e_block18 = _energy(op, probe.block_pcg(op, f, u, 1, split=True), f)
    tol = 1e-12 * float(e_case.abs().max())
    assert torch.all(e_block <= e_case + tol) and torch.all(e_block18 <= e_block + tol)
    x_ref = embedded_pcg(op, f, u, 300)
    x_blk = probe.block_pcg(op, f, u, 60)
    C_ref, C_blk = op.chom(x_ref).numpy(), op.chom(x_blk).numpy()
    assert np.linalg.norm(C_blk - C_ref) <= 1e-8 * np.linalg.norm(C_ref)
