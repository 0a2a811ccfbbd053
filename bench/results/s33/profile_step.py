"""Session 33 (BENCHMARKS.md, "CGINS training step"): torch.profiler over one training step of the
model of configs/cgins_gpu_ft2_mix11_t10.yaml (t = 10) on 4 generated 32^3 cells, two threads, after
one warm-up step; the table sorted by self CPU time.

    python bench/results/s33/profile_step.py
"""
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..")
sys.path[:0] = [os.path.join(ROOT, "bench"), ROOT]
from bench_train_step import one_step  # noqa: E402
from hpc.train import generated_cells  # noqa: E402
from model.network import CGINS  # noqa: E402
from model.train import cell_operator, load_config  # noqa: E402

torch.set_num_threads(2)
cells = generated_cells({"n": 32, "samples_per_family": 2})[:4]
mc, lc, tc, _ = load_config(os.path.join(ROOT, "configs", "cgins_gpu_ft2_mix11_t10.yaml"))
ops = [cell_operator(c, torch.float32, "cpu", tc.soft) for c in cells]
torch.manual_seed(0)
net = CGINS(mc)
opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
one_step(net, opt, ops, lc)
with profile(activities=[ProfilerActivity.CPU]) as prof:
    print(one_step(net, opt, ops, lc))
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
