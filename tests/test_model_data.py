"""CGINS data sets (model/data.py, hpc/make_dataset.py; issue 5 item 4): reproducible
shards independent of the worker count, families and ranges respected, lazy dataset,
deterministic redraws, atomic shard writes."""
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch

from microstructures.cell import CellError
from microstructures.generators import SURFACES, VF_TOL, topology_names
from model import data
from model.data import DataConfig, ShardedDataset, draw_params, generate, make_shard, shard_files


def _cfg(out_dir, **kw):
    d = dict(name="t", n=12, samples_per_family=4, shard_size=5, seed=7, out_dir=str(out_dir))
    d.update(kw)
    return DataConfig.from_dict(d)


def _read(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][()] for k in f}, dict(f.attrs)


def _assert_same_shard(a, b):
    da, aa = _read(a)
    db, ab = _read(b)
    assert sorted(da) == sorted(db)
    for k in da:
        assert np.array_equal(da[k], db[k]), k
    aa.pop("config"), ab.pop("config")                       # holds out_dir, which differs
    assert aa == ab


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("serial"))
    generate(cfg, workers=0)
    return cfg


def test_same_seed_same_shards_any_worker_count(serial, tmp_path):
    cfg2 = _cfg(tmp_path / "dask2")
    res = generate(cfg2, workers=2)                          # two dask worker processes
    assert [r["shard"] for r in res] == [0, 1, 2] and [r["samples"] for r in res] == [5, 5, 2]
    for s in range(serial.n_shards):
        _assert_same_shard(serial.shard_path(s), cfg2.shard_path(s))
    # one shard on its own, regenerated independently
    cfg3 = _cfg(tmp_path / "one")
    generate(cfg3, shards=[1])
    assert sorted(os.listdir(cfg3.out_dir)) == ["t-00001.h5"]
    _assert_same_shard(serial.shard_path(1), cfg3.shard_path(1))
    # another seed gives other cells
    cfg4 = _cfg(tmp_path / "seed8", seed=8)
    generate(cfg4, shards=[0])
    assert not np.array_equal(_read(cfg4.shard_path(0))[0]["phases"], _read(serial.shard_path(0))[0]["phases"])


def test_families_and_ranges(serial):
    ds = ShardedDataset(serial.out_dir)
    assert len(ds) == 12
    assert list(ds.index) == list(range(12))
    assert [ds.families[i] for i in range(12)] == [data.FAMILIES[i % 3] for i in range(12)]
    names = set(topology_names())
    for k in range(len(ds)):
        p = ds.params(k)
        ph = ds.phases(k)
        assert ph.dtype == np.uint8 and set(np.unique(ph)) <= {0, 1} and ph.shape == (12, 12, 12)
        assert 0.1 <= p["vf"] <= 0.4 and 0.2 <= p["nu"] <= 0.4 and p["E"] == 1.0
        assert abs(ph.mean() - p["vf"]) <= VF_TOL + 1e-12
        assert ds.vf[k] == pytest.approx(ph.mean()) and ds.nu[k] == p["nu"] and ds.E[k] == 1.0
        assert p == {**draw_params(serial, k, p["attempt"]), **{q: p[q] for q in
                                                               ("attempt", "rejected", "vf_achieved", "cell_params")}}
        fam = ds.families[k]
        if fam == "tpms":
            assert p["generator"] == "tpms" and p["surface"] in SURFACES and p["form"] in ("network", "sheet")
        else:
            assert p["generator"] == ("lattice" if fam == "lattice" else "shell_lattice")
            assert p["topology"] == "random" or p["topology"] in names
    # the parameter draws cover the ranges (many draws, no generation)
    draws = [draw_params(DataConfig(), i) for i in range(3000)]
    vf = np.array([d["vf"] for d in draws])
    nu = np.array([d["nu"] for d in draws])
    assert 0.1 <= vf.min() < 0.11 and 0.39 < vf.max() <= 0.4 and 0.2 <= nu.min() < 0.21 and 0.39 < nu.max() <= 0.4
    tp = [d for d in draws if d["family"] == "tpms"]
    assert {d["surface"] for d in tp} == set(SURFACES) and {d["form"] for d in tp} == {"network", "sheet"}
    lat = [d for d in draws if d["family"] == "lattice"]
    rnd = np.mean([d["topology"] == "random" for d in lat])
    assert 0.25 < rnd < 0.35 and {d["topology"] for d in lat} == names | {"random"}


def test_dataset_indexing_and_filters(serial, tmp_path):
    ds = ShardedDataset(serial.out_dir)
    ph, E, nu = ds[6]
    direct = _read(serial.shard_path(1))[0]
    assert ph.dtype == torch.uint8 and torch.equal(ph, torch.from_numpy(direct["phases"][1]))
    assert E.item() == direct["E"][1] and nu.item() == direct["nu"][1]
    assert torch.equal(ds[-1][0], torch.from_numpy(_read(serial.shard_path(2))[0]["phases"][1]))
    with pytest.raises(IndexError):
        ds[12]
    cell = ds.cell(6)
    assert np.array_equal(cell.phases, direct["phases"][1]) and list(cell.E) == [0.0, 1.0]

    tp = ShardedDataset(serial.out_dir, families=["tpms"])
    assert len(tp) == 4 and set(tp.families) == {"tpms"} and list(tp.index) == [0, 3, 6, 9]
    assert torch.equal(tp[2][0], ds[6][0])

    held = _cfg(tmp_path, name="h", split="heldout", seed=99, samples_per_family=2, shard_size=6)
    generate(held)
    mixed = [serial.shard_path(s) for s in range(3)] + [held.shard_path(0)]
    assert len(ShardedDataset(mixed)) == 18
    assert len(ShardedDataset(mixed, split="heldout")) == 6 and len(ShardedDataset(mixed, split="train")) == 12
    assert len(ShardedDataset(mixed, seed=99, families=["shell", "lattice"])) == 4
    # a list of directories (and globs, and files), as data.train takes it; no file twice
    both = ShardedDataset([serial.out_dir, held.out_dir, serial.shard_path(0)])
    assert both.files == ShardedDataset(mixed).files and len(both) == 18
    assert shard_files([os.path.join(held.out_dir, "*.h5")]) == [held.shard_path(0)]

    # DataLoader worker processes each open their own handles
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    batches = list(loader)
    assert torch.equal(torch.cat([b[0] for b in batches]), torch.stack([ds[k][0] for k in range(12)]))


def test_redraw_is_deterministic_and_recorded(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, samples_per_family=1, shard_size=3, require_percolation=False)   # CellError only
    bad = draw_params(cfg, 2, 0)
    real = data.build_cell

    def failing(p):
        if p == bad:
            raise CellError("shell lattice: volume fraction not reachable (test)")
        return real(p)
    monkeypatch.setattr(data, "build_cell", failing)
    r1 = make_shard(cfg.to_dict(), 0)
    assert r1["redraws"] == 1
    d1, _ = _read(cfg.shard_path(0))
    p = json.loads(d1["params"][2])
    assert p["attempt"] == 1 and p["rejected"][0]["attempt"] == 0 and "test" in p["rejected"][0]["error"]
    assert np.array_equal(d1["phases"][2], (real(draw_params(cfg, 2, 1)).phases > 0).astype(np.uint8))
    make_shard(cfg.to_dict(), 0, overwrite=True)
    assert np.array_equal(_read(cfg.shard_path(0))[0]["phases"], d1["phases"])


def test_non_percolating_draws_are_redrawn(serial, tmp_path, monkeypatch):
    """Every stored solid spans the period along x, y and z; a draw whose solid does not
    (an isolated sphere here) is redrawn and the reason recorded. With
    require_percolation off, such a cell is kept."""
    from microstructures import percolates, spanning_rank
    ds = ShardedDataset(serial.out_dir)
    assert all(all(percolates(ds.phases(k) > 0)) for k in range(len(ds)))
    assert all(spanning_rank(ds.phases(k) > 0) == 3 for k in range(len(ds)))
    cfg = _cfg(tmp_path / "on", samples_per_family=1, shard_size=3)
    bad = draw_params(cfg, 1, 0)
    real = data.build_cell

    def isolated(p):
        cell = real(p)
        if p == bad:
            ph = np.zeros_like(cell.phases)
            x = np.arange(cfg.n) - cfg.n / 2
            ph[(x[:, None, None] ** 2 + x[None, :, None] ** 2 + x[None, None, :] ** 2) < (cfg.n / 3) ** 2] = 1
            cell.phases[...] = ph
        return cell
    monkeypatch.setattr(data, "build_cell", isolated)
    make_shard(cfg.to_dict(), 0)
    d, _ = _read(cfg.shard_path(0))
    p = json.loads(d["params"][1])
    assert p["attempt"] >= 1 and p["rejected"][0]["attempt"] == 0
    assert "does not percolate along x, y, z" in p["rejected"][0]["error"]
    assert all(all(percolates(ph > 0)) for ph in d["phases"])
    off = _cfg(tmp_path / "off", samples_per_family=1, shard_size=3, require_percolation=False)
    assert off.content_hash() != cfg.content_hash()
    make_shard(off.to_dict(), 0)
    assert json.loads(_read(off.shard_path(0))[0]["params"][1])["attempt"] == 0
    assert percolates(_read(off.shard_path(0))[0]["phases"][1] > 0) == (False, False, False)
    # shards made under other acceptance rules are stale
    assert data.shard_is_current(cfg.shard_path(0), cfg, 0)
    monkeypatch.setattr(data, "SAMPLING_VERSION", data.SAMPLING_VERSION - 1)
    assert not data.shard_is_current(cfg.shard_path(0), cfg, 0)


def test_shard_write_is_atomic_and_rerun_keeps_current(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, samples_per_family=1, shard_size=3)
    path = cfg.shard_path(0)

    def boom(cfg_, index):
        raise RuntimeError("generator crashed")
    real = data.make_sample
    monkeypatch.setattr(data, "make_sample", boom)
    with pytest.raises(RuntimeError):
        make_shard(cfg.to_dict(), 0)
    assert not os.path.exists(cfg.out_dir) or os.listdir(cfg.out_dir) == []
    monkeypatch.setattr(data, "make_sample", real)
    assert not make_shard(cfg.to_dict(), 0)["skipped"]
    before = _read(path)[0]["phases"]
    assert make_shard(cfg.to_dict(), 0)["skipped"]            # same content hash: kept

    def late_boom(cfg_, index):                               # fail on the last sample
        if index == 2:
            raise RuntimeError("generator crashed")
        return real(cfg_, index)
    monkeypatch.setattr(data, "make_sample", late_boom)
    with pytest.raises(RuntimeError):
        make_shard(cfg.to_dict(), 0, overwrite=True)
    assert os.listdir(cfg.out_dir) == [os.path.basename(path)]   # old shard intact, no temp file
    assert np.array_equal(_read(path)[0]["phases"], before)
    other = _cfg(tmp_path, samples_per_family=1, shard_size=3, nu_range=[0.25, 0.3])
    assert not data.shard_is_current(path, other, 0)


def test_make_dataset_cli(tmp_path):
    from hpc.make_dataset import main
    out = tmp_path / "cli"
    assert main(["--name", "c", "--n", "8", "--samples-per-family", "2", "--shard-size", "4",
                 "--families", "tpms", "shell", "--workers", "0", "--out-dir", str(out), "-q"]) == 0
    ds = ShardedDataset(str(out))
    assert len(ds) == 4 and list(ds.families) == ["tpms", "shell"] * 2
    assert main(["--name", "c", "--n", "2", "--workers", "0", "--out-dir", str(out), "-q"]) == 2
    assert main(["--name", "c", "--n", "8", "--workers", "-1", "--out-dir", str(tmp_path / "w"), "-q"]) == 2
    for text in ("data: [unclosed\n", "- 1\n- 2\n", "data: 3\n"):      # not YAML; not mappings
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        assert main([str(bad), "--workers", "0", "--out-dir", str(tmp_path / "b"), "-q"]) == 2, text
    assert not (tmp_path / "w").exists() and not (tmp_path / "b").exists()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in ("train", "heldout", "tiny"):
        cfg = DataConfig.from_yaml(os.path.join(root, "configs", f"data_{name}.yaml"))
        assert cfg.families == data.FAMILIES
    assert DataConfig.from_yaml(os.path.join(root, "configs", "data_heldout.yaml")).samples_per_family >= 200
    shipped = sorted(f for f in os.listdir(os.path.join(root, "configs")) if f.startswith("data_") and f.endswith(".yaml"))
    for f in shipped:                                    # every data config the models cite parses
        cfg = DataConfig.from_yaml(os.path.join(root, "configs", f))
        assert set(cfg.families) <= set(data.FAMILIES) and cfg.samples_per_family > 0, f


def test_make_dataset_in_process_needs_no_dask_and_shards_split_across_processes(tmp_path):
    """--workers 0 generates without dask (the GPU machine has none): separate processes
    with disjoint --shards write the same set as one whole generation."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    flags = ["--name", "s", "--n", "8", "--samples-per-family", "2", "--shard-size", "2",
             "--families", "tpms", "shell", "--workers", "0", "-q"]
    code = ("import sys; sys.modules['dask'] = sys.modules['distributed'] = None; "
            "from hpc.make_dataset import main; sys.exit(main(sys.argv[1:]))")
    for shard in ("0", "1"):
        p = subprocess.run([sys.executable, "-c", code, *flags, "--out-dir", str(tmp_path / "split"),
                            "--shards", shard], cwd=root, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    from hpc.make_dataset import main
    assert main([*flags, "--out-dir", str(tmp_path / "whole")]) == 0
    split, whole = ShardedDataset(str(tmp_path / "split")), ShardedDataset(str(tmp_path / "whole"))
    assert len(split) == len(whole) == 4
    for i in range(4):
        assert np.array_equal(split.phases(i), whole.phases(i)) and split.nu[i] == whole.nu[i]


def test_a_smaller_regeneration_removes_stale_shards_and_mixed_shards_are_refused(tmp_path):
    """make_dataset with fewer samples or another shard size removes the shards beyond the
    new ones (they were read with the new set: extra cells, some twice); shards of two
    configurations in one directory are refused; a new split label rewrites the shards."""
    big = _cfg(tmp_path, samples_per_family=4, shard_size=2)           # 12 samples, 6 shards
    generate(big, workers=0)
    assert len(ShardedDataset(tmp_path)) == 12
    small = _cfg(tmp_path, samples_per_family=2, shard_size=2)         # 6 samples, 3 shards
    generate(small, workers=0)
    assert len(shard_files(tmp_path)) == 3
    ds = ShardedDataset(tmp_path)
    assert len(ds) == 6 and sorted(ds.index.tolist()) == list(range(6))
    resized = _cfg(tmp_path, samples_per_family=2, shard_size=4)       # 2 shards: shard 2 is stale
    generate(resized, workers=0)
    assert len(shard_files(tmp_path)) == 2 and sorted(ShardedDataset(tmp_path).index.tolist()) == list(range(6))
    # a stale shard put back by hand (an older make_dataset): refused, not read along
    make_shard(small.to_dict(), 2)
    with pytest.raises(ValueError, match="mixes shards of two configurations"):
        ShardedDataset(tmp_path)
    os.unlink(small.shard_path(2))
    # the same samples under another split label are rewritten, not kept as current
    held = _cfg(tmp_path, samples_per_family=2, shard_size=4, split="heldout")
    res = generate(held, workers=0)
    assert not any(r["skipped"] for r in res)
    assert len(ShardedDataset(tmp_path, split="heldout")) == 6 and len(ShardedDataset(tmp_path, split="train")) == 0
    # a copy of a shard in another directory is one shard read twice
    other = tmp_path / "copy"
    other.mkdir()
    import shutil
    shutil.copy(held.shard_path(0), other / "x.h5")
    with pytest.raises(ValueError, match="read twice"):
        ShardedDataset([str(tmp_path), str(other)])


def test_a_data_yaml_that_is_not_a_mapping_is_one_value_error(tmp_path):
    for text in ("- a\n", "data: [1, 2]\n", "data: {n: [unclosed\n"):
        (tmp_path / "d.yaml").write_text(text)
        with pytest.raises(ValueError) as info:
            DataConfig.from_yaml(str(tmp_path / "d.yaml"))
        assert "\n" not in str(info.value)
