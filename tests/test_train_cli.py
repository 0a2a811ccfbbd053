"""`python -m hpc.train` end to end (issue 5 item 5): a tiny config on 8^3 cells, the
checkpoint / log / config in --out, and resume after kill -9 == an uninterrupted run
(bitwise on CPU)."""
import contextlib
import csv
import os
import signal
import subprocess
import sys
import time
from unittest import mock

import pytest
import torch
import yaml

from hpc import distributed
from hpc import train as hpc_train
from model.train import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "cgins_tiny.yaml")
LAUNCH_VARS = [v for _, *names in distributed.LAUNCHERS for v in names] + ["SLURM_STEP_ID", "MASTER_ADDR",
                                                                            "MASTER_PORT"]


def tiny_config(path, per_family=1, **train):
    """configs/cgins_tiny.yaml with ``per_family`` generated 8^3 cells per family (3
    families) and the given train overrides, written to ``path``."""
    with open(TINY) as fh:
        d = yaml.safe_load(fh)
    d["train"].update(train)
    d["data"] = {"generate": {"n": 8, "samples_per_family": per_family, "seed": 3}}
    with open(path, "w") as fh:
        yaml.safe_dump(d, fh)
    return str(path)


def clean_env(**extra):
    """The environment of a child run: no launcher variables of our own, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **extra)
    return env


@contextlib.contextmanager
def single_process_env():
    """Run hpc.train in this process as a single rank, even inside a launcher's job."""
    with mock.patch.dict(os.environ):
        for k in LAUNCH_VARS:
            os.environ.pop(k, None)
        yield


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "hpc.train", *args], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=300, **kw)


def read_log(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_cli_end_to_end(tmp_path):
    cfg = tiny_config(tmp_path / "tiny.yaml", steps=4, checkpoint_every=2)
    out = tmp_path / "run"
    r = cli(cfg, "--out", str(out), "--seed", "5")
    assert r.returncode == 0, r.stderr
    ck = load_checkpoint(str(out / "cgins_tiny.pt"))
    assert ck["step"] == 4 and ck["train_config"]["seed"] == 5
    rows = read_log(out / "cgins_tiny.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows)
    assert [float(r["loss"]) for r in rows] == pytest.approx([row["loss"] for row in ck["log"]], rel=1e-9)
    eff = yaml.safe_load(open(out / "config.yaml"))
    assert eff["train"]["steps"] == 4 and eff["train"]["checkpoint"] == str(out / "cgins_tiny.pt")
    assert not [f for f in os.listdir(out) if "tmp" in f]
    assert "done: step 4" in r.stderr


def test_cli_trains_on_tcmalloc_and_records_it(tmp_path):
    """hpc.train re-executes itself with tcmalloc preloaded (hpc.allocator), as the solver's
    command lines do; HPC_ALLOCATOR=system keeps glibc. config.yaml records which, and the
    weights are bit-identical either way (the allocator never changes the numbers)."""
    from hpc.allocator import find_tcmalloc
    assert find_tcmalloc() is not None, "tcmalloc missing: apt-get install libtcmalloc-minimal4 (scripts/setup_env.sh)"
    cfg = tiny_config(tmp_path / "tiny.yaml", steps=2, checkpoint_every=2)
    weights = {}
    for mode in ("tcmalloc", "system"):
        env = clean_env(HPC_ALLOCATOR=mode)
        env.pop("LD_PRELOAD", None)
        r = subprocess.run([sys.executable, "-m", "hpc.train", cfg, "--out", str(tmp_path / mode)], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert yaml.safe_load(open(tmp_path / mode / "config.yaml"))["launch"]["allocator"] == mode
        weights[mode] = load_checkpoint(str(tmp_path / mode / "cgins_tiny.pt"))["model"]
    for k, v in weights["tcmalloc"].items():
        assert torch.equal(v, weights["system"][k]), k


def test_bad_config_and_uneven_batch_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with single_process_env():
        assert hpc_train.main([str(bad), "--out", str(tmp_path / "b")]) == hpc_train.EXIT_CONFIG
    cfg = tiny_config(tmp_path / "tiny.yaml", steps=1, batch_size=3)
    with mock.patch.dict(os.environ, {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}):
        # refused before any process group is joined (no rendezvous, no hang)
        assert hpc_train.main([cfg, "--out", str(tmp_path / "u")]) == hpc_train.EXIT_CONFIG
    with single_process_env():
        assert hpc_train.main([cfg, "--out", str(tmp_path / "m"), "--data",
                               str(tmp_path / "nowhere")]) == hpc_train.EXIT_CONFIG


@pytest.mark.parametrize("flags,text,needle", [
    (["--batch-size", "0"], None, "train.batch_size"),
    (["--checkpoint-every", "0"], None, "train.checkpoint_every"),
    (["--steps", "0"], None, "train.steps"),
    (["--steps", "-3"], None, "train.steps"),
    (["--generate", "0"], None, "--generate"),
    (["--resolution", "0"], None, "--resolution"),
    (["--resolution", "9"], None, "2^depth"),
    (["--threads", "0"], None, "--threads"),
    ([], "model: [unclosed\n", "not valid YAML"),
    ([], "- a\n- b\n", "must be a mapping"),
    (["--out", "{tmp}/afile"], None, "not a directory"),
    (["--out", "{tmp}/afile/sub"], None, "is a file, not a directory"),
    (["--seed", "-1"], None, "train.seed"),
    ([], "data:\n  trian: somewhere\n", "unknown data keys ['trian']"),
    ([], "dta:\n  train: somewhere\n", "unknown sections ['dta']"),
    ([], "data:\n  generate: {n: 8, bogus: 1}\n", "unknown data config keys ['bogus']"),
    ([], "data:\n  generate: {n: 9, samples_per_family: 1}\n", "do not fit the model"),
] + ([(["--device", "cuda"], None, "CUDA is not available")] if not torch.cuda.is_available() else []))
def test_bad_flags_and_files_are_one_error_line_and_exit_2(flags, text, needle, tmp_path, caplog):
    """refused before anything is written: no traceback, no config.yaml, no checkpoint"""
    cfg = tiny_config(tmp_path / "tiny.yaml", steps=1)
    if text is not None:
        with open(cfg, "w") as fh:
            fh.write(text)
    (tmp_path / "afile").write_text("x")
    out = ["--out", str(tmp_path / "run")] if "--out" not in flags else []
    before = sorted(os.listdir(tmp_path))
    with single_process_env():
        assert hpc_train.main([cfg] + out + [f.format(tmp=tmp_path) for f in flags]) == hpc_train.EXIT_CONFIG
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and needle in errors[0] and "\n" not in errors[0], errors
    assert sorted(os.listdir(tmp_path)) == before


def test_shards_that_are_not_a_data_set_or_do_not_fit_the_model_exit_2(tmp_path, caplog):
    """a stray .h5 in the data directory, and shards whose grid the model cannot take:
    one error line and nothing written (they used to be tracebacks and a config.yaml)"""
    from model.data import DataConfig, generate
    cfg = tiny_config(tmp_path / "tiny.yaml", steps=1)
    generate(DataConfig(n=9, samples_per_family=1, shard_size=3, out_dir=str(tmp_path / "d9")), workers=0)
    generate(DataConfig(n=8, samples_per_family=1, shard_size=3, out_dir=str(tmp_path / "junk")), workers=0)
    (tmp_path / "junk" / "notes.h5").write_text("junk")
    for data, needle in (("d9", "do not fit the model"), ("junk", "not a readable HDF5 data-set shard")):
        caplog.clear()
        with single_process_env():
            assert hpc_train.main([cfg, "--out", str(tmp_path / "run"), "--data", str(tmp_path / data)]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and needle in errors[0], errors
        assert not (tmp_path / "run").exists()


def test_resume_keeps_the_seed_batch_and_data_and_needs_no_init_from(tmp_path, caplog):
    """A resume with another seed, batch or data set is refused (it used to go on and
    overwrite the record of the steps before); a finished run's re-run repairs its csv;
    a fine-tuning run resumes after its --init-from file is gone."""
    from model.data import DataConfig, generate
    cfg = tiny_config(tmp_path / "tiny.yaml", steps=2, checkpoint_every=1)
    for name, seed in (("a", 3), ("b", 4)):
        generate(DataConfig(n=8, samples_per_family=1, shard_size=3, seed=seed, out_dir=str(tmp_path / name)),
                 workers=0)
    run = ["--out", str(tmp_path / "run"), "--data", str(tmp_path / "a")]
    with single_process_env():
        assert hpc_train.main([cfg, *run]) == 0
        for flags, needle in ((["--seed", "5"], "seed 0 -> 5"), (["--batch-size", "1"], "batch_size 2 -> 1")):
            caplog.clear()
            assert hpc_train.main([cfg, *run, "--steps", "3", *flags]) == 2
            assert needle in caplog.records[-1].getMessage()
        caplog.clear()
        assert hpc_train.main([cfg, "--out", str(tmp_path / "run"), "--data", str(tmp_path / "b"), "--steps", "3"]) == 2
        assert "trained on other cells" in caplog.records[-1].getMessage()
        csv_path = tmp_path / "run" / "cgins_tiny.csv"
        csv_path.write_text(csv_path.read_text().splitlines()[0] + "\n")      # as if killed before the csv
        assert hpc_train.main([cfg, *run]) == 0                                # finished: trains nothing
        assert len(read_log(csv_path)) == 2
        assert load_checkpoint(str(tmp_path / "run" / "cgins_tiny.pt"))["step"] == 2
        # a fine-tuning run whose --init-from file has gone resumes from its own checkpoint
        init = tmp_path / "init.pt"
        init.write_bytes((tmp_path / "run" / "cgins_tiny.pt").read_bytes())
        ft = [cfg, "--out", str(tmp_path / "ft"), "--data", str(tmp_path / "a"), "--init-from", str(init)]
        assert hpc_train.main([*ft, "--steps", "1"]) == 0
        init.unlink()
        assert hpc_train.main([*ft, "--steps", "2"]) == 0
    assert load_checkpoint(str(tmp_path / "ft" / "cgins_tiny.pt"))["step"] == 2


def test_no_config_trains_into_the_shipped_models():
    """every configs/*.yaml's train.checkpoint lies outside models/: a run with the
    default output never overwrites a shipped model (cgins_small.yaml once resumed and
    overwrote models/cgins_default.pt)"""
    import glob
    for path in glob.glob(os.path.join(ROOT, "configs", "*.yaml")):
        d = yaml.safe_load(open(path)) or {}
        ck = (d.get("train") or {}).get("checkpoint")
        if ck:
            assert not os.path.normpath(ck).startswith("models" + os.sep), (path, ck)


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    steps = 16
    cfg = tiny_config(tmp_path / "tiny.yaml", steps=steps, checkpoint_every=4)
    # the uninterrupted run, in this process (one thread, like the children)
    with single_process_env():
        assert hpc_train.main([cfg, "--out", str(tmp_path / "full")]) == 0
    full = load_checkpoint(str(tmp_path / "full" / "cgins_tiny.pt"))

    out = tmp_path / "cut"
    ck_path = out / "cgins_tiny.pt"
    proc = subprocess.Popen([sys.executable, "-m", "hpc.train", cfg, "--out", str(out)], cwd=ROOT,
                            env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not ck_path.exists() and proc.poll() is None and time.time() - t0 < 240:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    err = proc.communicate()[1]
    assert ck_path.exists(), err
    killed_at = load_checkpoint(str(ck_path))["step"]
    assert 0 < killed_at < steps, f"the run was not interrupted (checkpoint at step {killed_at})"

    r = cli(cfg, "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"at step {killed_at}" in r.stderr             # it did resume, not restart
    resumed = load_checkpoint(str(ck_path))
    assert resumed["step"] == steps
    for k, a in full["model"].items():
        assert torch.equal(a, resumed["model"][k]), k
    # the weights are bitwise equal; the logged float64 diagnostics (energies) may
    # differ in the last bits (reduction order of torch sums is not guaranteed
    # across processes)
    assert len(resumed["log"]) == len(full["log"])
    for a, b in zip(resumed["log"], full["log"]):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-12, abs=1e-30), key
    assert len(read_log(out / "cgins_tiny.csv")) == len(read_log(tmp_path / "full" / "cgins_tiny.csv"))


def test_no_resume_starts_over(tmp_path):
    cfg = tiny_config(tmp_path / "tiny.yaml", steps=2, checkpoint_every=1)
    with single_process_env():
        assert hpc_train.main([cfg, "--out", str(tmp_path / "r")]) == 0
        first = load_checkpoint(str(tmp_path / "r" / "cgins_tiny.pt"))
        assert hpc_train.main([cfg, "--out", str(tmp_path / "r"), "--steps", "3"]) == 0
        assert load_checkpoint(str(tmp_path / "r" / "cgins_tiny.pt"))["step"] == 3
        assert hpc_train.main([cfg, "--out", str(tmp_path / "r"), "--no-resume"]) == 0
    again = load_checkpoint(str(tmp_path / "r" / "cgins_tiny.pt"))
    assert again["step"] == 2
    for k, a in first["model"].items():                  # seeded: the same first two steps
        assert torch.equal(a, again["model"][k]), k


def test_sharded_dataset_trains_like_the_same_cells_in_memory(tmp_path):
    """--data reads model.data shards; they hold the cells that in-memory generation
    draws from the same DataConfig, so both runs end with the same weights."""
    from model.data import DataConfig, generate
    cfg = tiny_config(tmp_path / "tiny.yaml", steps=2, checkpoint_every=2)
    spec = yaml.safe_load(open(cfg))["data"]["generate"]
    generate(DataConfig(**spec, shard_size=2, out_dir=str(tmp_path / "shards")), workers=0)
    assert len(os.listdir(tmp_path / "shards")) == 2
    with single_process_env():
        assert hpc_train.main([cfg, "--out", str(tmp_path / "mem")]) == 0
        assert hpc_train.main([cfg, "--out", str(tmp_path / "h5"), "--data", str(tmp_path / "shards")]) == 0
    assert yaml.safe_load(open(tmp_path / "h5" / "config.yaml"))["launch"]["cells"] == \
        f"3 cells from {tmp_path / 'shards'}"
    a = load_checkpoint(str(tmp_path / "mem" / "cgins_tiny.pt"))["model"]
    b = load_checkpoint(str(tmp_path / "h5" / "cgins_tiny.pt"))["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_family_weights_repeat_cells_and_zero_equals_the_family_filter(tmp_path):
    """data.family_weights repeats each cell of a family w times per epoch; w = 0 for a
    family trains exactly like data.families without it (same cells, same order, same
    batches, bitwise the same weights); bad weights are one-line config errors (exit 2)."""
    from hpc.train import DatasetCells
    from model.data import DataConfig, ShardedDataset, generate
    cfg = tiny_config(tmp_path / "tiny.yaml", steps=2, checkpoint_every=2, batch_size=2)
    d = yaml.safe_load(open(cfg))
    spec = d["data"]["generate"]
    shards = str(tmp_path / "shards")
    generate(DataConfig(**dict(spec, samples_per_family=2), shard_size=3, out_dir=shards), workers=0)

    ds = ShardedDataset(shards)
    cells = DatasetCells(ds, {"tpms": 0, "shell": 3})
    fams = [str(ds.families[cells.source_index(k)]) for k in range(len(cells))]
    assert sorted(fams) == ["lattice"] * 2 + ["shell"] * 6
    for k in range(len(cells)):
        assert (cells[k].phases == ds.cell(cells.source_index(k)).phases).all()

    def run(name, data):
        path = tmp_path / f"{name}.yaml"
        yaml.safe_dump(dict(d, data=data), open(path, "w"))
        with single_process_env():
            return hpc_train.main([str(path), "--out", str(tmp_path / name)])

    assert run("weights", {"train": shards, "family_weights": {"tpms": 0}}) == 0
    assert run("filter", {"train": shards, "families": ["lattice", "shell"]}) == 0
    a = load_checkpoint(str(tmp_path / "weights" / "cgins_tiny.pt"))["model"]
    b = load_checkpoint(str(tmp_path / "filter" / "cgins_tiny.pt"))["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert "(4 per epoch)" in yaml.safe_load(open(tmp_path / "weights" / "config.yaml"))["launch"]["cells"]
    for bad in ({"train": shards, "family_weights": {"foam": 2}},
                {"train": shards, "family_weights": {"shell": 1.5}},
                {"train": shards, "family_weights": {"shell": -1}},
                {"train": shards, "family_weights": {"tpms": 0, "lattice": 0, "shell": 0}},
                {"train": shards, "family_weights": [2, 2]},
                {"generate": spec, "family_weights": {"shell": 2}}):
        assert run("bad", bad) == hpc_train.EXIT_CONFIG, bad
    assert not os.path.exists(tmp_path / "bad" / "cgins_tiny.pt")


def test_init_from_fine_tunes_a_checkpoint_with_another_t(tmp_path):
    """--init-from starts a fresh run (step 0, its own optimizer) from another
    checkpoint's weights; t and use_pcg may differ, any other model key may not; the
    new checkpoint records where it started; a resumed run keeps resuming itself."""
    cfg = tiny_config(tmp_path / "tiny.yaml", steps=2, checkpoint_every=1)
    with single_process_env():
        assert hpc_train.main([cfg, "--out", str(tmp_path / "base")]) == 0
    base_path = str(tmp_path / "base" / "cgins_tiny.pt")
    base = load_checkpoint(base_path)
    d = yaml.safe_load(open(cfg))
    d["model"]["t"] = int(d["model"]["t"]) + 3
    cfg_t = tmp_path / "tiny_t.yaml"
    cfg_t.write_text(yaml.safe_dump(d))
    with single_process_env():
        # the weights as loaded, through the library call
        from model.network import CGINSConfig
        from model.train import TrainConfig, build_model, init_weights_from
        mc = CGINSConfig.from_dict(d["model"])
        net = build_model(mc, TrainConfig(seed=123))
        info = init_weights_from(net, base_path, mc)
        assert info["step"] == 2 and len(info["sha256"]) == 64
        for k, a in base["model"].items():
            assert torch.equal(a, net.state_dict()[k]), k
        assert hpc_train.main([str(cfg_t), "--out", str(tmp_path / "ft"), "--init-from", base_path,
                               "--steps", "1"]) == 0
        ft = load_checkpoint(str(tmp_path / "ft" / "cgins_tiny.pt"))
        assert ft["step"] == 1 and ft["model_config"]["t"] == d["model"]["t"]
        assert ft["init_from"]["path"] == base_path and ft["init_from"]["step"] == 2
        assert any(not torch.equal(a, ft["model"][k]) for k, a in base["model"].items())
        # resuming the fine-tune continues it (not a second fresh start from base)
        assert hpc_train.main([str(cfg_t), "--out", str(tmp_path / "ft"), "--init-from", base_path,
                               "--steps", "2"]) == 0
        ft2 = load_checkpoint(str(tmp_path / "ft" / "cgins_tiny.pt"))
        assert ft2["step"] == 2 and ft2["init_from"] == ft["init_from"]

        def one_step_from_base(name, **model):
            """A 1-step fresh run from base with these model keys changed; its checkpoint."""
            c = tmp_path / f"tiny_{name}.yaml"
            c.write_text(yaml.safe_dump(dict(d, model=dict(d["model"], **model))))
            assert hpc_train.main([str(c), "--out", str(tmp_path / name), "--init-from", base_path,
                                   "--steps", "1"]) == 0
            return load_checkpoint(str(tmp_path / name / "cgins_tiny.pt"))
        # wider channels: a fresh run from the function-preserving widening
        wide = one_step_from_base("wide", channels=[6, 11])
        assert wide["init_from"]["widened_from"] == list(base["model_config"]["channels"])
        assert wide["model_config"]["channels"] == [6, 11]
        # residual blocks added: a fresh run from the function-preserving deepening; a run
        # with fewer blocks than its start (deep -> the base config) is a config error
        deep = one_step_from_base("deep", res_blocks=[0, 1])
        assert deep["init_from"]["deepened_from"] == [] and deep["model_config"]["res_blocks"] == [0, 1]
        assert "res_blocks" not in base["model_config"]
        assert hpc_train.main([str(cfg_t), "--out", str(tmp_path / "shallow"), "--init-from",
                               str(tmp_path / "deep" / "cgins_tiny.pt")]) == hpc_train.EXIT_CONFIG
        # another architecture (narrower), a missing file, a non-checkpoint: one-line config errors
        d2 = dict(d, model=dict(d["model"], channels=[4, 6]))
        cfg_c = tmp_path / "tiny_c.yaml"
        cfg_c.write_text(yaml.safe_dump(d2))
        junk = tmp_path / "junk.pt"
        junk.write_bytes(b"not a checkpoint")
        for c, src in ((cfg_c, base_path), (cfg_t, str(tmp_path / "none.pt")), (cfg_t, str(junk))):
            assert hpc_train.main([str(c), "--out", str(tmp_path / "bad"), "--init-from", src]) == \
                hpc_train.EXIT_CONFIG
    r = cli(str(cfg_c), "--out", str(tmp_path / "bad2"), "--init-from", base_path)
    assert r.returncode == hpc_train.EXIT_CONFIG
    assert "differs in channels" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "bad2" / "cgins_tiny.pt")


def test_export_ships_the_weights_and_refuses_to_resume(tmp_path):
    """`python -m hpc.export_model`: the optimizer state goes, the rest stays (the same
    network function, configs, log, provenance with the source's sha256); the export
    starts runs (--init-from) but resuming it, or resuming a checkpoint of another
    architecture, is a one-line config error, not a traceback."""
    import hashlib

    from model.train import load_model
    cfg = tiny_config(tmp_path / "tiny.yaml", steps=2, checkpoint_every=1)
    with single_process_env():
        assert hpc_train.main([cfg, "--out", str(tmp_path / "run")]) == 0
    src = str(tmp_path / "run" / "cgins_tiny.pt")
    dst = str(tmp_path / "ship" / "cgins_tiny.pt")
    r = subprocess.run([sys.executable, "-m", "hpc.export_model", src, dst], cwd=ROOT, env=clean_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    a, b = load_checkpoint(src), load_checkpoint(dst)
    assert "optimizer" in a and "optimizer" not in b
    assert os.path.getsize(dst) < 0.6 * os.path.getsize(src)
    assert b["exported_from"] == {"sha256": hashlib.sha256(open(src, "rb").read()).hexdigest(), "step": 2,
                                  "dropped": ["optimizer"]}
    for k in ("step", "model_config", "train_config", "loss_config", "log"):
        assert b[k] == a[k], k
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    na, nb = load_model(src), load_model(dst)
    assert nb.sha256 == hashlib.sha256(open(dst, "rb").read()).hexdigest() != na.sha256
    # resuming the export: refused in one line, nothing written
    run2 = tmp_path / "ship"
    rr = cli(cfg, "--out", str(run2), "--steps", "3")
    assert rr.returncode == hpc_train.EXIT_CONFIG
    assert "holds weights only" in rr.stderr and "--init-from" in rr.stderr and "Traceback" not in rr.stderr
    assert load_checkpoint(dst)["step"] == 2
    # ... but it starts a run, and the run records the export's sha256
    with single_process_env():
        assert hpc_train.main([cfg, "--out", str(tmp_path / "ft"), "--init-from", dst, "--steps", "1"]) == 0
    assert load_checkpoint(str(tmp_path / "ft" / "cgins_tiny.pt"))["init_from"]["sha256"] == nb.sha256
    # resuming a checkpoint of another architecture: one line, not a traceback
    d = yaml.safe_load(open(cfg))
    d["model"]["channels"] = [6, 11]
    cfg_w = tmp_path / "tiny_w.yaml"
    cfg_w.write_text(yaml.safe_dump(d))
    rw = cli(str(cfg_w), "--out", str(tmp_path / "run"))
    assert rw.returncode == hpc_train.EXIT_CONFIG
    assert "has another model config (differs in channels)" in rw.stderr and "Traceback" not in rw.stderr
    # bad input to the export: one line, exit 2, nothing written
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    for args in ((str(junk), str(tmp_path / "x.pt")), (src, src), (str(tmp_path / "none.pt"), str(tmp_path / "y.pt"))):
        re_ = subprocess.run([sys.executable, "-m", "hpc.export_model", *args], cwd=ROOT, env=clean_env(),
                             capture_output=True, text=True, timeout=120)
        assert re_.returncode == 2 and len(re_.stderr.strip().splitlines()) == 1, re_.stderr
    assert not os.path.exists(tmp_path / "x.pt") and not os.path.exists(tmp_path / "y.pt")
