"""The deterministic micro-flow (``microflow_update``, ``microflow_target``) on every backend.

Every (device, backend) pair of :func:`jit_kernels.testing.device_backends` (``cpu-cpp`` = the
compiled CPU extension, ``cpu-triton`` = Triton through TRITON_INTERPRET=1, see conftest.py;
``cuda-cuda`` / ``cuda-triton`` = the CUDA kernels and compiled Triton, ``gpu``-marked) against
the plain-PyTorch reference on the CPU, through the public functions. Then the C++ kernels
called directly (``torch.ops.jit_kernels.<op>``: strided inputs, assign as an exact copy) and
Triton's compose rule at an old anchor. Registration, backend choice and the validation policy
are tested for every op in test_op_table.py.
"""

from __future__ import annotations

import pytest
import torch

import jit_kernels as jk
from jit_kernels import reference as ref
from jit_kernels.testing import DTYPES, anchors, assert_close, device_backends, on, tokens, tolerance
from tests.ops._helpers import (TRITON_DEV, interpreter_rows_slow, needs_cpp, needs_runner, offset_tokens, ops,
                                strided_tokens, triton_randn)

DEVICE_BACKENDS = interpreter_rows_slow(device_backends())
F32 = tolerance(torch.float32)
DEV = TRITON_DEV  # where the Triton tests below run (None: skipped by needs_runner)


# ---------------------------------------------------------------- micro-flow


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_microflow_update(device, backend, dtype):
    b, n, c = 2, 50, 6
    y = tokens(b, n, c, dtype)
    r = anchors(n, 12, seed=9)
    tgt = tokens(b, 12, c, dtype, seed=10, offset=-2.0)
    yd, rd, tgtd = on(device, y, r, tgt)
    # assign lands exactly on the target, even over poisoned rows
    poisoned = y.clone()
    ref.scatter_tokens_ref_(poisoned, r, torch.full_like(tgt, float("nan")))
    poisoned = on(device, poisoned)
    out = jk.microflow_update(poisoned, rd, tgtd, "assign", backend=backend).cpu()
    assert torch.equal(out[:, r], tgt) and torch.equal(out, ref.scatter_tokens_ref(y, r, tgt))
    assert torch.isnan(poisoned).any(), "out-of-place update modified its input"
    for wgt in (1 / 3, 0.5, 1.0):
        got = jk.microflow_update(yd, rd, tgtd, "blend", wgt, backend=backend)
        assert_close(got.cpu(), ref.microflow_update_ref_(y.clone(), r, tgt, wgt), dtype)
    yi = on(device, y.clone())
    assert jk.microflow_update_(yi, rd, tgtd, "blend", 0.25, backend=backend) is yi
    assert_close(yi.cpu(), ref.microflow_update_ref_(y.clone(), r, tgt, 0.25), dtype)
    # the 0.1 spelling still works, in place, and says it is deprecated
    yd2 = on(device, y.clone())
    with pytest.warns(DeprecationWarning, match="microflow_update_"):
        assert jk.microflow_update(yd2, rd, tgtd, "blend", 0.25, inplace=True, backend=backend) is yd2
    assert torch.equal(yd2, yi)


def test_substeps_land_on_target():
    y = tokens(1, 30, 4, torch.float32)
    r = torch.tensor([3, 7, 11])
    tgt = tokens(1, 3, 4, torch.float32, seed=3)
    for k in range(4, 0, -1):  # weights 1/4, 1/3, 1/2, 1
        y = jk.microflow_update(y, r, tgt, "blend", 1.0 / k)
    assert torch.equal(y[:, r], tgt)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_microflow_target(device, backend, dtype, per_sample):
    h, w, b, c = 9, 10, 2, 5
    n = h * w
    perm = anchors(n, n, batch=b if per_sample else None)
    old, new = perm[..., :30], perm[..., 30:45]
    y = tokens(b, n, c, dtype)
    v = tokens(b, n, c, dtype, seed=1, offset=0.0)
    eps = tokens(b, 15, c, dtype, seed=2, offset=0.0)
    got = jk.microflow_target(*on(device, y, v, old, new, eps), 0.8, 0.7, h, w, backend=backend).cpu()
    near = ref.nearest_anchor_map_ref(old, h, w)
    want = ref.microflow_target_ref(y, v, old, near, jk.lift_weights(30, n), new, eps, 0.8, 0.7, h, w)
    assert_close(got, want, dtype)


# ---------------------------------------------------------------- the C++ kernels called directly


@needs_cpp
def test_microflow_noncontiguous():
    h, w, c = 7, 13, 6
    n = h * w
    y = offset_tokens(2, n, c)
    a = anchors(n, 20)
    near = ref.nearest_anchor_map_ref(a, h, w)
    wt = jk.gaussian_weights(1.0, 7)
    new = torch.tensor([i for i in range(n) if i not in set(a.tolist())][:8])
    target = strided_tokens(2, 8, c, seed=2)
    for weight in (1.0, 1 / 3):
        got = y.clone()
        ops.microflow_update_(got, new, target, weight)
        want = ref.microflow_update_ref_(y.clone(), new, target.contiguous(), weight)
        torch.testing.assert_close(got, want, **F32)
    v = strided_tokens(2, n, c, seed=7)
    eps = strided_tokens(2, 8, c, seed=8)
    got = ops.microflow_target(y, v, a, near, wt, new, eps, 0.6, 0.4, h, w)
    want = ref.microflow_target_ref(y, v.contiguous(), a, near, wt, new, eps.contiguous(), 0.6, 0.4, h, w)
    torch.testing.assert_close(got, want, **F32)


@needs_cpp
def test_microflow_assign_is_exact_copy():
    y = offset_tokens(1, 20, 7, torch.bfloat16)
    t = offset_tokens(1, 4, 7, torch.bfloat16, seed=9)
    idx = torch.tensor([19, 0, 7, 3])
    ops.microflow_update_(y, idx, t, 1.0)
    assert torch.equal(y[:, idx], t)


# ---------------------------------------------------------------- Triton


@needs_runner
def test_microflow_target_at_an_old_anchor_is_exact_x0():
    h, w, b, c = 5, 6, 2, 3
    n = h * w
    a = anchors(n, n, device=DEV)[:8]
    y, v = triton_randn(b, n, c), triton_randn(b, n, c, seed=1, offset=0.0)
    new = a[:3]  # new positions that happen to be old anchors: the compose rule applies
    eps = triton_randn(b, 3, c, seed=2, offset=0.0)
    got = jk.microflow_target(y, v, a, new, eps, 0.8, 0.5, h, w, backend="triton")
    x0 = (y - 0.8 * v)[:, new]
    torch.testing.assert_close(got, 0.5 * x0 + 0.5 * eps)
