import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter: that is how CI proves them.
# Must be set before nnclr_fast.kernels is imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Strict: a fused kernel that cannot run is an error here, not a silent fallback to the PyTorch
# path (the tests of the fallback unset it).
os.environ.setdefault("NNCLR_FAST_STRICT", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
