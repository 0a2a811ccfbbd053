"""Training loop: resuming from a checkpoint gives the same weights as an
uninterrupted run; checkpoints are atomic and load with weights_only=True."""
import os

import numpy as np
import pytest
import torch

from microstructures.cell import Cell
from model.loss import LossConfig
from model.network import CGINSConfig
from model.train import TrainConfig, batch_indices, build_model, load_checkpoint, train

torch.set_num_threads(1)


def _cells(n=8, count=3):
    out = []
    x = (np.arange(n) + 0.5) / n
    X, Y, Z = np.meshgrid(x, x, x, indexing="ij")
    for s in range(count):
        t = 2 * np.pi
        v = np.sin(t * X + s) * np.cos(t * Y) + np.sin(t * Y) * np.cos(t * Z) + np.sin(t * Z) * np.cos(t * X)
        out.append(Cell(phases=(np.abs(v) < 0.7).astype(np.uint8), E=[0.0, 1.0], nu=[0.25, 0.25 + 0.05 * s]))
    return out


def _cfgs(tmp_path, name):
    mc = CGINSConfig(channels=(4, 6), levels=2, t=2, fourier_freqs=1)
    tc = TrainConfig(seed=7, steps=6, batch_size=2, lr=3e-3, checkpoint=str(tmp_path / name / "ck.pt"),
                     checkpoint_every=2)
    return mc, tc


def test_batches_are_a_function_of_seed_and_step():
    a = [batch_indices(5, 2, s, 3) for s in range(6)]
    b = [batch_indices(5, 2, s, 3) for s in range(6)]
    assert a == b
    assert sorted(a[0] + a[1]) == sorted(set(a[0] + a[1]))    # no repeats inside an epoch


def test_resume_gives_same_weights_as_uninterrupted_run(tmp_path):
    cells = _cells()
    lc = LossConfig(level_weights=(1.0, 0.5))
    mc, tc = _cfgs(tmp_path, "full")
    full = build_model(mc, tc)
    train(full, cells, mc, tc, lc)
    # interrupted after 3 steps (last checkpoint at step 2), then resumed by a fresh process
    mc2, tc2 = _cfgs(tmp_path, "cut")
    cut = build_model(mc2, tc2)
    train(cut, cells, mc2, tc2, lc, stop_after=3)
    assert load_checkpoint(tc2.checkpoint)["step"] == 2
    resumed = build_model(mc2, tc2)
    torch.manual_seed(12345)                     # resuming must not depend on the global RNG
    train(resumed, cells, mc2, tc2, lc)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    ck = load_checkpoint(tc2.checkpoint)
    assert ck["step"] == 6 and len(ck["log"]) == 6
    assert not [f for f in os.listdir(os.path.dirname(tc2.checkpoint)) if f.startswith(".tmp-")]


@pytest.mark.parametrize("bad", [-1, 2.5, True, "8"])
def test_operator_cache_size_must_be_a_whole_number(bad):
    with pytest.raises(ValueError, match="operator_cache"):
        TrainConfig.from_dict({"operator_cache": bad})


def test_operator_cache_is_bounded_and_never_changes_the_weights(tmp_path, monkeypatch):
    """train() keeps at most train.operator_cache assembled operators (least recently used
    out): 5 cells drawn 12 times assemble 5 operators with room for all, 12 with none, and
    with room for 1 no more than that one plus the step's batch is alive after a step. The
    weights after 6 steps are bit-identical whatever the bound."""
    import gc
    import weakref

    import model.train as mt
    cells = _cells(count=5)
    lc = LossConfig(level_weights=(1.0, 0.5))
    made, peak, states = {}, {}, {}
    assemble = mt.cell_operator
    for size in (100, 0, 1):
        refs = []

        def counting(cell, *a, _refs=refs, **k):
            op = assemble(cell, *a, **k)
            _refs.append(weakref.ref(op))
            return op
        monkeypatch.setattr(mt, "cell_operator", counting)
        alive = []

        def after_step(step, row, _refs=refs, _alive=alive):
            gc.collect()
            _alive.append(sum(r() is not None for r in _refs))
        mc, tc = _cfgs(tmp_path, f"cache{size}")
        tc.operator_cache = size
        net = build_model(mc, tc)
        train(net, cells, mc, tc, lc, progress=after_step)
        made[size], peak[size], states[size] = len(refs), max(alive), net.state_dict()
    assert made[100] == 5 and made[0] == 12 and 5 < made[1] <= 12
    assert peak[100] == 5 and peak[1] <= 1 + 2
    for size in (0, 1):
        for k, v in states[100].items():
            assert torch.equal(v, states[size][k]), (size, k)


def test_checkpoints_and_results_get_the_mode_of_an_ordinary_file(tmp_path):
    """mkstemp makes 0600; a checkpoint or result shared on a cluster must be readable as
    any file written with open() is (0666 less the umask)."""
    from model.train import save_checkpoint
    from hpc.results import _atomic_path
    umask = os.umask(0o022)
    try:
        ck = str(tmp_path / "ck.pt")
        save_checkpoint(ck, {"w": torch.zeros(2)})
        assert os.stat(ck).st_mode & 0o777 == 0o644
        tmp = _atomic_path(str(tmp_path / "r.h5"))
        assert os.stat(tmp).st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)
    assert torch.equal(load_checkpoint(ck)["w"], torch.zeros(2))


def test_shipped_configs_parse():
    from model.train import load_config
    here = os.path.join(os.path.dirname(__file__), "..", "configs")
    names = sorted(f for f in os.listdir(here) if f.startswith("cgins_") and f.endswith(".yaml"))
    assert names, "no configs/cgins_*.yaml"
    for f in names:
        mc, lc, tc, _ = load_config(os.path.join(here, f))
        assert len(lc.level_weights) >= mc.levels


def test_load_model_and_warm_start_keep_the_solver_answer(tmp_path):
    from model.train import cell_operator, load_model, warm_start
    from solver.pcg import pcg
    cells = _cells()
    mc, tc = _cfgs(tmp_path, "ws")
    tc.steps = 2
    net = build_model(mc, tc)
    train(net, cells, mc, tc)
    loaded = load_model(tc.checkpoint)
    assert len(loaded.sha256) == 64
    for a, b in zip(net.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    op = cell_operator(cells[0])
    x0 = warm_start(loaded, op)
    x_ws, info_ws = pcg(op, op.rhs(), x0=x0, rtol=1e-10)
    x_0, info_0 = pcg(op, op.rhs(), rtol=1e-10)
    assert info_ws.all_converged and info_0.all_converged
    C_ws, C_0 = op.chom(x_ws), op.chom(x_0)
    assert float((C_ws - C_0).norm() / C_0.norm()) < 1e-9


def test_shipped_fine_tuned_model_records_the_shipped_default():
    """models/cgins_t10 was fine-tuned from models/cgins_default.pt (train.init_from):
    its checkpoint names that file with its sha256, and the two model configs differ
    only in the embedded PCG steps. Fails when one of them is replaced without the
    other (then re-run configs/cgins_finetune_t10.yaml)."""
    import hashlib

    from model.train import WEIGHTLESS_KEYS, load_model
    root = os.path.join(os.path.dirname(__file__), "..")
    base, ft = os.path.join(root, "models", "cgins_default.pt"), os.path.join(root, "models", "cgins_t10", "cgins_t10.pt")
    ck_b, ck_f = load_checkpoint(base), load_checkpoint(ft)
    with open(base, "rb") as fh:
        assert ck_f["init_from"]["sha256"] == hashlib.sha256(fh.read()).hexdigest()
    assert ck_f["init_from"]["step"] == ck_b["step"]
    diff = {k for k in ck_b["model_config"] if ck_b["model_config"][k] != ck_f["model_config"][k]}
    assert diff <= set(WEIGHTLESS_KEYS) and ck_f["model_config"]["t"] == 10
    assert load_model(ft).cfg.t == 10


def _shipped_pair(name, base_name):
    """(start checkpoint, shipped checkpoint, shipped path) of models/<name>, trained on from
    models/<base_name>; asserts the shipped one names its start by that file's sha256."""
    import hashlib
    root = os.path.join(os.path.dirname(__file__), "..")
    base = os.path.join(root, "models", base_name, base_name + ".pt")
    path = os.path.join(root, "models", name, name + ".pt")
    ck_b, ck = load_checkpoint(base), load_checkpoint(path)
    with open(base, "rb") as fh:
        assert ck["init_from"]["sha256"] == hashlib.sha256(fh.read()).hexdigest()
    return ck_b, ck, path


@pytest.mark.parametrize("name,channels,base_name,base_channels", [
    ("cgins_wide16_t10", (16, 32, 64), "cgins_t10", [8, 16, 32]),
    ("cgins_wide32_t10", (32, 64, 128), "cgins_t10", [8, 16, 32])])
def test_shipped_widened_model_records_its_narrow_start(name, channels, base_name, base_channels):
    """models/cgins_wide*_t10 started from the function-preserving widening of a
    narrower shipped model (train.init_from into wider channels): each checkpoint names
    that file with its sha256 and the channels it widened, and the two model configs
    differ only in the channels. Fails when one is replaced without the other (then
    re-run configs/<name>.yaml)."""
    from model.train import WEIGHTLESS_KEYS, load_model
    ck_b, ck_w, wide = _shipped_pair(name, base_name)
    assert ck_w["init_from"]["widened_from"] == list(ck_b["model_config"]["channels"]) == base_channels
    diff = {k for k in ck_b["model_config"] if ck_b["model_config"][k] != ck_w["model_config"][k]}
    assert diff - set(WEIGHTLESS_KEYS) == {"channels"}
    assert load_model(wide).cfg.channels == channels and ck_w["model_config"]["t"] == 10


@pytest.mark.parametrize("name,base_name,steps", [("cgins_wide32_long_t10", "cgins_wide32_t10", 1500),
                                                   ("cgins_wide32_more_t10", "cgins_wide32_long_t10", 900),
                                                   ("cgins_wide32_more2_t10", "cgins_wide32_more_t10", 800),
                                                   ("cgins_wide32_more3_t10", "cgins_wide32_more2_t10", 700),
                                                   ("cgins_wide32_more4lo_t10", "cgins_wide32_more3_t10", 600),
                                                   ("cgins_wide32_deep4_mix3_t10", "cgins_wide32_deep4_mix_t10", 900),
                                                   ("cgins_wide32_deep28_mix5_t10", "cgins_wide32_deep28_mix4_t10", 560),
                                                   ("cgins_wide32_deep28_mix6_t10", "cgins_wide32_deep28_mix5_t10", 400),
                                                   ("cgins_wide32_deep28_mix7_t10", "cgins_wide32_deep28_mix6_t10", 400),
                                                   ("cgins_wide32_deep28_mix8_t10", "cgins_wide32_deep28_mix7_t10", 400),
                                                   ("cgins_wide32_deep28_mix9_t10", "cgins_wide32_deep28_mix8_t10", 400),
                                                   ("cgins_wide32_deep28_mix10_t10", "cgins_wide32_deep28_mix9_t10", 400),
                                                   ("cgins_wide32_deep28_mix11_t10", "cgins_wide32_deep28_mix10_t10", 400)])
def test_shipped_long_model_records_its_start_and_its_export(name, base_name, steps):
    """models/cgins_wide32_long_t10 trained models/cgins_wide32_t10 on, cgins_wide32_more_t10
    trained that one on, cgins_wide32_more2_t10 that one, cgins_wide32_more3_t10 that one and
    cgins_wide32_more4lo_t10 that one, cgins_wide32_deep4_mix3_t10 trained cgins_wide32_deep4_mix_t10 on,
    cgins_wide32_deep28_mix5_t10 trained cgins_wide32_deep28_mix4_t10 on, cgins_wide32_deep28_mix6_t10
    that one, cgins_wide32_deep28_mix7_t10 that one, cgins_wide32_deep28_mix8_t10 that one,
    cgins_wide32_deep28_mix9_t10 that one, cgins_wide32_deep28_mix10_t10 that one and
    cgins_wide32_deep28_mix11_t10 that one
    (train.init_from, the same model config); all ship as exports
    (hpc.export_model: no optimizer state): each names its start with that file's sha256
    and its exported source, and loads."""
    from model.train import load_model
    ck_b, ck, path = _shipped_pair(name, base_name)
    assert ck["init_from"]["step"] == ck_b["step"] and "widened_from" not in ck["init_from"]
    assert ck["model_config"] == ck_b["model_config"]
    assert "optimizer" not in ck and ck["exported_from"]["step"] == ck["step"] == len(ck["log"]) == steps
    net = load_model(path)
    assert net.cfg.channels == (32, 64, 128) and net.cfg.res_blocks == tuple(ck_b["model_config"].get("res_blocks", ()))


@pytest.mark.parametrize("name,base_name,blocks_from,blocks,steps", [
    ("cgins_wide32_deep28_mix4_t10", "cgins_wide32_deep4_mix3_t10", [0, 0, 4], [0, 2, 8], 650)])
def test_shipped_model_deepened_from_a_shipped_one(name, base_name, blocks_from, blocks, steps):
    """models/cgins_wide32_deep28_mix4_t10 (session 22) is cgins_wide32_deep4_mix3_t10 with
    residual blocks added (train.init_from into more res_blocks, the new ones starting as the
    identity) and trained on: the export names its start by sha256 and the blocks it had, the
    two model configs differ only in res_blocks, its config file describes it, and it loads
    with its blocks."""
    from model.train import WEIGHTLESS_KEYS, load_config, load_model
    ck_b, ck, path = _shipped_pair(name, base_name)
    assert ck_b["model_config"]["res_blocks"] == ck["init_from"]["deepened_from"] == blocks_from
    diff = {k for k in ck_b["model_config"] if ck_b["model_config"][k] != ck["model_config"][k]}
    assert diff - set(WEIGHTLESS_KEYS) == {"res_blocks"} and ck["model_config"]["res_blocks"] == blocks
    assert "optimizer" not in ck and ck["exported_from"]["step"] == ck["step"] == len(ck["log"]) == steps
    root = os.path.join(os.path.dirname(__file__), "..")
    mc, _, _, _ = load_config(os.path.join(root, "configs", name + ".yaml"))
    assert mc.to_dict() == ck["model_config"]
    net = load_model(path)
    assert net.cfg.res_blocks == tuple(blocks) and ck["model_config"]["t"] == 10
    assert [len(r) for r in net.res] == blocks


def test_shipped_deepened_model_records_its_two_runs():
    """models/cgins_wide32_deep4_mix_t10 (session 20): cgins_wide32_more4lo_t10 deepened with
    4 residual blocks on the 8^3 level and fine-tuned on random-graph lattices
    (configs/cgins_probe_fit1024_deep4_t10.yaml, whose log ships next to it as
    probe_deep4.csv / probe_deep4_train.log), then on all three families
    (configs/cgins_wide32_deep4_mix_t10.yaml). The export names the probe run's checkpoint
    and step, both configs describe the shipped network, the probe log records its start
    from the shipped more4lo file (by sha256) and the deepening, and the network loads
    with its blocks."""
    import csv
    import hashlib

    from model.train import load_config, load_model
    root = os.path.join(os.path.dirname(__file__), "..")
    d = os.path.join(root, "models", "cgins_wide32_deep4_mix_t10")
    path = os.path.join(d, "cgins_wide32_deep4_mix_t10.pt")
    ck = load_checkpoint(path)
    assert "optimizer" not in ck and ck["exported_from"]["step"] == ck["step"] == len(ck["log"]) == 600
    assert ck["model_config"]["res_blocks"] == [0, 0, 4] and ck["model_config"]["channels"] == [32, 64, 128]
    assert ck["init_from"]["path"].endswith("cgins_probe_fit1024_deep4_t10.pt") and ck["init_from"]["step"] == 600
    assert "deepened_from" not in ck["init_from"]                 # the probe already had the blocks
    for name in ("cgins_probe_fit1024_deep4_t10.yaml", "cgins_wide32_deep4_mix_t10.yaml"):
        mc, _, _, _ = load_config(os.path.join(root, "configs", name))
        assert mc.to_dict() == ck["model_config"], name
    base = os.path.join(root, "models", "cgins_wide32_more4lo_t10", "cgins_wide32_more4lo_t10.pt")
    with open(base, "rb") as fh:
        sha = hashlib.sha256(fh.read()).hexdigest()
    with open(os.path.join(d, "probe_deep4_train.log")) as fh:
        log = fh.read()
    assert f"sha256 {sha[:12]}) deepened from res_blocks none to [0, 0, 4]" in log
    with open(os.path.join(d, "probe_deep4.csv")) as fh:
        assert len(list(csv.DictReader(fh))) == 600
    net = load_model(path)
    assert [len(r) for r in net.res] == [0, 0, 4] and net.cfg.t == 10


def _check_shipped_finetune(name, base, steps, device):
    """The export models/<name>/<name>.pt of configs/<name>.yaml: no optimizer state, ``steps``
    logged steps (checkpoint and csv), the sha256 of the shipped ``base`` (models/<base>/<base>.pt)
    as its start, the config's model section and recipe, trained on ``device`` (a prefix).
    Returns the model directory."""
    import csv
    import hashlib

    from model.train import load_config, load_model
    root = os.path.join(os.path.dirname(__file__), "..")
    d = os.path.join(root, "models", name)
    path = os.path.join(d, f"{name}.pt")
    ck = load_checkpoint(path)
    assert "optimizer" not in ck and ck["exported_from"]["step"] == ck["step"] == len(ck["log"]) == steps
    with open(os.path.join(root, "models", base, f"{base}.pt"), "rb") as fh:
        assert ck["init_from"]["sha256"] == hashlib.sha256(fh.read()).hexdigest()
    mc, _, tc, _ = load_config(os.path.join(root, "configs", f"{name}.yaml"))
    assert mc.to_dict() == ck["model_config"]
    rec = ck["train_config"]
    assert (rec["steps"], rec["batch_size"], rec["lr"], rec["seed"]) == (tc.steps, tc.batch_size, tc.lr, tc.seed)
    assert rec["device"].startswith(device) and rec["init_from"] == tc.init_from
    with open(os.path.join(d, f"{name}.csv")) as fh:
        assert len(list(csv.DictReader(fh))) == steps
    net = load_model(path)
    assert net.cfg.t == 10 and [len(r) for r in net.res] == [0, 2, 8]
    return d


def test_shipped_gpu_model_records_its_start_and_recipe():
    """models/cgins_gpu_ft2_mix11_t10 (session 31): mix11 fine-tuned on one H200 with
    configs/cgins_gpu_ft2_mix11_t10.yaml, 300 steps of 32 cells. The export records mix11
    (path and sha256 of the shipped file) as its start, the config's recipe, the device it
    trained on and its 300 logged steps; the config's model section is the network's."""
    _check_shipped_finetune("cgins_gpu_ft2_mix11_t10", "cgins_wide32_deep28_mix11_t10", 300, "cuda")


def test_shipped_cpu_ft4_model_records_its_start_and_recipe():
    """models/cgins_cpu_ft4_t10 (session 33, evaluated in session 34): the shipped GPU model
    ft2 fine-tuned on the 2-core CPU VM with configs/cgins_cpu_ft4_t10.yaml, 1500 steps of
    4 cells. The export records ft2 (path and sha256 of the shipped file) as its start, the
    config's recipe, the CPU it trained on and its 1500 logged steps; its training log names
    the data and the last step."""
    d = _check_shipped_finetune("cgins_cpu_ft4_t10", "cgins_gpu_ft2_mix11_t10", 1500, "cpu")
    with open(os.path.join(d, "train.log")) as fh:
        log = fh.read()
    assert "['data/train32', 'data/train32_shell4096j']" in log and "done: step 1500" in log


def test_shipped_cpu_ft5_model_records_its_start_and_recipe():
    """models/cgins_cpu_ft5_t10 (session 34, shipped in session 35): ft4 fine-tuned 1000 steps
    of 4 cells more on the 2-core CPU VM with configs/cgins_cpu_ft5_t10.yaml, on both sets of
    4096 extra shells. The export records ft4 (sha256 of the shipped file) as its start, the
    recipe, the CPU and its 1000 logged steps; its training log names the three data sets."""
    d = _check_shipped_finetune("cgins_cpu_ft5_t10", "cgins_cpu_ft4_t10", 1000, "cpu")
    with open(os.path.join(d, "train.log")) as fh:
        log = fh.read()
    assert ("['data/train32', 'data/train32_shell4096j', 'data/train32_shell4096i']" in log
            and "done: step 1000" in log)


def _check_shipped_on_the_shell_mix(name, base, steps, report):
    """A CPU fine-tune on the shell-heavy mix: the export records ``base`` as its start, the
    recipe, the CPU and its logged steps; its training log names the three data sets; and
    the committed held-out report ``report`` is the report of this very file (its sha256)."""
    import gzip
    import hashlib
    import json

    d = _check_shipped_finetune(name, base, steps, "cpu")
    with open(os.path.join(d, "train.log")) as fh:
        log = fh.read()
    assert ("['data/train32', 'data/train32_shell4096j', 'data/train32_shell4096i']" in log
            and f"done: step {steps}" in log)
    root = os.path.join(os.path.dirname(__file__), "..")
    with gzip.open(os.path.join(root, "bench", "results", report), "rt") as fh:
        (evaluated,) = json.load(fh)["models"]
    with open(os.path.join(d, f"{name}.pt"), "rb") as fh:
        assert evaluated["step"] == steps and evaluated["sha256"] == hashlib.sha256(fh.read()).hexdigest()


def test_shipped_cpu_ft6_model_records_its_start_and_recipe():
    """models/cgins_cpu_ft6_t10 (first run in session 35, whose checkpoint was lost; run again
    and shipped in session 36): ft5 fine-tuned 1500 steps of 4 cells more on the 2-core CPU VM
    with configs/cgins_cpu_ft6_t10.yaml, on the same shell-heavy mix; its committed held-out
    report is session 36's."""
    _check_shipped_on_the_shell_mix("cgins_cpu_ft6_t10", "cgins_cpu_ft5_t10", 1500, "eval_cpuft6_heldout32_s36.json.gz")


def test_shipped_cpu_ft7_model_records_its_start_and_recipe():
    """models/cgins_cpu_ft7_t10 (session 37): ft6 fine-tuned 1000 steps of 4 cells more on a
    2-core CPU VM with configs/cgins_cpu_ft7_t10.yaml, on the same shell-heavy mix; its
    committed held-out report is session 37's."""
    _check_shipped_on_the_shell_mix("cgins_cpu_ft7_t10", "cgins_cpu_ft6_t10", 1000, "eval_cpuft7_heldout32_s37.json.gz")
