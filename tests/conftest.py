"""Test configuration.

Triton runs on CPU only through its interpreter, which must be switched on
before any ``@triton.jit`` function is defined, i.e. before ``jit_kernels`` is
imported. Triton kernels are therefore tested through the interpreter on
CPU-only machines; on a GPU machine export TRITON_INTERPRET=0 to test them
compiled.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
