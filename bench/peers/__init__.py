"""Benchmark peers: one runner per solver, each run as a fresh subprocess by
bench/bench_peers.py so its peak RSS is its own.

    cellfile.py        the .npz cell file the runners read (numpy only)
    ours_runner.py     solver.homogenize (multigrid- or Jacobi-PCG)
    petsc_runner.py    solver.petsc_ref.petsc_homogenize (CG + GAMG)
    pyamg_runner.py    PyAMG smoothed aggregation + CG on solver/assembled.py's K
    mugrid_runner.py   muGrid (own venv, scripts/setup_mugrid.sh)

Every runner prints one JSON line: iterations per load case, setup/solve/total
seconds, peak RSS MB and C^H (6x6 Voigt 11,22,33,23,13,12, engineering shear).
"""
