"""bench/compare_eval.py: the paired per-cell comparison of evaluation reports."""
import gzip
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "compare_eval.py")


def _report(path, label, deltas, gz=False, kinds=None):
    cells = [{"id": f"set:{fam}-{i}", "family": fam, "models": {label: {"10": {"delta": d}, "0": {"delta": 9.0}}}}
             for i, (fam, d) in enumerate(deltas)]
    for c, k in zip(cells, kinds or []):
        c["kind"] = k
    opener = gzip.open if gz else open
    with opener(path, "wt") as fh:
        json.dump({"cells": cells}, fh)
    return path


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT)


def test_paired_numbers_by_hand(tmp_path):
    a = _report(str(tmp_path / "a.json.gz"), "base",
                [("tpms", 0.02), ("tpms", 0.04), ("shell", 0.10), ("shell", 0.005)], gz=True)
    # the second report has one cell more (not in the baseline: left out) and another order
    b_cells = [("tpms", 0.01), ("tpms", 0.05), ("shell", 0.05), ("shell", 0.0025), ("shell", 7.0)]
    b = _report(str(tmp_path / "b.json"), "new", b_cells)
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        import compare_eval as ce
    finally:
        sys.path.pop(0)
    series = [("base", ce.deltas(ce.load_report(a), "base", 10)), ("new", ce.deltas(ce.load_report(b), "new", 10))]
    rows, n = ce.compare(series)
    assert n == 4
    got = {(r["family"], r["model"]): r for r in rows}
    t = got[("tpms", "new")]
    assert t["mean"] == pytest.approx(0.03) and t["max"] == pytest.approx(0.05)
    assert t["lower"] == pytest.approx(0.5)                   # 0.01 < 0.02, 0.05 > 0.04
    assert t["ratio_median"] == pytest.approx((0.5 + 1.25) / 2)
    s = got[("shell", "new")]
    assert s["lower"] == 1.0 and s["ratio_median"] == pytest.approx(0.5) and s["le_1pct"] == 0.5
    al = got[("all", "new")]
    assert al["n"] == 4 and al["mean"] == pytest.approx((0.01 + 0.05 + 0.05 + 0.0025) / 4)
    assert got[("all", "base")]["lower"] == 0.0 and got[("all", "base")]["ratio_median"] == 1.0

    r = _run(f"{a}:base", f"{b}:new", "--markdown")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("4 cells in common, t = 10")
    assert "| shell | new | 2 | 0.026" in r.stdout and "| tpms | new | 2 | 0.0300 |" in r.stdout


def test_by_kind_takes_the_kind_from_any_report(tmp_path):
    a = _report(str(tmp_path / "a.json"), "base", [("shell", 0.2), ("shell", 0.01), ("shell", 0.4)])
    b = _report(str(tmp_path / "b.json"), "new", [("shell", 0.1), ("shell", 0.02), ("shell", 0.1)],
                kinds=["random", "named", "random"])
    r = _run(f"{a}:base", f"{b}:new", "--by-kind", "--markdown")
    assert r.returncode == 0, r.stderr
    got = {tuple(x.strip() for x in line.strip("|").split("|")[:3]): line for line in r.stdout.splitlines()
           if line.startswith("| shell")}
    assert ("shell/random", "base", "2") in got and ("shell/named", "new", "1") in got and ("shell", "new", "3") in got
    assert "| shell/random | new | 2 | 0.1000 |" in r.stdout and "| shell/random | base | 2 | 0.3000 |" in r.stdout
    assert "| 100.0% | 0.375 |" in got[("shell/random", "new", "2")]       # lower in both; ratios 0.5, 0.25
    plain = _run(f"{a}:base", f"{b}:new", "--markdown")
    assert "shell/" not in plain.stdout


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    a = _report(str(tmp_path / "a.json"), "base", [("tpms", 0.02)])
    for args, needle in [((f"{a}:nope",), "model 'nope' is not in the report"),
                         ((f"{a}:base", "--t", "4"), "not evaluated at t = 4"),
                         ((str(tmp_path / "missing.json") + ":x",), "No such file"),
                         ((str(a),), "expected REPORT:LABEL")]:
        r = _run(*args)
        assert r.returncode == 2 and r.stdout == ""
        assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
