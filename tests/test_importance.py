"""Importance-guided activation (``token_importance``, ``select_new_tokens``) on every backend.

Every (device, backend) pair of :func:`jit_kernels.testing.device_backends` (``cpu-cpp`` = the
compiled CPU extension, ``cpu-triton`` = Triton through TRITON_INTERPRET=1, see conftest.py;
``cuda-cuda`` / ``cuda-triton`` = the CUDA kernels and compiled Triton, ``gpu``-marked) against
the plain-PyTorch reference on the CPU, through the public functions. Registration, backend
choice and the validation policy are tested for every op in test_op_table.py.
"""

from __future__ import annotations

import pytest
import torch

import jit_kernels as jk
from jit_kernels import reference as ref
from jit_kernels.testing import DTYPES, GRIDS, anchors, device_backends, gen, on, tokens

DEVICE_BACKENDS = device_backends()


# ---------------------------------------------------------------- importance


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", GRIDS)
def test_token_importance(device, backend, dtype, grid):
    h, w = grid
    f = tokens(2, h * w, 7, dtype, offset=0.5)
    got = jk.token_importance(on(device, f), h, w, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (2, h * w) and got.device.type == device
    torch.testing.assert_close(got.cpu(), ref.token_importance_ref(f, h, w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("per_sample", [False, True])
def test_select_new_tokens_exact(device, backend, per_sample):
    b, n = 3, 200
    imp = torch.randn(b, n, generator=gen(2))
    imp[:, 50:60] = 0.25  # ties: lower index first
    imp[0, 7] = float("nan")
    act = anchors(n, 64, batch=b if per_sample else None)
    for count in (0, 1, 17, n - 64):
        got = jk.select_new_tokens(*on(device, imp, act), count, backend=backend)
        assert torch.equal(got.cpu(), ref.select_new_tokens_ref(imp, act, count))


def test_select_reference_rules():
    imp = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1]])
    got = ref.select_new_tokens_ref(imp, torch.tensor([1]), 3)
    assert got.tolist() == [[3, 0, 2]]
