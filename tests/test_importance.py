"""Importance-guided activation (``token_importance``, ``select_new_tokens``) on every backend.

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
from jit_kernels.testing import DTYPES, GRIDS, anchors, compiled_backends, gen, tokens

BACKENDS = compiled_backends("cpu")


# ---------------------------------------------------------------- importance


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", GRIDS)
def test_token_importance(backend, dtype, grid):
    h, w = grid
    f = tokens(2, h * w, 7, dtype, offset=0.5)
    got = jk.token_importance(f, h, w, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (2, h * w)
    torch.testing.assert_close(got, ref.token_importance_ref(f, h, w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_sample", [False, True])
def test_select_new_tokens_exact(backend, per_sample):
    b, n = 3, 200
    imp = torch.randn(b, n, generator=gen(2))
    imp[:, 50:60] = 0.25  # ties: lower index first
    imp[0, 7] = float("nan")
    act = anchors(n, 64, batch=b if per_sample else None)
    for count in (0, 1, 17, n - 64):
        got = jk.select_new_tokens(imp, act, count, backend=backend)
        assert torch.equal(got, ref.select_new_tokens_ref(imp, act, count))


def test_select_reference_rules():
    imp = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1]])
    got = ref.select_new_tokens_ref(imp, torch.tensor([1]), 3)
    assert got.tolist() == [[3, 0, 2]]
