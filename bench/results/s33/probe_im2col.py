"""Session 33 probe (BENCHMARKS.md, "CGINS training step"): the periodic sparse convolution as it is
(model/sparse_conv.py: per kernel offset, gather - GEMM - scatter) against an "im2col" form (gather the 27
neighbours of every output voxel into one (N, 27 C_in) matrix, one GEMM), forward and backward through
autograd, on 4 random half-full 32^3 masks (65271 active voxels), two threads; the third of three rounds.

    python bench/results/s33/probe_im2col.py
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
from model.sparse_conv import SparseGrid, sparse_conv  # noqa: E402

torch.set_num_threads(2)
torch.manual_seed(0)
n, B = 32, 4
grid = SparseGrid.from_mask(torch.rand(B, n, n, n) < 0.5)
nmap = grid.neighbour_map(3, True)
N, K = len(grid), nmap.n_offsets
print("active", N, "pairs", nmap.in_idx.numel())

# nbr[o, d]: the input row that offset d of output o reads (n_in: a zero row appended to x)
offset = torch.repeat_interleave(torch.arange(K), torch.tensor(nmap.counts))
nbr = torch.full((nmap.n_out, K), nmap.n_in, dtype=torch.long)
nbr[nmap.out_idx, offset] = nmap.in_idx


def im2col(x, w):
    cols = torch.cat([x, x.new_zeros(1, x.shape[1])])[nbr].reshape(N, -1)
    return cols @ w.reshape(-1, w.shape[2])


for c in (32, 64):
    x = torch.randn(N, c, requires_grad=True)
    w = torch.randn(K, c, c, requires_grad=True)
    for name, f in (("gather-GEMM-scatter", lambda: sparse_conv(x, w, nmap)), ("im2col", lambda: im2col(x, w))):
        for _ in range(3):
            t0 = time.perf_counter()
            y = f()
            t1 = time.perf_counter()
            y.sum().backward()
            t2 = time.perf_counter()
        print(f"{c} channels, {name}: forward {t1 - t0:.3f} s, backward {t2 - t1:.3f} s")
    print("max difference", float((sparse_conv(x, w, nmap) - im2col(x, w)).detach().abs().max()))
