import os

import numpy as np
import pytest
import torch

# Two cores shared between the test process and the mpirun children.
torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", "1")))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long runs, only with RUN_SLOW=1 (bench/ has the big ones)")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A single-node local Slurm (tests/slurm_local.py), one per test module."""
    from slurm_local import LocalSlurm
    s = LocalSlurm(str(tmp_path_factory.mktemp("slurm")))
    s.start()
    yield s
    s.stop()
