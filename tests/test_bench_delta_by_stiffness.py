"""bench/delta_by_stiffness.py: delta of a model per family, kind and stiffness bin."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "delta_by_stiffness.py")
SHIPPED = os.path.join(ROOT, "bench", "results", "eval_wide32more3_heldout32_s16.json.gz")


def _module(name):
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def _cell(i, fam, kind, s, delta, E=1.0):
    # ||C_ref||_F = s * E for C = diag(a, ..., a) with 6 a^2 = (s E)^2
    a = s * E / 6 ** 0.5
    C = [[a if r == c else 0.0 for c in range(6)] for r in range(6)]
    return {"id": f"set:{fam}-{i}", "family": fam, "kind": kind, "E": E, "C_ref": C,
            "models": {"m": {"10": {"delta": delta}, "0": {"delta": 9.0}}}}


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT)


def test_bins_means_and_soft_share_by_hand(tmp_path):
    cells = [_cell(0, "lattice", "random", 0.01, 0.8), _cell(1, "lattice", "random", 0.2, 0.1),
             _cell(2, "lattice", "named", 0.02, 0.05, E=2.0),   # s = 0.02 whatever E is
             _cell(3, "lattice", "named", 0.5, 0.05), _cell(4, "tpms", "sheet", 0.3, 0.01)]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"cells": cells}))
    dbs = _module("delta_by_stiffness")
    got = dbs.cells_of(dbs.load_report(str(path)), "m", 10)
    assert [round(x[2], 12) for x in got] == [0.01, 0.2, 0.02, 0.5, 0.3]
    edges, rows = dbs.table(got, bins=(0.0, 0.1), soft=0.03)
    by = {r["group"]: r for r in rows}
    assert [r["group"] for r in rows] == ["lattice/named", "lattice/random", "lattice", "tpms/sheet", "tpms"]
    lat = by["lattice"]
    assert lat["n"] == 4 and lat["mean"] == pytest.approx(1.0 / 4)
    assert lat["bins"][0] == (2, pytest.approx(0.425)) and lat["bins"][1] == (2, pytest.approx(0.075))
    assert lat["soft_n"] == 2 and lat["soft_share"] == pytest.approx(0.85)
    assert by["lattice/random"]["soft_share"] == pytest.approx(0.8 / 0.9)
    assert by["tpms"]["bins"] == [(0, None), (1, pytest.approx(0.01))] and by["tpms"]["soft_n"] == 0
    out = _run(str(path), "m", "--bins", "0", "0.1", "--markdown")
    assert out.returncode == 0, out.stderr
    assert "| lattice | 4 | 0.2500 | 0.4250 (2) | 0.0750 (2) | 2 | 85.0% |" in out.stdout


def test_family_means_agree_with_compare_eval_on_a_shipped_report():
    """The split changes no mean: per family it gives compare_eval's delta_mean."""
    dbs, ce = _module("delta_by_stiffness"), _module("compare_eval")
    rep = dbs.load_report(SHIPPED)
    _, rows = dbs.table(dbs.cells_of(rep, "more3", 10))
    ref, _ = ce.compare([("more3", ce.deltas(rep, "more3", 10))], t=10, by_kind=True)
    want = {r["family"]: r["mean"] for r in ref if r["family"] != "all"}
    got = {r["group"]: r["mean"] for r in rows}
    assert set(want) == set(got) and len(got) == 9
    for g in want:
        assert got[g] == pytest.approx(want[g], rel=1e-12)
    assert sum(n for r in rows if "/" not in r["group"] for n, _ in r["bins"]) == 600


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"cells": [_cell(0, "tpms", "sheet", 0.3, 0.01)]}))
    no_ref = _cell(1, "tpms", "sheet", 0.3, 0.01)
    del no_ref["C_ref"]
    (tmp_path / "noref.json").write_text(json.dumps({"cells": [no_ref]}))
    (tmp_path / "empty.json").write_text(json.dumps({"cells": []}))
    for args, word in [((str(tmp_path / "noref.json"), "m"), "'set:tpms-1' has no C_ref"),
                       ((str(tmp_path / "empty.json"), "m"), "the report has no cells"),
                       ((str(path), "nope"), "'nope' is not in the report"),
                       ((str(path), "m", "--t", "4"), "not evaluated at t = 4"),
                       ((str(path), "m", "--bins", "0.1", "0.05"), "must increase"),
                       ((str(tmp_path / "missing.json"), "m"), "missing.json")]:
        out = _run(*args)
        assert out.returncode == 2 and out.stdout == "" and word in out.stderr
        assert out.stderr.count("\n") == 1 and out.stderr.startswith("delta_by_stiffness: error:")
