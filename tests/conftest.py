import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

# Under pytest-xdist (scripts/test.sh runs 2 workers) each worker gets one thread, so the two
# workers do not fight over the 2 cores.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))
warnings.filterwarnings("ignore", message="no OmniKV preset for this model")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of step-by-step decoding on tiny models (OpenMP spinning on a
    loaded machine costs far more than it gains there); restored afterwards. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def models():
    """Cache of tiny random models by (family, overrides)."""
    from _tiny import cached_tiny_model

    return cached_tiny_model
