"""The CUDA code path against the CPU one (DESIGN.md: one numerical code path).

Everything here needs a CUDA device and is skipped, with that reason, where there is
none (CI has no GPU; CUDA is optional, the CPU path is the required one). On a GPU
machine run ``pytest tests/test_cuda.py``; bench/gpu_session.sh does, and
BENCHMARKS.md ("GPU session") records the run.

Oracles: the same computation on the CPU in float64 (operator, multigrid PCG, network
forward and backward, embedded PCG, energy loss, training steps), the laminate's closed
form, and the CLI's C^H on the CPU.
"""
import os

import numpy as np
import pytest
import torch

from microstructures.cell import Cell
from microstructures.io import write_cell
from test_model_network import gyroid_phases as _gyroid

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

F64 = torch.float64


def _rel(a, b):
    a, b = torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu()
    return float((a - b).norm() / b.norm())


def _op(phases, device, nu=0.3, dtype=F64):
    from solver.operator import ElasticityOperator
    n = phases.shape
    return ElasticityOperator.from_phases(phases, [0.0, 1.0], [nu, nu], tuple(1.0 / s for s in n),
                                          dtype=dtype, device=device)


def test_operator_and_multigrid_pcg_match_the_cpu():
    from solver.homogenize import _default_preconditioner
    from solver.pcg import pcg
    ph = _gyroid(16)
    res = {}
    for dev in ("cpu", "cuda"):
        op = _op(ph, dev)
        u = torch.randn(6, 3, 16, 16, 16, dtype=F64, generator=torch.Generator().manual_seed(0)).to(dev)
        y = op.apply(u)
        x, info = pcg(op, op.rhs(), precond=_default_preconditioner(op, "multigrid"), rtol=1e-10)
        assert info.all_converged
        res[dev] = (y, op.chom(x), info)
    assert _rel(res["cuda"][0], res["cpu"][0]) < 1e-12
    assert _rel(res["cuda"][1], res["cpu"][1]) < 1e-9
    # the same preconditioner: the iteration counts agree to within round-off's reach
    it_cpu, it_gpu = np.asarray(res["cpu"][2].iterations), np.asarray(res["cuda"][2].iterations)
    assert np.abs(it_cpu - it_gpu).max() <= 1


def _small_net(seed=0):
    from model.network import CGINS, CGINSConfig
    torch.manual_seed(seed)
    return CGINS(CGINSConfig(channels=(4, 6, 8), fourier_freqs=1, t=4)).to(F64)


def test_network_embedded_pcg_and_loss_match_the_cpu_forward_and_backward():
    from model.loss import LossConfig, cgins_loss
    ph = _gyroid(16)
    out = {}
    for dev in ("cpu", "cuda"):
        net = _small_net().to(dev)
        op = _op(ph, dev, nu=0.27)
        pred = net([op])
        loss, _ = cgins_loss([op], pred, LossConfig(level_weights=(1.0, 0.5, 0.25)))
        loss.backward()
        grads = [p.grad.detach().cpu().clone() for p in net.parameters()]
        out[dev] = (pred.u[0].detach(), float(loss.detach()), grads)
    assert _rel(out["cuda"][0], out["cpu"][0]) < 1e-9      # t = 4 PCG steps amplify round-off
    # mean-free on the GPU too
    assert float(out["cuda"][0].mean(dim=(-3, -2, -1)).abs().max()) < 1e-12
    assert out["cuda"][1] == pytest.approx(out["cpu"][1], rel=1e-10)
    # against the whole gradient's norm: some parameters' exact gradient is zero (a bias
    # whose shift the mean constraint removes) and both devices give round-off (1e-17) there
    scale = float(torch.cat([g.flatten() for g in out["cpu"][2]]).norm())
    for gg, gc in zip(out["cuda"][2], out["cpu"][2]):
        assert float((gg - gc).norm()) <= 1e-8 * scale


def test_float32_start_on_cuda_stays_close_to_the_cpu_start():
    """The shipped models run in float32. The start is compared in the energy norm and
    through C^H: the soft voxels' displacements are all but free (E x 1e-6) and the
    embedded Jacobi-PCG steps move them by round-off times 1/E_soft, so the raw fields
    of two float32 runs differ by percents where nothing depends on them (the CPU's
    float32 and float64 starts do too: 0.6% raw, 1e-5 in the energy norm, 3e-9 in C^H)."""
    from model.train import cell_operator, load_model, warm_start
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "models", "cgins_default.pt")
    cell = Cell(_gyroid(32), [0.0, 1.0], [0.3, 0.3])
    u = {}
    for dev in ("cpu", "cuda"):
        net = load_model(path, dev)
        u[dev] = warm_start(net, cell_operator(cell, torch.float32, dev)).double().cpu()
    op = cell_operator(cell, F64)
    d = u["cuda"] - u["cpu"]
    assert float(((op.apply(d) * d).sum() / (op.apply(u["cpu"]) * u["cpu"]).sum()).sqrt()) < 1e-3
    assert _rel(op.chom(u["cuda"]), op.chom(u["cpu"])) < 1e-6


def test_float32_multigrid_pcg_on_cuda_is_ieee_float32():
    """With cuDNN's default TF32 the float32 operator and multigrid lost precision: the
    true residual stalled near 1e-2 and the iterations grew with n (solver/ieee.py).
    Now the float32 solve on the GPU takes the CPU's iterations (to one) and meets the
    tolerance in the true residual, and the caller's TF32 flag is left as it was."""
    from solver.homogenize import _default_preconditioner
    from solver.pcg import pcg
    ph = _gyroid(32, level=0.4)
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True             # PyTorch's default: the case that failed
    try:
        res = {}
        for dev in ("cpu", "cuda"):
            op = _op(ph, dev, dtype=torch.float32)
            f = op.rhs()
            x, info = pcg(op, f, precond=_default_preconditioner(op, "multigrid"), rtol=1e-6)
            assert info.all_converged
            true_res = (f - op.apply(x)).flatten(1).norm(dim=1) / f.flatten(1).norm(dim=1)
            res[dev] = (np.asarray(info.iterations), float(true_res.max()))
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32 = before
    assert np.abs(res["cuda"][0] - res["cpu"][0]).max() <= 1
    assert res["cuda"][1] < 1e-5 and res["cpu"][1] < 1e-5


def test_training_steps_on_cuda_follow_the_cpu_steps(tmp_path):
    """Two optimizer steps of the same float64 model on the same cells: the weights
    agree with the CPU run's to round-off (same seed, batch order and lr schedule)."""
    from model.loss import LossConfig
    from model.network import CGINSConfig
    from model.train import TrainConfig, build_model, train
    cells = [Cell(_gyroid(8, shift=s), [0.0, 1.0], [0.25, 0.25 + 0.05 * s]) for s in range(3)]
    w = {}
    for dev in ("cpu", "cuda"):
        mc = CGINSConfig(channels=(4, 6), levels=2, t=2, fourier_freqs=1)
        tc = TrainConfig(seed=7, steps=2, batch_size=2, lr=3e-3, checkpoint=str(tmp_path / dev / "ck.pt"),
                         checkpoint_every=2, device=dev, model_dtype="float64", solver_dtype="float64")
        net = build_model(mc, tc)
        train(net, cells, mc, tc, LossConfig(level_weights=(1.0, 0.5)))
        w[dev] = [p.detach().cpu() for p in net.parameters()]
    for a, b in zip(w["cuda"], w["cpu"]):
        assert _rel(a, b) < 1e-8


@pytest.mark.parametrize("extra", [[], ["--preconditioner", "jacobi"], ["--precision", "float32"]])
def test_cli_on_cuda_reaches_the_laminate_closed_form(extra, tmp_path):
    from hpc.homogenize import EXIT_OK, main
    from hpc.results import read_result
    from solver import isotropic_voigt
    from test_solver import laminate_closed_form
    ph = np.zeros((8, 4, 4), np.uint8)
    ph[4:] = 1
    p = str(tmp_path / "lam.h5")
    write_cell(Cell(ph, [1.0, 10.0], [0.3, 0.3]), p)
    f32 = "float32" in extra
    assert main([p, "-q", "--device", "cuda", "--rtol", "1e-7" if f32 else "1e-10",
                 "-o", str(tmp_path / "r.h5")] + extra) == EXIT_OK
    r = read_result(str(tmp_path / "r.h5"))
    ref = laminate_closed_form(isotropic_voigt(1.0, 0.3), isotropic_voigt(10.0, 0.3), 0.5)
    assert np.abs(r["C"] - ref).max() <= (1e-5 if f32 else 1e-8) * np.abs(ref).max()
    assert "cuda" in str(r["attrs"]["devices"])


def test_cgins_cli_on_cuda_keeps_the_cpu_answer(tmp_path):
    from hpc.homogenize import EXIT_OK, main
    from hpc.results import read_result
    from microstructures.generators.minimal_surfaces import tpms
    p = str(tmp_path / "g.h5")
    write_cell(tpms("G", "sheet", vf=0.3, n=16), p)
    assert main([p, "-q", "--rtol", "1e-8", "-o", str(tmp_path / "cpu.h5")]) == EXIT_OK
    assert main([p, "-q", "--rtol", "1e-8", "--device", "cuda", "--solver", "cgins", "--baseline",
                 "-o", str(tmp_path / "gpu.h5")]) == EXIT_OK
    cpu, gpu = read_result(str(tmp_path / "cpu.h5")), read_result(str(tmp_path / "gpu.h5"))
    assert np.linalg.norm(gpu["C"] - cpu["C"]) <= 1e-6 * np.linalg.norm(cpu["C"])
    a = gpu["attrs"]
    assert a["solver"] == "cgins+pcg" and a["time_inference"] > 0 and bool(a["zero_start_converged"])
