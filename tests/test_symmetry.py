"""Symmetrized CGINS start (model/symmetry.py).

Oracles: the solver's own solution of every transformed cell, pulled back, equals the
solution of the original cell (the cell problem's equivariance; exact maps); one
symmetry is the plain forward pass; the averaged start's energy is at most the mean of
its members' (convexity); the CLIs keep the solver's answer and refuse bad counts.
"""
import numpy as np
import pytest
import torch

from microstructures.cell import Cell
from microstructures.io import write_cell
from model.network import embedded_steps
from model.symmetry import (IDENTITY, case_map, grid_symmetries, pull_back, symmetrized_output,
                            symmetrized_start, transform_operator)
from model.train import cell_operator
from solver.homogenize import _default_preconditioner
from solver.pcg import pcg

torch.set_num_threads(1)
F64 = torch.float64


def _cell(shape=(8, 8, 8), seed=0):
    ph = (np.random.default_rng(seed).random(shape) < 0.6).astype(np.uint8)
    return Cell(ph, [0.0, 1.0], [0.3, 0.3])


def _solve(op):
    x, info = pcg(op, op.rhs(), precond=_default_preconditioner(op, "multigrid"), rtol=1e-11)
    assert info.all_converged
    return x


def test_grid_symmetries():
    gs = grid_symmetries((8, 8, 8), (0.125,) * 3)
    assert len(gs) == 48 == len(set(gs)) and gs[0] == IDENTITY
    assert gs == grid_symmetries((8, 8, 8), (0.125,) * 3)               # a fixed order
    assert len(grid_symmetries((8, 8, 4), (0.125, 0.125, 0.25))) == 16   # swap x, y; reflections
    assert len(grid_symmetries((8, 8, 8), (0.1, 0.2, 0.3))) == 8         # reflections only
    for g in gs:                                                         # signed permutations of the cases
        cm = case_map(g)
        assert sorted(m for m, _ in cm) == list(range(6)) and all(abs(s) == 1 for _, s in cm)


@pytest.mark.parametrize("shape", [(8, 8, 8), (8, 8, 4)])
def test_pulled_back_solutions_of_transformed_cells_are_the_solution(shape):
    op = cell_operator(_cell(shape), F64)
    x = _solve(op)
    for g in grid_symmetries(op.lam.shape, op.h):
        opg = transform_operator(op, g)
        xb = pull_back(_solve(opg), g)
        assert float((xb - x).norm() / x.norm()) < 1e-8, g
        assert float((op.chom(xb) - op.chom(x)).norm() / op.chom(x).norm()) < 1e-10, g


def _net():
    from model.network import CGINS, CGINSConfig
    torch.manual_seed(0)
    return CGINS(CGINSConfig(channels=(4, 6, 8), fourier_freqs=1, t=3)).to(F64).eval()


def test_one_symmetry_is_the_forward_pass_and_averaging_lowers_the_energy():
    net = _net()
    op = cell_operator(_cell(seed=1), F64)
    with torch.no_grad():
        assert torch.allclose(symmetrized_output(net, op, 1), net([op]).u[0], rtol=0, atol=1e-12)
    f = op.rhs()

    def energy(u):
        return float((0.5 * op.dot(u, op.apply(u)) - op.dot(f, u)).sum())

    gs = grid_symmetries(op.lam.shape, op.h)
    with torch.no_grad(), embedded_steps(net, 0):
        members = [net([op]).u_net[0]] + [pull_back(net([transform_operator(op, g)]).u_net[0], g)
                                          for g in gs[1:8]]
    avg = symmetrized_start(net, op, 8)
    assert torch.allclose(avg, sum(members) / 8, atol=1e-12)
    assert energy(avg) <= np.mean([energy(m) for m in members]) + 1e-12
    assert float(avg.mean(dim=(-3, -2, -1)).abs().max()) < 1e-12       # still mean-free
    with pytest.raises(ValueError, match="point symmetries"):
        symmetrized_start(net, op, len(gs) + 1)


def test_cli_symmetries_keep_the_answer_and_are_recorded(tmp_path, capsys):
    from hpc.homogenize import EXIT_INPUT, EXIT_OK, main
    from hpc.results import read_result
    from microstructures.generators.minimal_surfaces import tpms
    p = str(tmp_path / "g.h5")
    write_cell(tpms("G", "sheet", vf=0.3, n=16), p)
    assert main([p, "-q", "--rtol", "1e-8", "-o", str(tmp_path / "mg.h5")]) == EXIT_OK
    assert main([p, "-q", "--rtol", "1e-8", "--solver", "cgins", "--symmetries", "4",
                 "-o", str(tmp_path / "nn.h5")]) == EXIT_OK
    mg, nn = read_result(str(tmp_path / "mg.h5")), read_result(str(tmp_path / "nn.h5"))
    assert np.linalg.norm(nn["C"] - mg["C"]) <= 1e-6 * np.linalg.norm(mg["C"])
    assert int(nn["attrs"]["model_symmetries"]) == 4
    capsys.readouterr()
    for flags, needle in ((["--symmetries", "2"], "needs --solver cgins"),
                          (["--solver", "cgins", "--symmetries", "0"], "1..48"),
                          (["--solver", "cgins", "--symmetries", "49"], "1..48")):
        assert main([p, "-q", "-o", str(tmp_path / "x.h5")] + flags) == EXIT_INPUT
        assert needle in capsys.readouterr().err
    q = str(tmp_path / "flat.h5")
    write_cell(Cell(np.zeros((16, 16, 8), np.uint8), [1.0], [0.3], size=(1.0, 1.0, 0.5)), q)
    assert main([q, "-q", "--solver", "cgins", "--symmetries", "17", "-o", str(tmp_path / "y.h5")]) == EXIT_INPUT
    assert "has 16 point symmetries" in capsys.readouterr().err
