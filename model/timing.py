"""Wall-clock profile of one CGINS training step (forward, loss, backward) and of the
sparse convolution against dense circular Conv3d.

    python -m model.timing --n 32 --batch 4 --config configs/cgins_default.yaml

Prints a table (machine-dependent numbers; tests never assert them).
"""
from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from solver.operator import ElasticityOperator

from .loss import cgins_loss
from .network import CGINS
from .sparse_conv import SparseConv3d, SparseTensor
from .train import load_config


def gyroid_op(n, shift=0.0, level=0.5):
    x = (np.arange(n) + 0.5) / n
    X, Y, Z = np.meshgrid(x, x, x, indexing="ij")
    t = 2 * np.pi
    v = np.sin(t * X + shift) * np.cos(t * Y) + np.sin(t * Y) * np.cos(t * Z) + np.sin(t * Z) * np.cos(t * X)
    ph = (np.abs(v) < level).astype(np.uint8)
    return ElasticityOperator.from_phases(ph, [0.0, 1.0], [0.3, 0.3], (1.0 / n,) * 3), ph


def _t(fn, reps):
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--config", default="configs/cgins_default.yaml")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)
    mc, lc, tc, _ = load_config(a.config)
    torch.manual_seed(0)
    net = CGINS(mc)
    ops = [gyroid_op(a.n, 0.7 * i)[0] for i in range(a.batch)]
    grid = net.active_set(torch.stack([op.mu for op in ops]).float())
    print(f"# {platform.node()} {platform.processor()} torch {torch.__version__} threads {torch.get_num_threads()}")
    print(f"# n={a.n} batch={a.batch} active={grid.n_active} ({grid.n_active / (a.batch * a.n ** 3):.2f} of voxels)"
          f" weights={sum(p.numel() for p in net.parameters())} t={mc.t} levels={mc.levels}")

    def fwd():
        with torch.no_grad():
            net(ops)

    def step():
        net.zero_grad()
        loss, _ = cgins_loss(ops, net(ops), lc)
        loss.backward()

    def pcg_only():
        from .embedded_pcg import embedded_pcg
        for op in ops:
            embedded_pcg(op, op.rhs(), torch.zeros(6, 3, a.n, a.n, a.n, dtype=op.dtype), mc.t)

    print(f"forward (no grad)          {_t(fwd, a.reps) * 1e3:9.1f} ms")
    print(f"  of which embedded PCG    {_t(pcg_only, a.reps) * 1e3:9.1f} ms")
    print(f"forward + loss + backward  {_t(step, a.reps) * 1e3:9.1f} ms")
    # one 32 -> 32 channel 3x3x3 conv: sparse on the active set vs dense circular Conv3d
    C = mc.channels[0]
    conv = SparseConv3d(C, C)
    xs = SparseTensor(torch.randn(grid.n_active, C), grid)
    w = torch.randn(C, C, 3, 3, 3)
    xd = torch.randn(a.batch, C, a.n, a.n, a.n)
    grid.neighbour_map(3, True)
    with torch.no_grad():
        ts = _t(lambda: conv(xs), a.reps)
        td = _t(lambda: F.conv3d(F.pad(xd, (1,) * 6, mode="circular"), w), a.reps)
    print(f"conv {C}->{C} sparse           {ts * 1e3:9.1f} ms   dense circular Conv3d {td * 1e3:9.1f} ms")


if __name__ == "__main__":
    main()
