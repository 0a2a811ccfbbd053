"""`python -m hpc.evaluate` (issue 5 item 7) on a tiny 16^3 data set (configs/data_tiny.yaml
into tmp_path) and a tiny 2-step-trained CGINS; and the configs/ablation_*.yaml.

Oracles: an independent delta (solver.homogenize float64 rtol 1e-9 reference, the
network's own forward at t = 4, ElasticityOperator.chom); the solver's residual; the
references cache (a patched solver that must not be called on the rerun); count
arithmetic of the aggregation; the file's sha256.
"""
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

import solver
from hpc import evaluate as ev
from model.data import DataConfig, ShardedDataset, generate, shard_files
from model.train import (TrainConfig, build_model, cell_operator, load_config, load_model, save_checkpoint,
                         train)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = os.path.join(ROOT, "configs", "cgins_tiny.yaml")
ABLATIONS = {"full": {}, "wo_cs": {"use_pcg": False}, "wo_gd": {"mean_constraint": False},
             "wo_sv": {"soft_voxels": False}, "wo_pm": {"periodic": False}, "levels1": {"levels": 1},
             "levels3": {"levels": 3}}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "tiny16"
    cfg = DataConfig.from_yaml(os.path.join(ROOT, "configs", "data_tiny.yaml"))
    cfg = dataclasses.replace(cfg, out_dir=str(out))
    generate(cfg, workers=0)
    return str(out)


@pytest.fixture(scope="module")
def models(tmp_path_factory, data_dir):
    """{'full': 2-step-trained tiny CGINS (t = 2), 'nocs': the same untrained, use_pcg off}."""
    d = tmp_path_factory.mktemp("models")
    mc, lc, _, _ = load_config(TINY_MODEL)
    ds = ShardedDataset(data_dir)
    cells = [ds.cell(k) for k in range(3)]
    tc = TrainConfig(steps=2, batch_size=2, checkpoint=str(d / "full.pt"), checkpoint_every=2)
    train(build_model(mc, tc), cells, mc, tc, lc)
    mc2 = dataclasses.replace(mc, use_pcg=False)
    tc2 = TrainConfig(checkpoint=str(d / "nocs.pt"))
    save_checkpoint(tc2.checkpoint, {"model": build_model(mc2, tc2).state_dict(), "step": 0,
                                     "model_config": mc2.to_dict(), "train_config": dataclasses.asdict(tc2)})
    return {"full": str(d / "full.pt"), "nocs": str(d / "nocs.pt")}


def run_eval(*argv):
    rc = ev.main([str(a) for a in argv])
    return rc


@pytest.fixture(scope="module")
def first(tmp_path_factory, data_dir, models):
    """One evaluation: the first cell of each family, t 0 and 4, no solver comparison."""
    out = tmp_path_factory.mktemp("eval")
    rc = run_eval(data_dir, "--models", f"full={models['full']}", "--per-family", "1", "--t", "0", "4",
                  "--no-solve", "-q", "-o", out / "ev.json", "--markdown", out / "ev.md")
    assert rc == 0
    with open(out / "ev.json") as fh:
        return out, json.load(fh)


def test_delta_and_residual_match_an_independent_computation(first, data_dir, models):
    _, rep = first
    c = rep["cells"][0]
    ds = ShardedDataset(data_dir)
    cell = ds.cell(c["row"])
    ref = solver.homogenize(cell, rtol=1e-9, preconditioner="multigrid", precision="float64").C
    np.testing.assert_allclose(c["C_ref"], ref, rtol=1e-12, atol=1e-14)
    net = load_model(models["full"])
    net.cfg.t = 4                                  # the network's own forward, 4 embedded steps
    op = cell_operator(cell, torch.float64)
    with torch.no_grad():
        u = net([op]).u[0]
    delta = np.linalg.norm(op.chom(u).numpy() - ref) / np.linalg.norm(ref)
    got = c["models"]["full"]["4"]
    assert got["delta"] == pytest.approx(delta, rel=1e-6)
    r = (op.rhs() - op.apply(u)).reshape(-1)
    assert got["residual"] == pytest.approx(float(r.norm() / op.rhs().reshape(-1).norm()), rel=1e-6)
    # the energy of the output: 1/2 u.Ku - f.u per unit volume, summed over the load cases
    e = float((0.5 * (u * op.apply(u)).sum() - (op.rhs() * u).sum()) / op.volume)
    assert got["energy"] == pytest.approx(e, rel=1e-6)


def test_t_changes_the_output_and_lowers_the_energy(first, data_dir, models):
    _, rep = first
    c = rep["cells"][0]
    m = c["models"]["full"]
    assert m["4"]["energy"] < m["0"]["energy"]
    assert m["4"]["delta"] != m["0"]["delta"]
    net = load_model(models["full"])
    op = cell_operator(ShardedDataset(data_dir).cell(c["row"]), torch.float64)
    us, _ = ev.predictions(net, op, [0, 2, 4])
    assert float((us[4] - us[0]).abs().max()) > 1e-6 * float(us[0].abs().max())
    with torch.no_grad():                          # t = own t (2) is the network's own output
        assert torch.allclose(us[2], net([op]).u[0], rtol=1e-10, atol=1e-14)
    assert net.cfg.t == 2 and net.cfg.use_pcg      # the override is undone


def test_references_are_cached(first, data_dir, models, monkeypatch):
    out, rep = first
    refs = out / "references.h5"
    n = rep["data"]["n_cells"]
    assert rep["references"] == {"path": str(refs), "computed": n, "cached": 0}
    assert not any(c["ref_cached"] for c in rep["cells"])
    mtime = os.stat(refs).st_mtime_ns

    def no_solve(*a, **k):
        raise AssertionError("a reference was solved again")

    monkeypatch.setattr(solver, "homogenize", no_solve)
    rc = run_eval(data_dir, "--models", f"full={models['full']}", "--per-family", "1", "--t", "0",
                  "--no-solve", "-q", "-o", out / "ev2.json")
    assert rc == 0
    rep2 = json.load(open(out / "ev2.json"))
    assert rep2["references"]["computed"] == 0 and rep2["references"]["cached"] == n
    assert all(c["ref_cached"] for c in rep2["cells"])
    assert os.stat(refs).st_mtime_ns == mtime
    assert [c["C_ref"] for c in rep2["cells"]] == [c["C_ref"] for c in rep["cells"]]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_references_rebuilt_from_a_report(first, data_dir, models, monkeypatch, tmp_path):
    """bench/refs_from_report.py: a cache rebuilt from a report's cells serves every reference
    bit for bit; a cell whose hash differs is not served (it would be solved)."""
    out, rep = first
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import refs_from_report as rfr
    finally:
        sys.path.pop(0)
    report = tmp_path / "rep.json"
    with open(out / "ev.json") as fh:
        doc = json.load(fh)
    doc["cells"].append(dict(doc["cells"][0], id="other:tpms-0", key="0" * 16))   # an extra cell is harmless
    report.write_text(json.dumps(doc))
    refs = tmp_path / "rebuilt.h5"
    assert rfr.main([str(report), "-o", str(refs)]) == 0
    assert rfr.main([str(report), "-o", str(refs)]) == 0                           # a merge adds nothing
    assert len(ev.ReferenceCache(str(refs)).entries) == len(rep["cells"]) + 1
    monkeypatch.setattr(solver, "homogenize", lambda *a, **k: pytest.fail("a reference was solved"))
    rc = run_eval(data_dir, "--models", f"full={models['full']}", "--per-family", "1", "--t", "0",
                  "--no-solve", "-q", "--refs", refs, "-o", tmp_path / "ev3.json")
    assert rc == 0
    rep3 = json.load(open(tmp_path / "ev3.json"))
    assert rep3["references"]["computed"] == 0 and rep3["references"]["cached"] == len(rep["cells"])
    assert [c["C_ref"] for c in rep3["cells"]] == [c["C_ref"] for c in rep["cells"]]
    for c3, c in zip(rep3["cells"], rep["cells"]):                                  # the same deltas
        assert c3["models"]["full"]["0"]["delta"] == pytest.approx(c["models"]["full"]["0"]["delta"], rel=1e-12)
    # a changed hash (other data or reference settings) is a miss
    cache = ev.ReferenceCache(str(refs))
    c0 = rep["cells"][0]
    assert cache.get(c0["id"], c0["key"]) is not None and cache.get(c0["id"], "f" * 16) is None
    assert np.all(np.isnan(cache.get(c0["id"], c0["key"])["residuals"]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"cells": [dict(c0, C_ref=[[1.0]])]}))
    assert rfr.main([str(bad), "-o", str(tmp_path / "bad.h5")]) == 2
    assert not os.path.exists(tmp_path / "bad.h5")


def test_aggregation_counts_add_up(tmp_path, data_dir, models, first):
    # narrow bins: some cells fall below / above them and must still be counted
    rc = run_eval(data_dir, "--models", f"full={models['full']}", "--per-family", "2", "--t", "0",
                  "--vf-bins", "0.2", "0.3", "--no-solve", "-q", "-o", tmp_path / "ev.json",
                  "--refs", first[0] / "references.h5")
    assert rc == 0
    rep = json.load(open(tmp_path / "ev.json"))
    rows = [r for r in rep["aggregates"] if r["label"] == "full" and r["t"] == 0]
    n = rep["data"]["n_cells"]
    assert n == 6 and rep["data"]["cells_per_family"] == {"tpms": 2, "lattice": 2, "shell": 2}
    fams = [r for r in rows if r["family"] != "all" and r["vf_bin"] == "all"]
    assert sum(r["count"] for r in fams) == n
    for f in fams:
        assert sum(r["count"] for r in rows if r["family"] == f["family"] and r["vf_bin"] != "all") == f["count"]
    (tot,) = [r for r in rows if r["family"] == "all"]
    assert tot["count"] == n
    assert tot["delta_max"] == pytest.approx(max(c["models"]["full"]["0"]["delta"] for c in rep["cells"]))
    assert tot["delta_mean"] == pytest.approx(np.mean([c["models"]["full"]["0"]["delta"] for c in rep["cells"]]))
    assert tot["delta_median"] == pytest.approx(np.median([c["models"]["full"]["0"]["delta"] for c in rep["cells"]]))
    assert {c["vf_bin"] for c in rep["cells"]} <= {"<0.20", "0.20-0.30", ">0.30"}
    for c in rep["cells"]:
        assert c["vf_bin"] == ev.vf_bin(c["vf"], [0.2, 0.3])
    # the kind rows: each cell's kind and topology from its shard's generator parameters
    ds = ShardedDataset(data_dir)
    for c in rep["cells"]:
        assert (c["kind"], c["topology"]) == ev.cell_kind(ds.params(c["row"])) and c["kind"]
    kinds = [r for r in rep["aggregates_kind"] if r["label"] == "full" and r["t"] == 0]
    assert sum(r["count"] for r in kinds) == n
    for r in kinds:
        d = [c["models"]["full"]["0"]["delta"] for c in rep["cells"]
             if c["family"] == r["family"] and c["kind"] == r["kind"]]
        assert r["count"] == len(d) and r["delta_mean"] == pytest.approx(np.mean(d))
        assert r["delta_max"] == pytest.approx(max(d)) and r["delta_median"] == pytest.approx(np.median(d))
    assert "delta per family and kind" in rep["markdown"]


def test_cell_kind():
    assert ev.cell_kind({"family": "tpms", "form": "sheet", "surface": "G"}) == ("sheet", "G")
    assert ev.cell_kind({"family": "lattice", "topology": "random", "k": 3}) == ("random", "random")
    assert ev.cell_kind({"family": "shell", "topology": "octet"}) == ("named", "octet")
    assert ev.cell_kind({"family": "foam"}) == (None, None)
    cells = [{"family": "shell", "kind": k, "models": {"m": {"10": {"delta": d}}}}
             for k, d in [("random", 0.3), ("named", 0.01), ("random", 0.1), (None, 9.0)]]
    rows = ev.aggregate_kind(cells, "m", 10)
    assert [(r["kind"], r["count"]) for r in rows] == [("named", 1), ("random", 2)]
    assert rows[1]["delta_mean"] == pytest.approx(0.2) and rows[1]["delta_max"] == 0.3


def test_vf_bins():
    e = [0.1, 0.2, 0.3, 0.4]
    assert [ev.vf_bin(v, e) for v in (0.05, 0.1, 0.19, 0.2, 0.35, 0.4, 0.45)] == \
        ["<0.10", "0.10-0.20", "0.10-0.20", "0.20-0.30", "0.30-0.40", "0.30-0.40", ">0.40"]


def test_model_specs():
    assert ev.parse_model_specs(["a/b/m.pt", "WO-CS=x.pt", "L1=dir/y=z.pt"]) == \
        [("m", "a/b/m.pt"), ("WO-CS", "x.pt"), ("L1", "dir/y=z.pt")]
    for bad in (["=x.pt"], ["a b=x.pt"], ["a="], ["a=x.pt", "a=y.pt"]):
        with pytest.raises(ev.InputError):
            ev.parse_model_specs(bad)


def test_bad_input_exits_2_and_writes_nothing(tmp_path, data_dir, models, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    yml = tmp_path / "missing.yaml"
    yml.write_text(yaml.safe_dump({"data": {"name": "nothing", "n": 16, "out_dir": str(tmp_path / "none")}}))
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n")
    mixed = tmp_path / "mixed"                 # a 16^3 shard and a 17^3 one: the second does not fit
    mixed.mkdir()
    shutil.copy(shard_files(data_dir)[0], mixed / "a-00000.h5")
    generate(DataConfig(name="z17", n=17, samples_per_family=1, shard_size=3, out_dir=str(mixed)), workers=0)
    out = tmp_path / "o"
    cases = [
        ([str(listed)], "must be a mapping"),
        ([str(mixed), "--models", models["full"]], "cells of (17, 17, 17) are not divisible"),
        ([str(tmp_path / "no_such_dir")], "no data-set shards"),
        ([str(yml)], "python -m hpc.make_dataset"),
        ([data_dir, "--models", f"x={junk}"], "not a CGINS checkpoint"),
        ([data_dir, "--models", f"x={tmp_path / 'nothere.pt'}"], "no such checkpoint"),
        ([data_dir, "--models", f"bad label={models['full']}"], "LABEL=PATH"),
        ([data_dir, "--models", f"=({models['full']}"], "LABEL=PATH"),
        ([data_dir, "--models", models["full"], "--vf-bins", "0.3", "0.2"], "--vf-bins"),
        ([data_dir, "--models", models["full"], "--symmetries", "0"], "--symmetries must be in 1..48"),
    ]
    for argv, msg in cases:
        rc = run_eval(*argv, "-o", out / "ev.json", "--markdown", out / "ev.md", "-q")
        err = capsys.readouterr().err.strip()
        assert rc == 2, (argv, err)
        assert err.startswith("error: ") and len(err.splitlines()) == 1 and msg in err, err
        assert not out.exists()
    # -o onto the default reference cache beside it would replace the cache with the report
    out.mkdir()
    (out / "references.h5").write_text("the cache")
    assert run_eval(data_dir, "--models", models["full"], "-o", out / "references.h5", "-q") == 2
    err = capsys.readouterr().err.strip()
    assert "must name different files" in err and len(err.splitlines()) == 1, err
    assert (out / "references.h5").read_text() == "the cache"
    out.joinpath("references.h5").unlink()
    out.rmdir()
    # the real command line: exit status 2, one line
    r = subprocess.run([sys.executable, "-m", "hpc.evaluate", str(tmp_path / "no_such_dir"), "-o",
                        str(out / "ev.json")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_report_provenance_and_markdown(first, models):
    out, rep = first
    with open(models["full"], "rb") as fh:
        sha = hashlib.sha256(fh.read()).hexdigest()
    (m,) = rep["models"]
    assert m["sha256"] == sha and m["label"] == "full" and m["own_t"] == 2 and m["step"] == 2
    assert m["config"]["channels"] == [4, 8]
    p = rep["provenance"]
    assert p["machine"]["torch"] == torch.__version__ and p["date"] and "--per-family 1" in p["command"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    # the commit of the checkout; empty only where there is no git repository
    assert p["git_commit"] == (head.stdout.strip() if head.returncode == 0 else "")
    md = open(out / "ev.md").read()
    assert md == rep["markdown"] and sha[:12] in md and "| **all** | all | 3 |" in md
    # every cell of a require_percolation data set percolates, and no warning is printed
    assert all(c["percolates"] == [True, True, True] and c["spanning_rank"] == 3 for c in rep["cells"])
    assert "Warning" not in md


def test_percolation_note():
    cells = [{"id": f"c{i}", "percolates": [True, True, i % 4 != 0]} for i in range(48)]
    note = ev.percolation_note(cells)
    assert note.startswith("**Warning:** 12 of 48 cells") and "`c0`" in note and "and 2 more" in note
    good = [c for c in cells if all(c["percolates"])]
    assert ev.percolation_note(good) is None
    assert ev.percolation_note(good + [{"id": "rods", "percolates": [True] * 3, "spanning_rank": 1}]).startswith(
        "**Warning:** 1 of 37 cells")


def test_ablation_table(tmp_path, data_dir, models, first):
    refs = tmp_path / "refs.h5"
    refs.write_bytes((first[0] / "references.h5").read_bytes())      # a copy: the cells are cached
    rc = run_eval(data_dir, "--models", f"full={models['full']}", f"WO-CS={models['nocs']}", "--per-family", "1",
                  "--no-solve", "-q", "-o", tmp_path / "ev.json", "--refs", refs)
    assert rc == 0
    rep = json.load(open(tmp_path / "ev.json"))
    assert [(r["label"], r["t"], r["count"]) for r in rep["ablation"]] == [("full", 2, 3), ("WO-CS", 0, 3)]
    assert rep["t_per_model"] == {"full": [0, 1, 2, 4, 8, 10], "WO-CS": [0, 1, 4, 8, 10]}
    assert "use_pcg=False" in rep["markdown"] and "### Ablations" in rep["markdown"]
    full = rep["ablation"][0]
    own = [c["models"]["full"]["2"] for c in rep["cells"]]
    assert full["delta_median"] == pytest.approx(np.median([m["delta"] for m in own]))
    assert full["energy_mean"] == pytest.approx(np.mean([m["energy"] for m in own]))
    for f in ("tpms", "lattice", "shell"):
        (one,) = [c["models"]["full"]["2"]["delta"] for c in rep["cells"] if c["family"] == f]
        assert full["delta_median_" + f] == pytest.approx(one)
    assert rep["references"]["cached"] == 3 and not os.path.exists(tmp_path / "references.h5")


def test_solver_comparison_and_iterate_tracking(tmp_path, data_dir, models):
    rc = run_eval(data_dir, "--models", f"full={models['full']}", "--per-family", "1", "--families", "tpms",
                  "--t", "2", "--preconditioners", "jacobi", "-q", "-o", tmp_path / "ev.json")
    assert rc == 0
    rep = json.load(open(tmp_path / "ev.json"))
    (c,) = rep["cells"]
    s = c["solve"]["jacobi"]
    for start in ("zero", "net"):
        r = s[start]
        assert r["converged"] and r["iterations"] > 0 and r["delta_final"] < 1e-4
        assert 0 < r["iterations_to_target"] <= r["iterations"]
        assert 0 < r["time_to_target"] <= r["time_total"] + 1e-9
    assert s["net"]["time_warm_start"] > 0 and s["zero"]["time_warm_start"] == 0
    assert s["net"]["delta_start"] == pytest.approx(c["models"]["full"]["2"]["delta"], rel=1e-3)
    assert rep["solve_aggregates"][-1]["family"] == "all" and rep["solve_aggregates"][-1]["count"] == 1
    # the tracked iterates are the solver's: the last tracked C^H is the returned one
    cell = ShardedDataset(data_dir).cell(c["row"])
    C_ref = np.asarray(c["C_ref"])
    op64 = cell_operator(cell, torch.float64)
    deltas, res = ev.track_deltas(cell, C_ref, op64, rtol=1e-6, precision="float32", preconditioner="jacobi",
                                  keep_fields=True)
    assert len(deltas) == max(res.iterations) + 1
    last = np.linalg.norm(op64.chom(res.chi).numpy() - C_ref) / np.linalg.norm(C_ref)
    assert deltas[-1] == pytest.approx(last, rel=1e-9)
    assert deltas[0] > 0.05 and ev.first_stay_below(deltas, 0.01) == s["zero"]["iterations_to_target"]
    assert ev.first_stay_below([0.5, 0.005, 0.02, 0.009, 0.001], 0.01) == 3
    assert ev.first_stay_below([0.5, 0.02], 0.01) is None


@pytest.mark.parametrize("label", sorted(ABLATIONS))
def test_ablation_configs(label):
    from hpc import train as hpc_train
    from model.network import CGINS
    path = os.path.join(ROOT, "configs", f"ablation_{label}.yaml")
    base = os.path.join(ROOT, "configs", "cgins_small.yaml")
    mc, lc, tc, rest = load_config(path)
    bmc, blc, btc, brest = load_config(base)
    diff = {k: v for k, v in mc.to_dict().items() if v != bmc.to_dict()[k]}
    assert diff == ABLATIONS[label]
    assert rest == brest and lc == blc
    assert {k: v for k, v in dataclasses.asdict(tc).items() if k != "checkpoint"} == \
        {k: v for k, v in dataclasses.asdict(btc).items() if k != "checkpoint"}
    args = hpc_train.build_parser().parse_args([path, "--steps", "7"])
    mc2, _, tc2, _ = hpc_train.configure(args)
    assert tc2.steps == 7
    assert tc2.checkpoint == os.path.join("runs", f"ablation_{label}", f"ablation_{label}.pt")
    CGINS(mc2)


def test_symmetries_average_the_start_and_are_recorded(tmp_path, data_dir, models, first):
    """--symmetries 4: the same cells and references as ``first``, another start (the
    average of four), recorded in the settings and the Markdown."""
    out, rep1 = first
    rc = run_eval(data_dir, "--models", f"full={models['full']}", "--per-family", "1", "--t", "0", "4",
                  "--no-solve", "-q", "--symmetries", "4", "--refs", out / "references.h5",
                  "-o", tmp_path / "ev.json", "--markdown", tmp_path / "ev.md")
    assert rc == 0
    with open(tmp_path / "ev.json") as fh:
        rep4 = json.load(fh)
    assert rep4["settings"]["symmetries"] == 4 and rep1["settings"]["symmetries"] == 1
    assert "averaged over 4 grid symmetries" in open(tmp_path / "ev.md").read()
    for c1, c4 in zip(rep1["cells"], rep4["cells"]):
        assert c1["id"] == c4["id"] and c1["C_ref"] == c4["C_ref"]
        assert c1["models"]["full"]["0"]["delta"] != c4["models"]["full"]["0"]["delta"]
