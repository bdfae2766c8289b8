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


# The longest tests start first, so that two workers finish together instead of one waiting on a
# minutes-long test collected last (xdist hands tests out in collection order).
LONGEST_FIRST = ("test_wheel.py", "test_docs.py", "test_tutorials.py", "test_user_path.py", "test_distributed.py")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within each file is kept
