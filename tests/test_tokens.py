"""Token gather / scatter (``gather_tokens``, ``scatter_tokens``, ``scatter_tokens_``) on every backend.

Every backend present on the machine (``cpp`` = the compiled CPU extension, ``triton`` =
Triton kernels, on CPU through TRITON_INTERPRET=1 only, see conftest.py) against the
plain-PyTorch reference, through the public functions. Registration, backend choice and
the validation policy are tested for every op in test_op_table.py.
"""

from __future__ import annotations

import pytest
import torch

import jit_kernels as jk
from jit_kernels import reference as ref
from jit_kernels.testing import DTYPES, anchors, compiled_backends, counts, tokens

BACKENDS = compiled_backends("cpu")


# ---------------------------------------------------------------- gather / scatter


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_gather_scatter_exact(backend, dtype, per_sample):
    b, n, c = 3, 91, 5
    x = tokens(b, n, c, dtype)
    for m in counts(n):
        idx = anchors(n, m, batch=b if per_sample else None)
        g = jk.gather_tokens(x, idx, backend=backend)
        assert torch.equal(g, ref.gather_tokens_ref(x, idx))
        src = tokens(b, m, c, dtype, seed=5, offset=-3.0)
        base = x.clone()
        out = jk.scatter_tokens(base, idx, src, backend=backend)
        assert torch.equal(base, x), "out-of-place scatter modified its input"
        assert torch.equal(out, ref.scatter_tokens_ref(x, idx, src))
        poisoned = x.clone()
        ref.scatter_tokens_ref_(poisoned, idx, torch.full_like(src, float("nan")))
        res = jk.scatter_tokens_(poisoned, idx, src, backend=backend)
        assert res is poisoned
        assert torch.equal(poisoned, out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_noncontiguous(backend):
    x = tokens(2, 40, 12, torch.float32)[:, :, ::2]  # stride 2 on C
    idx = torch.arange(39, -1, -3)
    assert torch.equal(jk.gather_tokens(x, idx, backend=backend), ref.gather_tokens_ref(x, idx))
    xt = tokens(40, 2, 6, torch.float32).transpose(0, 1)  # batch-major view
    assert torch.equal(jk.gather_tokens(xt, idx, backend=backend), ref.gather_tokens_ref(xt, idx))
