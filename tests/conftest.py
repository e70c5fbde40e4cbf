"""Test set-up: CPU tests run the Triton kernels in the interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here, at the top.
On a machine with CUDA the real Triton backend runs instead (GPU tests, marker gpu).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_backend_default():
    """Each test starts with automatic backend choice."""
    import eekernels

    eekernels.set_backend(None)
    yield
    eekernels.set_backend(None)
