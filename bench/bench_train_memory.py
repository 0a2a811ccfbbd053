"""Resident set of a CGINS training run as it goes: glibc malloc vs tcmalloc, and the
operator cache bounded or not (why hpc.train runs on tcmalloc with train.operator_cache).

    python bench/bench_train_memory.py configs/cgins_cpu_ft7_t10.yaml --steps 150 [--write]

Each case is a fresh process that trains the config (its data, model, init_from and
seed; steps overridden, checkpoints into a temporary directory) in-process with
``model.train.train`` and prints the resident set (VmRSS) every ``--every`` steps:

* glibc, unbounded cache: what hpc.train did before session 37 (operator_cache huge);
* glibc, bounded cache: train.operator_cache = 256;
* tcmalloc, bounded cache: what ``python -m hpc.train`` does now.

The growth per step after the first ``--skip`` steps (a least-squares slope over the
samples) is what a long run adds; the first steps load the data and warm up. Steps
are the same cells in every case (same seed), so the cases differ only in memory.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

CASES = (("glibc, unbounded operator cache (before)", "system", 10 ** 9),
         ("glibc, operator_cache 256", "system", 256),
         ("tcmalloc, operator_cache 256 (hpc.train now)", "tcmalloc", 256))


def vm_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def child(a) -> None:
    import torch
    torch.set_num_threads(a.threads)
    from hpc.train import _training_cells
    from model.train import build_model, load_config, train
    mc, lc, tc, rest = load_config(a.config)
    with tempfile.TemporaryDirectory() as tmp:
        tc = dataclasses.replace(tc, steps=a.steps, checkpoint=os.path.join(tmp, "ck.pt"),
                                 checkpoint_every=10 ** 9, operator_cache=a.operator_cache)
        ns = argparse.Namespace(data=None, generate=None, resolution=None)
        cells, _ = _training_cells(rest.get("data"), ns)
        net = build_model(mc, tc)
        t0 = time.perf_counter()
        print(json.dumps({"step": 0, "rss_mb": vm_rss_mb(), "s": 0.0}), flush=True)

        def progress(step, row):
            if step % a.every == 0:
                print(json.dumps({"step": step, "rss_mb": vm_rss_mb(), "s": time.perf_counter() - t0}), flush=True)
        train(net, cells, mc, tc, lc, progress=progress)


def run_case(a, alloc: str, cache: int) -> list:
    from common import allocator_env
    env = allocator_env(alloc, a.threads)
    cmd = [sys.executable, os.path.abspath(__file__), a.config, "--child", "--steps", str(a.steps),
           "--every", str(a.every), "--threads", str(a.threads), "--operator-cache", str(cache)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{alloc} run failed:\n{out.stderr[-2000:]}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def slope(rows, skip: int) -> float:
    pts = [(r["step"], r["rss_mb"]) for r in rows if r["step"] >= skip]
    n = len(pts)
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--skip", type=int, default=70, help="steps left out of the growth slope (warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--operator-cache", type=int, default=256, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a)
    import torch
    torch.set_num_threads(a.threads)            # what the machine line reports (each row sets its own)
    from common import machine, machine_line, markdown_table, update_section
    results = []
    for name, alloc, cache in CASES:
        rows = run_case(a, alloc, cache)
        last = rows[-1]
        res = {"case": name, "rows": rows, "slope": slope(rows, a.skip), "end": last["rss_mb"],
               "s_per_step": last["s"] / max(1, last["step"])}
        results.append(res)
        print(f"{name}: RSS {rows[0]['rss_mb']:.0f} -> {last['rss_mb']:.0f} MB at step {last['step']}, "
              f"{res['slope']:.2f} MB/step after step {a.skip}, {res['s_per_step']:.2f} s/step", flush=True)
    stride = a.every * max(1, a.steps // (5 * a.every))        # about six columns, on sampled steps
    marks = sorted({r["step"] for r in results[0]["rows"]} & set(range(0, a.steps + 1, stride)))
    table = markdown_table(
        ["case"] + [f"RSS MB, step {s}" for s in marks] + [f"growth MB/step (steps {a.skip}-{a.steps})", "s/step"],
        [[r["case"]] + [f"{next(x['rss_mb'] for x in r['rows'] if x['step'] == s):.0f}" for s in marks]
         + [f"{r['slope']:.2f}", f"{r['s_per_step']:.2f}"] for r in results])
    text = (f"## Training memory: glibc malloc vs tcmalloc, operator cache bounded or not\n\n"
            f"Machine: {machine_line(machine())} (each row sets its own allocator).\n"
            f"Command: `python bench/bench_train_memory.py {os.path.relpath(a.config, ROOT)} --steps {a.steps} "
            f"--every {a.every} --skip {a.skip} --threads {a.threads} --write` (the config's data, model and "
            f"start; a fresh process per row, the same cells in each).\n\n"
            f"{table}\n")
    print(text)
    with open(os.path.join(HERE, "results", "train_memory.json"), "w") as fh:
        json.dump({"machine": machine(), "args": vars(a), "results": results}, fh, indent=1)
    if a.write:
        update_section(os.path.join(ROOT, "BENCHMARKS.md"), "bench-train-memory", text)


if __name__ == "__main__":
    main()
