"""Sizes and devices on every op: empty batches, anchors and channels; grids past the size bounds;
tensors on mixed devices.

Empty sizes agree with the reference (C = 0, which killed the compiled CPU kernels, in a fresh
process); grids whose H * W passes 2^30 (or overflows int64) are refused with a clear error by the
public functions and the compiled kernels; a ``meta`` or CUDA tensor among CPU tensors is refused
before any work. Every backend present on the machine (``reference``, ``cpp``, ``triton`` through
the interpreter) through the public functions, plus the compiled kernels called directly
(``torch.ops.jit_kernels.<op>``).
"""

from __future__ import annotations

import pytest
import torch

import jit_kernels as jk
from jit_kernels import _checks
from jit_kernels import reference as ref
from jit_kernels.reference.attention import anchor_attention_ref
from jit_kernels.testing import tokens
from tests.ops._helpers import BACKENDS, needs_cpp, offset_tokens, ops, python


# ---------------------------------------------------------------- empty channels, batch, anchors


@pytest.mark.slow
@needs_cpp
def test_zero_channels_do_not_kill_the_process():
    """C = 0 divided the grain size of the compiled CPU kernels by zero (SIGFPE)."""
    proc = python("""
        import torch, jit_kernels as jk
        ops = torch.ops.jit_kernels
        f = torch.randn(1, 48, 0)
        a = torch.tensor([0, 5, 17, 30])
        near = jk.nearest_anchor_map(a, 6, 8)
        w = jk.gaussian_weights(1.0, 3)
        for fn in (lambda: jk.token_importance(torch.randn(1, 4, 0), 2, 2, backend="cpp"),
                   lambda: ops.token_importance(f, 6, 8)):
            try:
                fn()
            except ValueError as e:
                print("refused:", e)
        print("lift", tuple(ops.lift_field(torch.randn(1, 4, 0), a, near, w, 6, 8).shape))
        ops.lift_euler_(f, torch.randn(1, 4, 0), a, near, w, 6, 8, 0.1)
        ops.microflow_update_(f, torch.tensor([1, 2]), torch.randn(1, 2, 0), 0.5)
        print("target", tuple(ops.microflow_target(f, f, a, near, w, torch.tensor([1, 2]), torch.randn(1, 2, 0),
                                                   0.5, 0.3, 6, 8).shape))
        print("update", tuple(jk.microflow_update(f, torch.tensor([1, 2]), torch.randn(1, 2, 0), "blend", 0.5,
                                                  backend="cpp").shape))
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("refused: token_importance: field has no channels (C = 0)") == 2, proc.stdout
    assert "lift (1, 48, 0)" in proc.stdout and "target (1, 2, 0)" in proc.stdout and "update (1, 48, 0)" in proc.stdout


def test_references_handle_empty_batches():
    """The references stacked per-sample results (torch.stack of nothing) and reshaped with -1."""
    assert ref.nearest_anchor_map_ref(torch.zeros(0, 3, dtype=torch.int64), 4, 5).shape == (0, 20)
    assert ref.select_new_tokens_ref(torch.rand(0, 20), torch.tensor([1, 2]), 4).shape == (0, 4)
    for shape in ((0, 3, 2, 4), (2, 0, 2, 4), (2, 3, 0, 4)):
        q = torch.randn(*shape)
        cs = torch.randn(shape[1], 4)
        assert anchor_attention_ref(q, q, q, cs, cs).shape == shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sizes_agree_with_the_reference(backend):
    """Empty batches: the references raised (torch.stack of nothing, reshape with -1)."""
    h, w = 4, 5
    n = h * w
    a = torch.tensor([0, 7, 13])
    pa = torch.zeros(0, 3, dtype=torch.int64)
    kw = dict(backend=backend)
    assert torch.equal(jk.nearest_anchor_map(pa, h, w, **kw), torch.zeros(0, n, dtype=torch.int64))
    assert jk.select_new_tokens(torch.rand(0, n), pa, 4, **kw).shape == (0, 4)
    assert jk.lift_field(torch.randn(0, 3, 2), pa, h, w, **kw).shape == (0, n, 2)
    assert jk.token_importance(torch.randn(0, n, 3), h, w, **kw).shape == (0, n)
    # (C = 0, which killed the compiled backend, is tested in a subprocess above and in test_bad_inputs.py.)
    for shape in ((0, 3, 2, 4), (2, 0, 2, 4), (2, 3, 0, 4)):
        q = torch.randn(*shape)
        cs = torch.randn(shape[1], 4)
        assert jk.anchor_attention(q, q, q, cs, cs, **kw).shape == shape


# ---------------------------------------------------------------- grid bounds


@pytest.mark.parametrize("backend", BACKENDS)
def test_grid_bounds(backend):
    a = torch.tensor([0])
    for hw in ((2**62 + 1, 4), (2**64, 4), (4, 2**64), (2**15, 2**15 + 1), (2**40, 2**40)):
        with pytest.raises(ValueError, match=r"nearest_anchor_map: grid \d+ x \d+ is too large: at most 2\^30"):
            jk.nearest_anchor_map(a, *hw, backend=backend)
    with pytest.raises(ValueError, match="lift_field: grid .* too large"):
        jk.lift_field(tokens(1, 1, 2), a, 2**40, 2**40, backend=backend)
    with pytest.raises(ValueError, match="select_new_tokens: importance has .* tokens; at most 2\\^30"):
        jk.select_new_tokens(torch.zeros(1, 1).expand(1, 2**30 + 1), a, 1, backend=backend)
    # The largest grid is accepted by the checks (1 x 2^30 would need gigabytes to run: check only).
    _checks.check_grid("op", 1, 2**30)
    _checks.check_grid("op", 2**15, 2**15)


@needs_cpp
def test_compiled_grid_check_does_not_overflow():
    """H * W overflowed int64 in the C++ check (2^62 + 1 times 4 passed as 4) and the map had a wrong shape."""
    with pytest.raises(ValueError, match=r"nearest_anchor_map: grid 4611686018427387905 x 4 is too large"):
        ops.nearest_anchor_map(torch.tensor([0]), 2**62 + 1, 4)
    with pytest.raises(ValueError, match="too large"):
        ops.token_importance(tokens(1, 4, 2), 2**31, 2**31)


# ---------------------------------------------------------------- mixed devices


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_tensor_among_cpu_tensors_is_refused(backend):
    """gather / scatter returned uninitialised memory, scatter_ did nothing, the value checks read meta tensors."""
    x = tokens(2, 10, 4)
    keep = x.clone()
    idx = torch.tensor([1, 3])
    src = tokens(2, 2, 4, seed=1)
    msg = "all tensors must be on one device"
    with pytest.raises(ValueError, match=f"gather_tokens: {msg}, got x=cpu, idx=meta"):
        jk.gather_tokens(x, idx.to("meta"), backend=backend)
    with pytest.raises(ValueError, match=f"scatter_tokens: {msg}"):
        jk.scatter_tokens(x, idx, src.to("meta"), backend=backend)
    with pytest.raises(ValueError, match=f"scatter_tokens_: {msg}"):
        jk.scatter_tokens_(x, idx.to("meta"), src, backend=backend)
    with pytest.raises(ValueError, match=f"lift_field: {msg}"):
        jk.lift_field(src, idx.to("meta"), 2, 5, backend=backend)
    with pytest.raises(ValueError, match=f"microflow_update_: {msg}"):
        jk.microflow_update_(x, idx.to("meta"), src, backend=backend)
    with pytest.raises(ValueError, match=f"select_new_tokens: {msg}"):
        jk.select_new_tokens(x[..., 0], idx.to("meta"), 2, backend=backend)
    # The lead tensor on meta: the same device error, not "backend cannot run on meta tensors".
    with pytest.raises(ValueError, match=f"gather_tokens: {msg}, got x=meta, idx=cpu"):
        jk.gather_tokens(x.to("meta"), idx, backend=backend)
    assert torch.equal(x, keep)


@needs_cpp
@pytest.mark.gpu
def test_device_mix_raises():
    x = offset_tokens(1, 10, 4).cuda()
    with pytest.raises(ValueError, match="must be on one device"):
        ops.gather_tokens(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="must be on one device"):
        ops.lift_field(x[:, :2], torch.tensor([0, 5], device="cuda"), torch.zeros(10, dtype=torch.long),
                       jk.gaussian_weights(1.0, 3, "cuda"), 2, 5)
