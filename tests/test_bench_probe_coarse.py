"""bench/probe_coarse.py: the energy-norm share of an error on the multigrid's coarse
spaces, and the exact coarse-grid correction it measures.

Oracles: a field prolongated from level l lies wholly in range(P_l) (share 1); the
coarse spaces are nested, so a field's share on 4^3 is at most its share on 8^3; the
coarse correction is the K-orthogonal projection of the error, so the corrected field's
energy is lower and its residual restricts to zero on that level.
"""
import os
import sys

import numpy as np
import torch

from model.embedded_pcg import mean_free
from solver.multigrid import build_multigrid
from solver.operator import ElasticityOperator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import probe_coarse as probe  # noqa: E402

sys.path.pop(0)
torch.set_num_threads(1)
F64 = torch.float64


def _setup(n=16, seed=0):
    rng = np.random.default_rng(seed)
    phases = (rng.random((n, n, n)) < 0.6).astype(np.uint8)
    op = ElasticityOperator.from_phases(phases, [1e-3, 1.0], [0.3, 0.3], (1.0 / n,) * 3, dtype=F64)
    cs = probe.CoarseSpaces(build_multigrid(op, max_coarse=64))       # 16^3 -> 8^3 -> 4^3 (dense)
    assert [lv.shape for lv in cs.levels] == [(16, 16, 16), (8, 8, 8), (4, 4, 4)]
    return op, cs


def _rand(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64)


def _energy(op, u, f):
    return 0.5 * op.dot(u, op.apply(u)) - op.dot(f, u)


def test_prolongated_fields_lie_in_their_coarse_space_and_the_spaces_are_nested():
    op, cs = _setup()
    for l in (1, 2):
        v = _rand((6, 3) + cs.levels[l].shape, seed=l)
        e = mean_free(op, cs.up(v, l))
        assert abs(cs.share(op, e, l) - 1.0) < 1e-8, l
    e = mean_free(op, _rand(op.rhs().shape, seed=3))
    s8, s4 = cs.share(op, e, 1), cs.share(op, e, 2)
    assert 0.0 < s4 <= s8 + 1e-12 < 1.0, (s8, s4)
    # a smooth (coarse) error has a large share, a random one a small one
    assert s8 < 0.5


def test_coarse_correction_lowers_the_energy_and_zeroes_the_restricted_residual():
    op, cs = _setup()
    f = op.rhs()
    u = mean_free(op, 1e-2 * _rand(f.shape, seed=4))
    for l in (1, 2):
        v = u + cs.correction(f - op.apply(u), l)
        assert torch.all(_energy(op, v, f) < _energy(op, u, f)), l
        rc = probe._mean_free(cs.down(f - op.apply(v), l))
        r0 = probe._mean_free(cs.down(f - op.apply(u), l))
        assert float(rc.norm() / r0.norm()) < 1e-8, l
