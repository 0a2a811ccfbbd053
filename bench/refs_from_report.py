"""Rebuild an hpc.evaluate reference cache from per-cell evaluation reports.

    python bench/refs_from_report.py bench/results/eval_A.json.gz [more reports ...] -o out/references.h5

Each report cell records its id, its cell hash (``key``: the voxels, E, nu, the soft factor
and the reference settings, so a regenerated data set with the same seeds gives the same
keys), the reference C^H (float64, written by json at full precision), the reference
iterations and time. hpc.evaluate --refs then finds these cells in the cache and does not
solve them again; a cell whose data or settings differ has another key and is solved.

Reports do not carry the reference's residuals: they are stored as NaN, and ``converged``
as true (hpc.evaluate logs a warning for a reference that does not converge, and a report
is only written for a finished run); the NaN residuals mark the rebuilt entries. An existing
-o is merged into, not replaced; an entry already there wins.
"""
import argparse
import gzip
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hpc.evaluate import ReferenceCache  # noqa: E402


def load_report(path: str) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        return json.load(fh)


def entries(report: dict):
    """(cell id, key, cache entry) for each cell of a report."""
    for c in report.get("cells", []):
        C = np.asarray(c["C_ref"], np.float64)
        if C.shape != (6, 6) or not np.all(np.isfinite(C)):
            raise ValueError(f"cell {c.get('id')}: C_ref is not a finite 6x6 matrix")
        yield c["id"], c["key"], {"C": C, "iterations": [int(i) for i in c["ref_iterations"]],
                                  "residuals": [float("nan")] * 6, "time": float(c["ref_time"]),
                                  "converged": True}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", help="hpc.evaluate JSON reports (.json or .json.gz)")
    p.add_argument("-o", "--output", required=True, help="reference cache (HDF5) to write or merge into")
    args = p.parse_args(argv)
    try:
        reports = [(path, load_report(path)) for path in args.reports]
        cache = ReferenceCache(args.output)
        before = len(cache.entries)
        added = 0
        for path, rep in reports:
            for cid, key, e in entries(rep):
                if (cid, key) not in cache.entries:
                    cache.entries[(cid, key)] = e
                    added += 1
    except (OSError, ValueError, KeyError) as e:
        print(f"refs_from_report: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    cache.save()
    print(f"{args.output}: {added} references added from {len(reports)} report(s), "
          f"{before} already there, {len(cache.entries)} in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
