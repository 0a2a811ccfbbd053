# Two entry points (README): `make run` and `make test`. Both set up what is missing first.
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out
PRECOND ?= multigrid

.PHONY: setup run test bench clean

setup:
	@bash scripts/setup_env.sh

# The main job on the bundled default cell: a gyroid sheet (VF 0.2, 32^3).
run: setup
	@mkdir -p $(OUT)
	$(PY) -m microstructures tpms G --form sheet --vf 0.2 -n 32 --name default_gyroid -o $(OUT)/default_gyroid.h5
	$(PY) -m hpc.homogenize $(OUT)/default_gyroid.h5 --precision float32 --preconditioner $(PRECOND) -v

test: setup
	$(PY) -m pytest -q tests

bench: setup
	$(PY) bench/bench_jacobi.py

clean:
	rm -rf $(OUT) .pytest_cache
