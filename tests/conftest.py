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


@pytest.fixture(scope="session")
def models():
    """Cache of tiny random models by (family, layers)."""
    from omnikv.models.tiny import tiny_model

    store = {}

    def get(family: str = "llama", **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in store:
            store[key] = tiny_model(family, **overrides)
        return store[key]

    return get
