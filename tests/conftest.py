import os

import numpy as np
import pytest
import torch

# Two cores shared between the test process and the mpirun children.
torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", "1")))


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
