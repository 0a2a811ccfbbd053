"""``python -m hpc.make_dataset configs/data_<name>.yaml [flags]``: generate a CGINS data set.

Writes the shards of model.data (sharded HDF5, one dask task per shard, reproducible
from the seed; see model/data.py for the layout). Flags override the YAML; without a
YAML the flags alone define the set. Shards already present with the same content hash
are kept (a rerun finishes an interrupted generation) unless --overwrite.

    python -m hpc.make_dataset configs/data_train.yaml --workers 2
    python -m hpc.make_dataset --name smoke --n 16 --samples-per-family 8 --shard-size 8 --workers 0

Exit status: 0 written, 2 bad configuration, 1 a generation error.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

log = logging.getLogger("hpc.make_dataset")

EXIT_OK, EXIT_FAIL, EXIT_CONFIG = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hpc.make_dataset",
                                description="Generate a sharded HDF5 training / held-out set of cells.")
    p.add_argument("config", nargs="?", help="YAML with the DataConfig fields (top level or under 'data:')")
    p.add_argument("--name")
    p.add_argument("--split", help="label stored with the shards (train, heldout, ...)")
    p.add_argument("--seed", type=int)
    p.add_argument("--n", type=int, help="voxels per axis")
    p.add_argument("--samples-per-family", type=int)
    p.add_argument("--shard-size", type=int)
    p.add_argument("--families", nargs="+", choices=["tpms", "lattice", "shell"])
    p.add_argument("--out-dir", help="directory of the shards (default data/<name>)")
    p.add_argument("--shards", type=int, nargs="+", help="only these shard numbers")
    p.add_argument("--workers", type=int, default=2, help="dask worker processes; 0: in this process (default 2)")
    p.add_argument("--scheduler", help="address of a running dask scheduler (instead of --workers)")
    p.add_argument("--overwrite", action="store_true", help="regenerate shards that are already there")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    from model.data import DataConfig, generate
    try:
        d = {}
        if args.config:
            from model.data import read_yaml_mapping
            try:
                y = read_yaml_mapping(args.config)
            except ValueError as e:
                raise ValueError(f"{args.config}: {e}") from None
            if not isinstance(y.get("data", y), dict):
                raise ValueError(f"{args.config}: the DataConfig fields must be a mapping (top level or "
                                 f"under 'data:')")
            d = dict(y.get("data", y))
        for key in ("name", "split", "seed", "n", "samples_per_family", "shard_size", "families", "out_dir"):
            v = getattr(args, key)
            if v is not None:
                d[key] = v
        cfg = DataConfig.from_dict(d)
        if args.workers < 0:
            raise ValueError(f"--workers must be >= 0 (0: in this process), got {args.workers}")
    except (OSError, ValueError, TypeError) as e:
        log.error("error: %s", e)
        return EXIT_CONFIG
    bad = [s for s in (args.shards or []) if not 0 <= s < cfg.n_shards]
    if bad:
        log.error("error: shards %s out of range 0..%d", bad, cfg.n_shards - 1)
        return EXIT_CONFIG
    log.info("%s (%s): %d samples (%d per family: %s), n = %d, %d shards of %d, seed %d -> %s",
             cfg.name, cfg.split, cfg.total, cfg.samples_per_family, " ".join(cfg.families), cfg.n,
             cfg.n_shards, cfg.shard_size, cfg.seed, cfg.out_dir)
    t0 = time.perf_counter()
    client = None
    try:
        if args.scheduler or args.workers > 0:   # --workers 0 generates in this process and needs no dask
            import dask
            dask.config.set({"logging": {"distributed": "warning"}})
        if args.scheduler:
            from distributed import Client
            client = Client(args.scheduler)
        res = generate(cfg, client=client, workers=args.workers, shards=args.shards, overwrite=args.overwrite,
                       progress=not args.quiet)
    except Exception as e:  # a generator error that no redraw fixed
        log.error("error: %s", " ".join(str(e).split()))
        return EXIT_FAIL
    finally:
        if client is not None:
            client.close()
    wall = time.perf_counter() - t0
    made = [r for r in res if not r["skipped"]]
    log.info("%d shards written, %d kept (already current), %d samples, %d redraws, %.1f s wall "
             "(%.1f ms per sample)", len(made), len(res) - len(made), sum(r["samples"] for r in made),
             sum(r.get("redraws", 0) for r in made), wall,
             1e3 * wall / max(1, sum(r["samples"] for r in made)))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
