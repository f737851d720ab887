"""Importance-guided activation (``token_importance``, ``select_new_tokens``) on every backend.

Every (device, backend) pair of :func:`jit_kernels.testing.device_backends` (``cpu-cpp`` = the
compiled CPU extension, ``cpu-triton`` = Triton through TRITON_INTERPRET=1, see conftest.py;
``cuda-cuda`` / ``cuda-triton`` = the CUDA kernels and compiled Triton, ``gpu``-marked) against
the plain-PyTorch reference on the CPU, through the public functions. Then the code paths of
the kernels themselves: the C++ lane-split channel mean and selection called directly
(``torch.ops.jit_kernels.<op>``), the Triton selection's key order, and the ops routed to
Triton on CUDA. Registration, backend choice and the validation policy are tested for every op
in test_op_table.py.
"""

from __future__ import annotations

import pytest
import torch

import jit_kernels as jk
from jit_kernels import reference as ref
from jit_kernels.testing import DTYPES, GRIDS, anchors, device_backends, gen, on, tokens
from tests.ops._helpers import (TRITON_DEV, interpreter_rows_slow, needs_cpp, needs_runner, needs_triton,
                                offset_tokens, ops)

DEVICE_BACKENDS = interpreter_rows_slow(device_backends())
DEV = TRITON_DEV  # where the Triton tests below run (None: skipped by needs_runner)


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


# ---------------------------------------------------------------- the C++ kernels called directly


@needs_cpp
@pytest.mark.parametrize("c", [1, 3, 8, 13, 64])
def test_importance_channel_tails(c):
    # The channel mean is split into 8 lanes; channel counts off the lane width take the tail loop.
    h, w = 5, 9
    field = offset_tokens(2, h * w, c) * 3
    torch.testing.assert_close(ops.token_importance(field, h, w), ref.token_importance_ref(field, h, w),
                               rtol=1e-5, atol=1e-4)


@needs_cpp
def test_select_new_tokens_ties_nan_and_signed_zero():
    n = 12
    s = torch.tensor([[0.0, -0.0, 1.0, float("nan"), 1.0, -1.0, float("inf"), 0.5, float("-inf"), 1.0, 0.0, 2.0]])
    for active in (torch.tensor([2]), torch.tensor([3, 6]), torch.tensor([], dtype=torch.long)):
        for count in range(0, n - active.numel() + 1):
            got = ops.select_new_tokens(s, active, count)
            assert torch.equal(got, ref.select_new_tokens_ref(s, active, count)), (active, count)


# ---------------------------------------------------------------- Triton


@needs_runner
def test_select_keys_order_nan_signed_zero_and_ties():
    inf, nan = float("inf"), float("nan")
    imp = torch.tensor([[0.0, -0.0, 1.0, nan, -inf, inf, 1.0, -1e-30, 1e-30, nan, -0.0, 3.0]], device=DEV)
    act = torch.tensor([11], device=DEV)
    got = jk.select_new_tokens(imp, act, 11, backend="triton")
    # NaN first (lower index first), +inf, 1.0 ties by index, tiny positive, zeros of either sign by index, ...
    assert got.tolist() == [[3, 9, 5, 2, 6, 8, 0, 1, 10, 7, 4]]
    assert torch.equal(got, ref.select_new_tokens_ref(imp, act, 11))
    # bf16 and fp16 scores are compared after widening to fp32, like the reference
    for dt in (torch.float16, torch.bfloat16):
        s = torch.randint(-3, 4, (2, 40), generator=gen(7)).to(dt).to(DEV) / 4
        act = anchors(40, 40, batch=2, device=DEV)[:, :10]
        assert torch.equal(jk.select_new_tokens(s, act, 30, backend="triton"), ref.select_new_tokens_ref(s, act, 30))


@needs_triton
@pytest.mark.gpu
def test_routed_main_ops_run_triton_on_cuda():
    h, w, b, c = 16, 16, 2, 8
    n = h * w
    f = torch.randn(b, n, c, device="cuda")
    got = torch.ops.jit_kernels.token_importance(f, h, w)
    torch.testing.assert_close(got, ref.token_importance_ref(f, h, w), rtol=1e-4, atol=1e-5)
    a = torch.randperm(n, device="cuda")[:40]
    imp = torch.randn(b, n, device="cuda")
    assert torch.equal(torch.ops.jit_kernels.select_new_tokens(imp, a, 30), ref.select_new_tokens_ref(imp, a, 30))
