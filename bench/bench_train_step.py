"""Time of one CGINS training step (forward, loss, backward, optimizer) and the memory
autograd keeps for backward, with the two ways autograd can go through K u:

* "symmetric": ``solver.operator._SymmetricApply``, the default. One recorded node per
  apply; its backward is one more apply (K is symmetric), by the fused C kernel on CPU.
* "conv chain": the convolution chain recorded op by op (what training used before;
  forced here by turning ``ElasticityOperator._symmetric_grad_ok`` off).

    python bench/bench_train_step.py [--t 4 10] [--threads 1] [--rounds 3] [--write]
    python bench/bench_train_step.py --device cuda --config configs/cgins_wide32_deep28_mix11_t10.yaml --t 10

The cells are the first ``--batch`` draws of the training generator at 32^3 (the
families in turn, ``hpc.train.generated_cells``: no data set needed); the model is the
shipped configuration (models/config.yaml) with t overridden, freshly initialised from
seed 0. The forms alternate within each round; the table gives the median over rounds.
"Saved for backward" is the total size of the distinct tensors autograd packs during
forward and loss (``torch.autograd.graph.saved_tensors_hooks``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine, machine_line, markdown_table, update_section  # noqa: E402

FORMS = ("symmetric", "conv chain")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="models/config.yaml", help="model / loss config (default: the shipped model's)")
    p.add_argument("--t", type=int, nargs="+", default=[4, 10], help="embedded PCG steps")
    p.add_argument("--batch", type=int, nargs="+", default=[4], help="cells per step (several: one run each)")
    p.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS),
                   help="ways through K u to time (default both; --write needs both)")
    p.add_argument("--n", type=int, default=32, help="voxels per axis")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default cpu)")
    p.add_argument("--write", action="store_true", help="replace the bench-train-step section of BENCHMARKS.md")
    return p.parse_args(argv)


class SavedBytes:
    """Bytes of the distinct tensors autograd saves while the context is open."""

    def __init__(self):
        self.seen, self.bytes = set(), 0

    def pack(self, t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in self.seen:
            self.seen.add(key)
            self.bytes += key[1]
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def _now(device) -> float:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)     # the queued kernels belong to the phase that queued them
    return time.perf_counter()


def one_step(net, opt, ops, loss_cfg):
    from model.loss import cgins_loss
    dev = ops[0].device
    opt.zero_grad(set_to_none=True)
    t0 = _now(dev)
    with SavedBytes() as saved:
        out = net(ops)
        t1 = _now(dev)
        loss, _ = cgins_loss(ops, out, loss_cfg)
    t2 = _now(dev)
    loss.backward()
    t3 = _now(dev)
    opt.step()
    t4 = _now(dev)
    return {"forward": t1 - t0, "loss": t2 - t1, "backward": t3 - t2, "total": t4 - t0,
            "saved_mb": saved.bytes / 2**20, "loss_value": float(loss.detach())}


def run(args) -> list:
    rows = []
    for batch in args.batch:
        rows += run_batch(args, batch)
    return rows


def run_batch(args, batch) -> list:
    from hpc.train import generated_cells
    from model.network import CGINS
    from model.train import cell_operator, load_config
    from solver.operator import ElasticityOperator

    torch.set_num_threads(args.threads)
    cells = generated_cells({"n": args.n, "samples_per_family": -(-batch // 3)})[:batch]
    mc, lc, tc, _ = load_config(args.config)
    ops = [cell_operator(c, torch.float32, args.device, tc.soft) for c in cells]
    form_of_apply = ops[0].apply_form()
    symmetric_ok = ElasticityOperator._symmetric_grad_ok
    rows = []
    for t in args.t:
        mc.t, mc.use_pcg = t, t > 0
        res = {f: [] for f in args.forms}
        for r in range(args.rounds + 1):            # round 0 warms up (maps, kernel, allocator)
            for form in args.forms:
                ElasticityOperator._symmetric_grad_ok = symmetric_ok if form == "symmetric" else \
                    (lambda self: False)
                torch.manual_seed(0)
                net = CGINS(mc).to(args.device)
                opt = torch.optim.AdamW(net.parameters(), lr=tc.lr)
                m = one_step(net, opt, ops, lc)
                if r:
                    res[form].append(m)
        ElasticityOperator._symmetric_grad_ok = symmetric_ok
        loss_diff = abs(res[args.forms[0]][0]["loss_value"] - res[args.forms[-1]][0]["loss_value"])
        for form in args.forms:
            med = {k: statistics.median(m[k] for m in res[form]) for k in ("forward", "loss", "backward", "total")}
            rows.append({"t": t, "batch": batch, "form": form, **med, "saved_mb": res[form][0]["saved_mb"],
                         "loss_diff": loss_diff, "apply": form_of_apply if form == "symmetric" else "conv"})
            print(f"t={t:2d} batch {batch:3d} {form:10s}: forward {med['forward']:.2f} s, loss {med['loss']:.2f} s, "
                  f"backward {med['backward']:.2f} s, step {med['total']:.2f} s ({med['total'] / batch:.3f} s a cell); "
                  f"saved {res[form][0]['saved_mb']:.0f} MB", flush=True)
    return rows


def section(rows, m, args) -> str:
    table = []
    by_t = {}
    for r in rows:
        by_t.setdefault(r["t"], {})[r["form"]] = r
    for t, d in by_t.items():
        for form in FORMS:
            r = d[form]
            speed = d["conv chain"]["total"] / r["total"]
            table.append([t, f"{form} ({r['apply']})", f"{r['forward']:.2f}", f"{r['loss']:.2f}",
                          f"{r['backward']:.2f}", f"{r['total']:.2f}", f"{speed:.2f}x", f"{r['saved_mb']:.0f}"])
    diffs = ", ".join(f"t = {t}: {d['symmetric']['loss_diff']:.1e}" for t, d in by_t.items())
    return "\n".join([
        "## CGINS training step: autograd through K u (issue 5)",
        "",
        f"`python bench/bench_train_step.py --t {' '.join(map(str, args.t))} --threads {args.threads} "
        f"--rounds {args.rounds} --write`; {machine_line(m)}.",
        "",
        f"One training step of the shipped model's configuration (channels 8/16/32, two levels) on "
        f"{args.batch[0]} generated {args.n}^3 cells, float32, {args.threads} thread(s); seconds, median of "
        f"{args.rounds} rounds with the two forms alternating. \"symmetric\": K u recorded as one node whose "
        "backward is one more apply (the default); \"conv chain\": the convolution chain recorded op by op, "
        "as before. Speed-up is the conv chain's step time over the row's.",
        "",
        markdown_table(["t", "autograd through K u", "forward", "loss", "backward", "step", "speed-up",
                        "saved for backward (MB)"], table),
        "",
        f"The two forms give the same loss to rounding (absolute difference of the first step's loss: {diffs}); "
        "tests/test_model_network.py checks the gradients against each other (float64 to 1e-12).",
    ])


def main(argv=None) -> int:
    args = parse(argv)
    if args.write and args.device != "cpu":
        print("bench_train_step: --write records the CPU section; drop it with --device", file=sys.stderr)
        return 2
    if args.write and (len(args.batch) > 1 or len(args.forms) < len(FORMS)):
        print("bench_train_step: --write records one --batch and both --forms", file=sys.stderr)
        return 2
    rows = run(args)
    if args.write:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        update_section(os.path.join(root, "BENCHMARKS.md"), "bench-train-step", section(rows, machine(), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
