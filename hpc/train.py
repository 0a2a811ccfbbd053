"""``python -m hpc.train configs/<name>.yaml``: train a CGINS model, one process or DDP.

    python -m hpc.train configs/cgins_tiny.yaml --out runs/tiny
    torchrun --nproc_per_node 2 -m hpc.train configs/cgins_default.yaml --out runs/r1
    mpirun -n 4 python -m hpc.train configs/cgins_default.yaml --out runs/r1
    srun python -m hpc.train configs/cgins_default.yaml --out runs/r1   (slurm/train.sbatch)

Ranks, world size and rank 0's address come from the launcher's environment
(hpc/distributed.py). With P ranks the model is wrapped in DistributedDataParallel and
rank r trains on cells r, r + P, ... of each global batch (``train.batch_size`` cells,
the same as in one process, divisible by P); every rank's loss is the mean over its
own cells and DDP averages the gradients, so P ranks compute the gradient of the same
global-batch mean as one process (model/train.py). Only rank 0 writes.

Data (YAML ``data`` section, or flags):

    data.train: DIR        sharded HDF5 made by ``python -m hpc.make_dataset`` (model/data.py);
                           data.split / data.families filter the shards;
                           data.family_weights {family: w} (whole numbers >= 0, default 1)
                           repeats each cell of that family w times in every epoch
    data.generate: {...}   no files: generate the cells in memory with model.data's
                           sampler (DataConfig fields: n, samples_per_family, seed, ...)
    neither                generate in memory with DataConfig defaults, 4 cells per
                           family and n = data.resolution (default 16)

``--data DIR`` overrides data.train; ``--generate K`` (K cells per family) and
``--resolution n`` force in-memory generation.

Output directory (``--out``, default: the directory of train.checkpoint):

    <out>/<checkpoint name>.pt      atomic, resumable (model, optimizer, step, log, configs)
    <out>/<checkpoint name>.csv     loss log, one row per step (rewritten at each checkpoint)
    <out>/config.yaml               the effective configuration (after the flags), and how it
                                    was launched (ranks, device, cells, allocator)

The command line runs on tcmalloc where it is installed, like hpc.homogenize
(hpc.allocator; ``HPC_ALLOCATOR=system`` keeps glibc, whose heap fragments under
training's per-step tensors: the resident set then grows with every step).

A run resumes from <out>'s checkpoint unless ``--no-resume``. ``--init-from CK`` (or
train.init_from) starts a fresh run (step 0, a new optimizer and schedule) from the
weights of checkpoint CK, to fine-tune a trained model (on your own family of cells,
or with more embedded PCG steps: the model configs may differ only in t and use_pcg,
channels may widen and res_blocks may grow, below);
the new checkpoint records CK's path, sha256 and step. CK may also be narrower
(the same depth, each level at most as wide): the run then starts from the
function-preserving widening of its network (model.network.widen_state_dict). Or CK
may have fewer residual blocks per U-Net level (model.res_blocks, the same channels):
the run starts from its function-preserving deepening, every added block the identity
(model.network.deepen_state_dict). A trained
checkpoint ships as ``python -m hpc.export_model RUN.pt OUT.pt`` (weights only); an
exported file starts runs (--init-from) but cannot be resumed. CPU runs are
reproducible from ``train.seed`` (same thread count); CUDA runs are not bitwise
(index_add_ in the sparse convolution's scatter uses atomics on CUDA). With in-memory
generation every rank draws the same cells from the seed (cheap at small n; use
shards for large sets: each rank then reads only its own cells). Each rank keeps the
assembled operators of its ``train.operator_cache`` most recently drawn cells (default 256,
about 0.8 MB each at 32^3 in float32, 8 times that at 64^3; 0 keeps none): a cell drawn
again is not assembled again, and memory does not grow with the number of cells seen.

Exit status: 0 done, 2 bad configuration or data.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import sys
from typing import Optional, Sequence

import numpy as np
import torch

from hpc import distributed
from hpc.allocator import active_allocator
from model.train import build_model, load_config, train

log = logging.getLogger("hpc.train")

EXIT_OK, EXIT_CONFIG = 0, 2


class ConfigError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpc.train",
                                description="Train a CGINS model (label-free, minimum potential energy); "
                                            "one process or DDP under torchrun / mpirun / srun.")
    p.add_argument("config", help="YAML with model / loss / train / data sections (configs/cgins_*.yaml)")
    p.add_argument("--out", help="output directory (checkpoint, loss log, config); "
                                 "default: the directory of train.checkpoint")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from the checkpoint in the output directory if there is one (default)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: train.device of the config")
    p.add_argument("--steps", type=int, help="total optimizer steps (overrides train.steps)")
    p.add_argument("--seed", type=int, help="overrides train.seed (an integer >= 0)")
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="start a fresh run from this checkpoint's weights (fine-tuning; overrides "
                        "train.init_from); its model config must match up to t and use_pcg; channels may widen, "
                        "res_blocks may grow")
    p.add_argument("--batch-size", type=int, help="global batch (overrides train.batch_size)")
    p.add_argument("--checkpoint-every", type=int, help="overrides train.checkpoint_every")
    p.add_argument("--data", help="directory or glob of data-set shards (overrides data.train)")
    p.add_argument("--generate", type=int, metavar="K",
                   help="generate K cells per family in memory instead of reading shards")
    p.add_argument("--resolution", type=int, help="voxels per axis of generated cells")
    p.add_argument("--threads", type=int, help="torch CPU threads per rank (default: OMP_NUM_THREADS or torch's)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on rank 0 (default: when stderr is a terminal)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


# -- data -------------------------------------------------------------------------------
class DatasetCells:
    """A model.data.ShardedDataset seen as a sequence of Cells (what train() indexes).

    ``family_weights`` {family: w}: every sample of that family appears w times (a whole
    number >= 0; families not named keep 1), so an epoch draws the families in those
    proportions; ``source_index(k)`` is the data-set sample behind item k (train() keys
    its operator cache by it, so a repeated cell is assembled once)."""

    def __init__(self, ds, family_weights: Optional[dict] = None):
        self.ds = ds
        if not isinstance(family_weights or {}, dict):
            raise ConfigError(f"data.family_weights must map families to weights, got {family_weights!r}")
        w = {str(f): _whole_weight(f, v) for f, v in (family_weights or {}).items()}
        present = set(str(f) for f in ds.families)
        unknown = sorted(set(w) - present)
        if unknown:
            raise ConfigError(f"data.family_weights names {unknown}, not in the data "
                              f"(families present: {sorted(present)})")
        self.rows = np.array([k for k in range(len(ds)) for _ in range(w.get(str(ds.families[k]), 1))],
                             dtype=np.int64)
        if self.rows.size == 0:
            raise ConfigError("data.family_weights leaves no cells to train on")

    def __len__(self):
        return int(self.rows.size)

    def source_index(self, k):
        return int(self.rows[k])

    def __getitem__(self, k):
        return self.ds.cell(self.source_index(k))


def _whole_weight(family, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or v != int(v):
        raise ConfigError(f"data.family_weights[{family!r}] must be a whole number >= 0, got {v!r}")
    return int(v)


def generated_cells(spec: dict):
    """Cells drawn in memory with model.data's sampler (same draws, from the same seed,
    as ``python -m hpc.make_dataset`` with these DataConfig fields)."""
    from microstructures.cell import Cell
    from model.data import DataConfig, make_sample

    cfg = DataConfig.from_dict(spec)
    cells = []
    for i in range(cfg.total):
        phases, p = make_sample(cfg, i)
        cells.append(Cell(phases, E=[0.0, p["E"]], nu=[p["nu"], p["nu"]], name=f"{p['family']}-{i}",
                          generator="model.data"))
    return cells


SECTIONS = ("model", "loss", "train", "data", "distributed", "launch")   # launch: written by a run
DATA_KEYS = ("train", "split", "families", "family_weights", "generate", "resolution")
DISTRIBUTED_KEYS = ("backend", "master_port")


def check_sections(rest: dict, path: str):
    """ConfigError for a misspelt section or data / distributed key (they used to be
    ignored: a typo in data.train silently trained on generated cells)."""
    unknown = sorted(set(rest) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown sections {unknown}; known: {list(SECTIONS)}")
    for section, keys in (("data", DATA_KEYS), ("distributed", DISTRIBUTED_KEYS)):
        value = rest.get(section)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: the {section} section must be a mapping, got {value!r}")
        bad = sorted(set(value) - set(keys))
        if bad:
            raise ConfigError(f"{path}: unknown {section} keys {bad}; known: {list(keys)}")


def training_cells(data: dict, args):
    """The training cells after the rules of the module docstring, and a description."""
    try:
        return _training_cells(data, args)
    except ValueError as e:          # a bad data.generate spec, a file that is not a shard, mixed shards
        raise ConfigError(" ".join(str(e).split())) from None


def _training_cells(data: dict, args):
    data = dict(data or {})
    generate = args.generate is not None or args.resolution is not None
    root = args.data or (None if generate else data.get("train"))
    if root:
        from model.data import ShardedDataset, shard_files
        if not shard_files(root):
            raise ConfigError(f"no data-set shards at {root!r}: generate them with "
                              "`python -m hpc.make_dataset configs/data_<name>.yaml`, or train on "
                              "cells generated in memory with --generate K --resolution n")
        ds = ShardedDataset(root, split=data.get("split"), families=data.get("families"))
        if len(ds) == 0:
            raise ConfigError(f"the shards at {root!r} hold no samples (split={data.get('split')!r}, "
                              f"families={data.get('families')!r})")
        cells = DatasetCells(ds, data.get("family_weights"))
        weights = f", family weights {data['family_weights']} ({len(cells)} per epoch)" \
            if data.get("family_weights") else ""
        return cells, f"{len(ds)} cells from {root}{weights}"
    if data.get("family_weights"):
        raise ConfigError("data.family_weights applies to data.train shards only, not to cells "
                          "generated in memory")
    spec = dict(data.get("generate") or {})
    spec.setdefault("n", int(data.get("resolution", 16)))
    if args.resolution is not None:
        spec["n"] = args.resolution
    if args.generate is not None:
        spec["samples_per_family"] = args.generate
    spec.setdefault("samples_per_family", 4)
    cells = generated_cells(spec)
    return cells, f"{len(cells)} cells generated in memory ({spec})"


def cell_grids(cells) -> list:
    """The distinct grids of the training cells (read from shard headers, not decompressed)."""
    ds = getattr(cells, "ds", None)
    if ds is not None:
        return sorted({ds.grid(k) for k in range(len(ds))})
    return sorted({tuple(c.shape) for c in cells})


def data_fingerprint(cells, data: Optional[dict], args) -> str:
    """sha256 (16 hex) of what the run trains on: every shard sample's (config hash,
    index) and the family weights, or the in-memory generation spec. A resume must see
    the same (a changed data set would silently change the run)."""
    import hashlib
    import json
    ds = getattr(cells, "ds", None)
    if ds is not None:
        what = {"samples": ds.identity(), "family_weights": (data or {}).get("family_weights")}
    else:
        what = {"generated": [c.name for c in cells],
                "digest": hashlib.sha256(b"".join(np.ascontiguousarray(c.phases).tobytes() for c in cells)).hexdigest()}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- the run ----------------------------------------------------------------------------
class Progress:
    """tqdm bar on rank 0 when enabled; otherwise a log line every ``every`` steps."""

    def __init__(self, total: int, enabled: bool, every: int):
        self.total, self.enabled, self.every = total, enabled, max(1, every)
        self.bar = None

    def __call__(self, step: int, row: dict):
        if self.enabled:
            if self.bar is None:
                from tqdm import tqdm
                self.bar = tqdm(total=self.total, initial=step - 1, unit="step", dynamic_ncols=True)
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{row['loss']:.4e}", refresh=False)
        elif step % self.every == 0 or step == self.total:
            log.info("step %d/%d  loss %.6e  energy_0 %.6e  grad_norm %.3e  lr %.3e", step, self.total,
                     row["loss"], row.get("energy_0", float("nan")), row["grad_norm"], row["lr"])

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _write_yaml_atomic(path: str, d: dict):
    import yaml
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        yaml.safe_dump(d, fh, sort_keys=False)
    os.replace(tmp, path)


# the settings that fix a run's trajectory: a resume must keep them (steps may grow)
RESUME_FIXED = ("seed", "batch_size", "lr", "weight_decay", "grad_clip", "lr_min_factor", "model_dtype",
                "solver_dtype", "soft")


def configure(args):
    """(model_cfg, loss_cfg, train_cfg, rest) from the YAML and the flags."""
    try:
        mc, lc, tc, rest = load_config(args.config)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"{args.config}: {e}") from None
    for flag, field in (("steps", "steps"), ("seed", "seed"), ("batch_size", "batch_size"),
                        ("checkpoint_every", "checkpoint_every"), ("device", "device"),
                        ("init_from", "init_from")):
        v = getattr(args, flag)
        if v is not None:
            setattr(tc, field, v)
    for name, v in (("train.steps (--steps)", tc.steps), ("train.batch_size (--batch-size)", tc.batch_size),
                    ("train.checkpoint_every (--checkpoint-every)", tc.checkpoint_every),
                    ("--threads", args.threads), ("--generate", args.generate), ("--resolution", args.resolution)):
        if v is not None and (not isinstance(v, int) or v < 1):
            raise ConfigError(f"{name} must be a whole number >= 1, got {v!r}")
    if isinstance(tc.seed, bool) or not isinstance(tc.seed, int) or not 0 <= tc.seed < 2 ** 32:
        raise ConfigError(f"train.seed (--seed) must be a whole number in [0, 2^32), got {tc.seed!r}")
    check_sections(rest, args.config)
    if args.resolution is not None and args.resolution % (1 << mc.depth):
        raise ConfigError(f"--resolution {args.resolution}: the model needs a multiple of "
                          f"2^depth = {1 << mc.depth}")
    if str(tc.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {tc.device}: CUDA is not available on this machine (--device cpu)")
    out = args.out or os.path.dirname(tc.checkpoint) or "."
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out}: exists and is not a directory")
    up = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(up):
        up = os.path.dirname(up)
    if not os.path.isdir(up):
        raise ConfigError(f"--out {out}: {up} is a file, not a directory")
    stem = os.path.splitext(os.path.basename(tc.checkpoint))[0] or "cgins"
    tc.checkpoint = os.path.join(out, stem + ".pt")
    tc.log_file = os.path.join(out, stem + ".csv")
    resuming = getattr(args, "resume", True) and os.path.exists(tc.checkpoint)
    if resuming:                     # the run continues: train.init_from was used at its start, not now
        from model.train import check_resumable, read_cgins_checkpoint
        try:
            ck = read_cgins_checkpoint(tc.checkpoint, f"checkpoint {tc.checkpoint} (to resume)")
            check_resumable(ck, tc.checkpoint, mc)
        except ValueError as e:
            raise ConfigError(f"{e}; start elsewhere (--out) or afresh (--no-resume)"
                              if "not a CGINS checkpoint" in str(e) else str(e)) from None
        theirs = ck.get("train_config") or {}
        changed = [f"{k} {theirs[k]!r} -> {getattr(tc, k)!r}" for k in RESUME_FIXED
                   if k in theirs and theirs[k] != getattr(tc, k)]
        if changed:
            raise ConfigError(f"checkpoint {tc.checkpoint} was trained with other settings ({'; '.join(changed)}): "
                              "resume it with its own, or start elsewhere (--out) or afresh (--no-resume)")
    elif tc.init_from:
        from model.train import init_checkpoint
        try:
            init_checkpoint(tc.init_from, mc)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if len(lc.level_weights) < mc.levels:
        raise ConfigError(f"loss.level_weights needs {mc.levels} entries, has {list(lc.level_weights)}")
    return mc, lc, tc, rest


def run(args) -> tuple:
    """Train after ``args`` (build_parser()); returns (the bare CGINS model, last log row,
    rank, world). Joins and leaves the process group."""
    mc, lc, tc, rest = configure(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    dist_cfg = rest.get("distributed") or {}
    launch = distributed.launch_info()
    if tc.batch_size % launch.world:
        # every rank reaches this before any collective: all exit with the same message
        raise ConfigError(f"the global batch ({tc.batch_size}) must split evenly over {launch.world} ranks "
                          f"(launcher {launch.launcher}); choose --batch-size as a multiple of {launch.world}")
    rank, world, local_rank, device = distributed.init_distributed(
        backend=dist_cfg.get("backend"), device=tc.device, master_port=dist_cfg.get("master_port"))
    try:
        requested_device = tc.device          # "cuda" spreads ranks over GPUs; "cuda:0" would not
        tc.device = str(device)
        cells, what = training_cells(rest.get("data"), args)
        div = 1 << mc.depth
        bad = [g for g in cell_grids(cells) if any(n % div for n in g)]
        if bad:
            raise ConfigError(f"the training cells of grid {bad[0]} do not fit the model: it needs multiples of "
                              f"2^depth = {div} voxels per axis")
        data_id = data_fingerprint(cells, rest.get("data"), args)
        if args.resume and os.path.exists(tc.checkpoint):
            from model.train import load_checkpoint
            theirs = load_checkpoint(tc.checkpoint).get("data_id")
            if theirs is not None and theirs != data_id:
                raise ConfigError(f"checkpoint {tc.checkpoint} was trained on other cells ({what} now): resume it "
                                  "on its own data, or start elsewhere (--out) or afresh (--no-resume)")
        if rank == 0:
            log.info("%s; %d rank(s) on %s; global batch %d (%d per rank); %d steps; out %s", what, world,
                     device.type, tc.batch_size, tc.batch_size // world, tc.steps, os.path.dirname(tc.checkpoint))
            os.makedirs(os.path.dirname(tc.checkpoint) or ".", exist_ok=True)
            _write_yaml_atomic(os.path.join(os.path.dirname(tc.checkpoint) or ".", "config.yaml"), {
                "model": mc.to_dict(), "loss": lc.to_dict(),
                "train": {**dataclasses.asdict(tc), "device": requested_device}, **rest,
                "launch": {"world": world, "device": device.type, "cells": what,
                           "allocator": active_allocator()}})
        np.random.seed(tc.seed)
        model = build_model(mc, tc)                    # seeded from train.seed: the same on every rank
        net = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel
            net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        show = args.progress if args.progress is not None else sys.stderr.isatty()
        prog = Progress(tc.steps, enabled=bool(show), every=max(1, tc.steps // 20)) if rank == 0 else None
        try:
            row = train(net, cells, mc, tc, lc, rank=rank, world=world, resume=args.resume, progress=prog,
                        data_id=data_id)
        finally:
            if prog is not None:
                prog.close()
        if rank == 0 and row:
            log.info("done: step %d, loss %.6e; checkpoint %s, log %s", row["step"], row["loss"],
                     tc.checkpoint, tc.log_file)
        distributed.barrier()
        return model, row, rank, world
    finally:
        if world > 1:
            # the DDP wrapper's reducer holds the process group: free it (and its gloo
            # threads) here, not at interpreter exit, where it could abort the process
            # after a finished run (seen once in CI: "terminate called without an active
            # exception" on one rank after the last step)
            net = None
            gc.collect()
        distributed.shutdown()


def setup_logging(verbose: bool = False):
    """Console logging: INFO on rank 0, WARNING on the others (DEBUG everywhere with -v)."""
    rank = distributed.launch_info().rank
    logging.basicConfig(level=logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING),
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        run(args)
    except ConfigError as e:
        log.error("%s", e)
        return EXIT_CONFIG
    return EXIT_OK


if __name__ == "__main__":
    # On tcmalloc where installed (hpc.allocator; before any launcher's collective): glibc's
    # heap fragments under the per-step tensors of varying size (active voxels differ from
    # cell to cell) and the resident set grows with every step (BENCHMARKS.md, "Training memory").
    from hpc.allocator import reexec_with_tcmalloc
    reexec_with_tcmalloc(["-m", "hpc.train", *sys.argv[1:]])
    sys.exit(main())
