"""Session 33 probe (BENCHMARKS.md, "CGINS training step"): the periodic sparse convolution as it is
(model/sparse_conv.py: per kernel offset, gather - GEMM - scatter) against an "im2col" form (gather the 27
neighbours of every output voxel into one (N, 27 C_in) matrix, one GEMM), forward and backward through
autograd, on 4 random half-full 32^3 masks (65271 active voxels), two threads.

    python bench/results/s33/probe_im2col.py
"""
import sys, time, torch
sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "..", "..", ".."))
from model.sparse_conv import SparseGrid, sparse_conv
torch.set_num_threads(2)
torch.manual_seed(0)
n=32; B=4
mask = torch.rand(B,n,n,n) < 0.5
g = SparseGrid.from_mask(mask)
nm = g.neighbour_map(3, True)
N = len(g); K = nm.n_offsets
print("active", N, "pairs", nm.in_idx.numel())
def build_nbr(nm):
    off = torch.repeat_interleave(torch.arange(nm.n_offsets), torch.tensor(nm.counts))
    nbr = torch.full((nm.n_out, nm.n_offsets), nm.n_in, dtype=torch.long)
    nbr[nm.out_idx, off] = nm.in_idx
    return nbr
nbr = build_nbr(nm)
for C, Co in [(32,32),(64,64)]:
    x = torch.randn(N, C, requires_grad=True); W = torch.randn(K, C, Co, requires_grad=True)
    def im2col(x, W):
        xp = torch.cat([x, x.new_zeros(1, x.shape[1])])
        cols = xp[nbr].reshape(N, K*C)
        return cols @ W.reshape(K*C, Co)
    for name, f in [("ggs", lambda: sparse_conv(x, W, nm)), ("im2col", lambda: im2col(x, W))]:
        for r in range(3):
            t0=time.perf_counter(); y=f(); t1=time.perf_counter(); y.sum().backward(); t2=time.perf_counter()
        print(C, name, f"fwd {t1-t0:.3f} bwd {t2-t1:.3f}")
    y1 = sparse_conv(x, W, nm); y2 = im2col(x, W); print("maxdiff", (y1-y2).abs().max().item(), y1.abs().max().item())
