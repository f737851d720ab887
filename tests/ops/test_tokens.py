"""Token gather / scatter (``gather_tokens``, ``scatter_tokens``, ``scatter_tokens_``) on every backend.

Every (device, backend) pair of :func:`jit_kernels.testing.device_backends` (``cpu-cpp`` = the
compiled CPU extension, ``cpu-triton`` = Triton through TRITON_INTERPRET=1, see conftest.py;
``cuda-cuda`` / ``cuda-triton`` = the CUDA kernels and compiled Triton, ``gpu``-marked) against
the plain-PyTorch reference on the CPU, through the public functions. Index ops and copies are
compared bit for bit. Then the C++ kernels called directly (``torch.ops.jit_kernels.<op>``, no
Python validation): strided inputs and bases, and a source of another dtype. Registration,
backend choice and the validation policy are tested for every op in test_op_table.py.
"""

from __future__ import annotations

import pytest
import torch

import jit_kernels as jk
from jit_kernels import reference as ref
from jit_kernels.testing import DTYPES, anchors, counts, device_backends, on, tokens
from tests.ops._helpers import interpreter_rows_slow, needs_cpp, offset_tokens, ops, strided_tokens

DEVICE_BACKENDS = interpreter_rows_slow(device_backends())


# ---------------------------------------------------------------- gather / scatter


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_gather_scatter_exact(device, backend, dtype, per_sample):
    b, n, c = 3, 91, 5
    x = tokens(b, n, c, dtype)
    xd = on(device, x)
    for m in counts(n):
        idx = anchors(n, m, batch=b if per_sample else None)
        idxd = on(device, idx)
        g = jk.gather_tokens(xd, idxd, backend=backend)
        assert g.device == xd.device and torch.equal(g.cpu(), ref.gather_tokens_ref(x, idx))
        src = tokens(b, m, c, dtype, seed=5, offset=-3.0)
        base = on(device, x.clone())
        out = jk.scatter_tokens(base, idxd, on(device, src), backend=backend)
        assert torch.equal(base.cpu(), x), "out-of-place scatter modified its input"
        want = ref.scatter_tokens_ref(x, idx, src)
        assert torch.equal(out.cpu(), want)
        poisoned = x.clone()
        ref.scatter_tokens_ref_(poisoned, idx, torch.full_like(src, float("nan")))
        poisoned = on(device, poisoned)
        res = jk.scatter_tokens_(poisoned, idxd, on(device, src), backend=backend)
        assert res is poisoned
        assert torch.equal(poisoned.cpu(), want)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_gather_noncontiguous(device, backend):
    # The views are taken on the device (moving a strided view would make it contiguous).
    base = tokens(2, 40, 12, torch.float32)
    idx = torch.arange(39, -1, -3)
    x, xd = base[:, :, ::2], on(device, base)[:, :, ::2]  # stride 2 on C
    assert not xd.is_contiguous()
    got = jk.gather_tokens(xd, on(device, idx), backend=backend)
    assert torch.equal(got.cpu(), ref.gather_tokens_ref(x, idx))
    base = tokens(40, 2, 6, torch.float32)
    xt, xtd = base.transpose(0, 1), on(device, base).transpose(0, 1)  # batch-major view
    got = jk.gather_tokens(xtd, on(device, idx), backend=backend)
    assert torch.equal(got.cpu(), ref.gather_tokens_ref(xt, idx))


# ---------------------------------------------------------------- the C++ kernels called directly


@needs_cpp
def test_gather_scatter_noncontiguous():
    x = strided_tokens(2, 30, 6)
    assert not x.is_contiguous()
    idx = torch.arange(29, -1, -1)[::3]  # strided index view
    pidx = torch.stack([idx, idx.flip(0)], 1).t()  # [2, M] view with non-unit strides
    assert not pidx.is_contiguous()
    for i in (idx, pidx):
        assert torch.equal(ops.gather_tokens(x, i), ref.gather_tokens_ref(x.contiguous(), i.contiguous()))
        src = strided_tokens(2, i.shape[-1], 6, seed=3)
        want = ref.scatter_tokens_ref(x.contiguous(), i.contiguous(), src.contiguous())
        assert torch.equal(ops.scatter_tokens(x, i, src), want)
        base = strided_tokens(2, 30, 6)  # in place into a strided base: its view must see the rows
        ops.scatter_tokens_(base, i, src)
        assert torch.equal(base, want)


@needs_cpp
def test_scatter_casts_src_dtype():
    base = offset_tokens(2, 12, 8, torch.bfloat16)
    src = offset_tokens(2, 3, 8, torch.float32, seed=1)
    idx = torch.tensor([0, 5, 11])
    assert torch.equal(ops.scatter_tokens(base, idx, src), ref.scatter_tokens_ref(base, idx, src))
