"""Test configuration.

Triton runs on CPU only through its interpreter, which must be switched on
before any ``@triton.jit`` function is defined, i.e. before ``jit_kernels`` is
imported. On a machine without a CUDA device the Triton kernels are therefore
tested through the interpreter (TRITON_INTERPRET=1 is set here); on a CUDA
machine they are tested compiled, on CUDA tensors. An explicit TRITON_INTERPRET
in the environment (``0`` or ``1``) always wins. Only torch is imported to ask
for a device: jit_kernels must not be imported before the switch is set.
"""

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
