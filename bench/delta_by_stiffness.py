"""Where the CGINS error lives: delta of one model against the stiffness of each cell.

Reads a report of `python -m hpc.evaluate -o` (gzipped or not) and groups its cells by
family and kind (named topology / random graph; TPMS sheet / network) and by the
stiffness of the reference, s = ||C^H_ref||_F / E (dimensionless; E the cell's base
Young's modulus). For each group and stiffness bin it prints the number of cells and
their delta_mean at t embedded steps. It answers two questions the family means hide:
is a kind of cell worse only because it is softer (then named and random cells of the
same stiffness are alike), and how much of a family's mean the softest cells carry
(the share of the family's summed delta held by cells with s below ``--soft``).

    python bench/delta_by_stiffness.py REPORT.json.gz LABEL [--t 10] [--bins 0 0.03 0.06 0.1 0.15 0.25]
        [--soft 0.03] [--markdown]

Nothing is left out of any mean: the table splits the cells, it does not filter them.
"""
import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_eval import cell_delta, load_report  # noqa: E402

DEFAULT_BINS = (0.0, 0.03, 0.06, 0.1, 0.15, 0.25)


def frobenius(C):
    return math.sqrt(sum(float(x) ** 2 for row in C for x in row))


def cells_of(report, label, t):
    """[(family, kind, s, delta)] of one model at t steps; s = ||C_ref||_F / E."""
    if not report.get("cells"):
        raise ValueError("the report has no cells (write one with python -m hpc.evaluate -o)")
    out = []
    for c in report["cells"]:
        d = cell_delta(c, label, t)
        if c.get("C_ref") is None:
            raise KeyError(f"cell {c.get('id')!r} has no C_ref (a report of hpc.evaluate -o records it)")
        out.append((c["family"], c.get("kind") or "?", frobenius(c["C_ref"]) / float(c.get("E", 1.0)), d))
    return out


def table(cells, bins=DEFAULT_BINS, soft=0.03):
    """(edges, rows): edges the bin edges (the last bin open above); rows per family/kind
    and per family, each {'group', 'n', 'mean', 'bins': [(n, mean or None)],
    'soft_n', 'soft_share'} where soft_share is the share of the group's summed delta held
    by its cells with s < soft."""
    edges = list(bins)
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"bin edges must increase, got {edges}")

    def row(name, sel):
        per = []
        for k, lo in enumerate(edges):
            hi = edges[k + 1] if k + 1 < len(edges) else math.inf
            d = [x[3] for x in sel if lo <= x[2] < hi]
            per.append((len(d), sum(d) / len(d) if d else None))
        total = sum(x[3] for x in sel)
        soft_d = [x[3] for x in sel if x[2] < soft]
        return {"group": name, "n": len(sel), "mean": total / len(sel), "bins": per,
                "soft_n": len(soft_d), "soft_share": sum(soft_d) / total if total > 0 else 0.0}

    rows = []
    for fam in sorted({x[0] for x in cells}):
        fc = [x for x in cells if x[0] == fam]
        for kind in sorted({x[1] for x in fc}):
            rows.append(row(f"{fam}/{kind}", [x for x in fc if x[1] == kind]))
        rows.append(row(fam, fc))
    return edges, rows


def render(edges, rows, soft, markdown=False):
    heads = [f"s >= {edges[k]:g}" if k + 1 == len(edges) else f"{edges[k]:g}-{edges[k + 1]:g}"
             for k in range(len(edges))]
    cols = ["group", "n", "delta_mean"] + heads + [f"s < {soft:g}: n", "share of summed delta"]
    lines = []
    for r in rows:
        cells = [r["group"], str(r["n"]), f"{r['mean']:.4f}"]
        cells += [f"{m:.4f} ({n})" if n else "-" for n, m in r["bins"]]
        cells += [str(r["soft_n"]), f"{100 * r['soft_share']:.1f}%"]
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        out += ["| " + " | ".join(c) + " |" for c in lines]
    else:
        w = [max(len(c), *(len(l[i]) for l in lines)) for i, c in enumerate(cols)]
        out = ["  ".join(c.ljust(w[i]) for i, c in enumerate(cols))]
        out += ["  ".join(c.ljust(w[i]) for i, c in enumerate(l)) for l in lines]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Bins: s = ||C_ref||_F / E; each cell is 'delta_mean (n)'.")
    p.add_argument("report", help="a report of python -m hpc.evaluate -o (.json or .json.gz)")
    p.add_argument("label", help="the model's label in that report")
    p.add_argument("--t", type=int, default=10, help="embedded PCG steps (default 10)")
    p.add_argument("--bins", type=float, nargs="+", default=list(DEFAULT_BINS),
                   help="increasing lower edges of the stiffness bins (default %(default)s)")
    p.add_argument("--soft", type=float, default=0.03,
                   help="the stiffness below which a cell counts as soft (default %(default)s)")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    a = p.parse_args(argv)
    try:
        cells = cells_of(load_report(a.report), a.label, a.t)
        edges, rows = table(cells, a.bins, a.soft)
    except (OSError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"delta_by_stiffness: error: {msg}", file=sys.stderr)
        return 2
    print(f"{len(cells)} cells, t = {a.t}, model {a.label}; s = ||C_ref||_F / E")
    print(render(edges, rows, a.soft, a.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
