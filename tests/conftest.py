import os

import pyro
import pytest
import torch

# Tests run two workers on two cores (pytest -n 2); one thread each avoids oversubscription.
torch.set_num_threads(1)
os.environ.setdefault("PPDGM_SHORT", "1")


@pytest.fixture(autouse=True)
def fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
