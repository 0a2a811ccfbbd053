"""Paired, per-cell comparison of CGINS models across `hpc.evaluate` reports.

The evaluation is deterministic (the same cells, the same cached references), so two
models evaluated in different runs can be compared cell by cell: the mean of delta per
family says how far each is from the targets, the per-cell ratio says whether one model
is better than the other in general or only on a few outliers.

    python bench/compare_eval.py A.json.gz:wide32 B.json:wide64 [--t 10] [--by-kind] [--markdown]

Each argument is REPORT:LABEL (a report of `python -m hpc.evaluate -o`, gzipped or not,
and one of its model labels); the first is the baseline. Cells are matched by `id`;
only cells present in every report are compared (the count is printed). Columns per
family and model: delta_mean, median, max, the share of cells at or below 1%, and,
against the baseline, the share of cells where the model's delta is lower and the
median of the per-cell ratio model / baseline. ``--by-kind`` adds rows per family and
kind (TPMS sheet / network; lattice and shell on a named topology / on a random graph),
the kind of a cell taken from any report that records it (reports of hpc.evaluate
before session 14 do not; cells no report gives a kind to count as '?').
"""
import argparse
import gzip
import json
import statistics
import sys


def load_report(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as fh:
        return json.load(fh)


def cell_delta(cell, label, t):
    """delta of model ``label`` at t embedded steps in one cell of a report."""
    m = cell.get("models", {}).get(label)
    if m is None:
        raise KeyError(f"model {label!r} is not in the report (it has {sorted(cell.get('models', {}))})")
    if str(t) not in m:
        raise KeyError(f"model {label!r} was not evaluated at t = {t} (it has t = {sorted(m)})")
    return float(m[str(t)]["delta"])


def deltas(report, label, t):
    """{cell id: (family, delta, kind or None)} of one model at t embedded steps."""
    return {c["id"]: (c["family"], cell_delta(c, label, t), c.get("kind")) for c in report["cells"]}


def compare(series, t=10, by_kind=False):
    """series: [(name, {id: (family, delta, kind)})], the first the baseline. Returns
    (rows, n): rows of dicts per family (and 'all') and model, over the common cells;
    with ``by_kind``, rows per family and kind ('family/kind') before each family's."""
    common = set(series[0][1])
    for _, d in series[1:]:
        common &= set(d)
    if not common:
        raise ValueError("the reports have no cell in common")
    base = series[0][1]
    kind = {i: next((d[i][2] for _, d in series if d[i][2]), "?") for i in common}
    groups = []
    for fam in sorted({base[i][0] for i in common}):
        ids = {i for i in common if base[i][0] == fam}
        if by_kind:
            groups += [(f"{fam}/{k}", {i for i in ids if kind[i] == k}) for k in sorted({kind[i] for i in ids})]
        groups.append((fam, ids))
    groups.append(("all", common))
    rows = []
    for fam, members in groups:
        ids = sorted(members)
        b = [base[i][1] for i in ids]
        for name, d in series:
            v = [d[i][1] for i in ids]
            ratio = [x / y for x, y in zip(v, b) if y > 0]
            rows.append({"family": fam, "model": name, "n": len(ids),
                         "mean": statistics.fmean(v), "median": statistics.median(v), "max": max(v),
                         "le_1pct": sum(x <= 0.01 for x in v) / len(v),
                         "lower": sum(x < y for x, y in zip(v, b)) / len(v),
                         "ratio_median": statistics.median(ratio) if ratio else float("nan")})
    return rows, len(common)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("series", nargs="+", metavar="REPORT:LABEL")
    p.add_argument("--t", type=int, default=10, help="embedded PCG steps to compare at (default 10)")
    p.add_argument("--by-kind", action="store_true",
                   help="also rows per family and kind (named topology / random graph; TPMS form)")
    p.add_argument("--markdown", action="store_true", help="a markdown table instead of plain text")
    a = p.parse_args(argv)
    series = []
    try:
        for s in a.series:
            path, sep, label = s.rpartition(":")
            if not sep or not path or not label:
                raise ValueError(f"{s!r}: expected REPORT:LABEL")
            series.append((label, deltas(load_report(path), label, a.t)))
        rows, n = compare(series, a.t, a.by_kind)
    except (OSError, KeyError, ValueError) as exc:
        print(f"compare_eval: error: {exc}", file=sys.stderr)
        return 2
    base = series[0][0]
    head = ["family", "model", "n", "delta_mean", "median", "max", "<= 1%", f"lower than {base}",
            f"median ratio to {base}"]
    fmt = [lambda r: r["family"], lambda r: r["model"], lambda r: str(r["n"]),
           lambda r: f"{r['mean']:.4f}", lambda r: f"{r['median']:.4f}", lambda r: f"{r['max']:.3f}",
           lambda r: f"{100 * r['le_1pct']:.1f}%", lambda r: f"{100 * r['lower']:.1f}%",
           lambda r: f"{r['ratio_median']:.3f}"]
    print(f"{n} cells in common, t = {a.t}")
    if a.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(f(r) for f in fmt) + " |")
    else:
        w = [max(len(h), *(len(f(r)) for r in rows)) for h, f in zip(head, fmt)]
        print("  ".join(h.ljust(x) for h, x in zip(head, w)))
        for r in rows:
            print("  ".join(f(r).ljust(x) for f, x in zip(fmt, w)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
