"""Tests specific to the compiled CPU backend (``jit_kernels._C``).

The cross-backend parity tests live in the per-family files (test_tokens.py, ...). Here the registered
ops are called directly (``torch.ops.jit_kernels.<op>``), bypassing the Python
validation of the public functions, to prove that the C++ kernels validate
their own inputs (a clear Python exception, never a crash or a silent
out-of-bounds access, and nothing written), that they accept non-contiguous
inputs, that their results do not depend on the thread count, and that the
code paths only the C++ kernels have (the ring-search nearest map, the merged
horizontal taps of the lift, the lane-split channel mean) match the reference.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

import jit_kernels as jk
from jit_kernels import reference as ref
from jit_kernels.testing import anchors, gen, tokens, tolerance

pytestmark = pytest.mark.skipif(
    "cpp" not in jk.available_backends("cpu"), reason=f"compiled extension not loaded: {jk.extension_error()}"
)

ops = torch.ops.jit_kernels
F32 = tolerance(torch.float32)
_tokens = partial(tokens, offset=2.0)


def _lift_inputs(h=7, w=13, m=20, b=2, c=5, seed=0):
    n = h * w
    a = anchors(n, m, seed + 1)
    near = ref.nearest_anchor_map_ref(a, h, w)
    wt = jk.gaussian_weights(1.0, 7)
    return _tokens(b, m, c, seed=seed), a, near, wt


# ---------------------------------------------------------------- bad inputs


def _bad_cases():
    x = _tokens(2, 10, 4)
    idx = torch.tensor([1, 3, 5])
    src = _tokens(2, 3, 4, seed=1)
    vals, a, near, wt = _lift_inputs()
    h, w = 7, 13
    n = h * w
    y = _tokens(2, n, 5, seed=2)
    field = _tokens(2, n, 5, seed=3)
    imp = torch.rand(2, n, generator=gen(4))
    eps = _tokens(2, 3, 5, seed=5)
    new = torch.tensor([i for i in range(n) if i not in set(a.tolist())][:3])
    return [
        # gather_tokens
        ("gather rank", lambda: ops.gather_tokens(x[0], idx), ValueError, r"gather_tokens: x must be \[B, N, C\]"),
        ("gather dtype", lambda: ops.gather_tokens(x.double(), idx), TypeError, r"gather_tokens: x must be float32"),
        ("gather int x", lambda: ops.gather_tokens(x.long(), idx), TypeError, r"gather_tokens: x must be float32"),
        ("gather idx dtype", lambda: ops.gather_tokens(x, idx.int()), TypeError, r"gather_tokens: idx must be int64"),
        ("gather idx rank", lambda: ops.gather_tokens(x, idx.view(1, 1, 3)), ValueError, r"idx must be \[M\]"),
        ("gather idx batch", lambda: ops.gather_tokens(x, idx.expand(3, 3)), ValueError, r"per sample with batch 3"),
        ("gather idx high", lambda: ops.gather_tokens(x, torch.tensor([0, 10])), IndexError,
         r"gather_tokens: idx has value 10 outside \[0, 10\)"),
        ("gather idx negative", lambda: ops.gather_tokens(x, torch.tensor([-1])), IndexError, r"value -1 outside"),
        # scatter_tokens / scatter_tokens_
        ("scatter duplicate", lambda: ops.scatter_tokens(x, torch.tensor([1, 3, 1]), src), ValueError,
         r"scatter_tokens: idx contains duplicate indices \(1\)"),
        ("scatter_ duplicate", lambda: ops.scatter_tokens_(x, torch.tensor([[1, 2, 3], [4, 4, 5]]), src), ValueError,
         r"scatter_tokens_: idx contains duplicate indices \(4\)"),
        ("scatter src shape", lambda: ops.scatter_tokens(x, idx, src[:, :2]), ValueError, r"src must be \[B, M, C\]"),
        ("scatter src channels", lambda: ops.scatter_tokens_(x, idx, src[..., :3]), ValueError, r"src must be"),
        ("scatter idx high", lambda: ops.scatter_tokens_(x, torch.tensor([1, 2, 99]), src), IndexError, r"99 outside"),
        ("scatter src rank", lambda: ops.scatter_tokens(x, idx, src[0]), ValueError, r"src must be \[B, N, C\]"),
        # nearest_anchor_map
        ("nearest duplicate", lambda: ops.nearest_anchor_map(torch.tensor([3, 5, 3]), 4, 4), ValueError,
         r"nearest_anchor_map: anchor_idx contains duplicate"),
        ("nearest empty", lambda: ops.nearest_anchor_map(torch.empty(0, dtype=torch.long), 4, 4), ValueError,
         r"anchor_idx is empty"),
        ("nearest out of grid", lambda: ops.nearest_anchor_map(torch.tensor([0, 16]), 4, 4), IndexError,
         r"16 outside \[0, 16\)"),
        ("nearest zero grid", lambda: ops.nearest_anchor_map(torch.tensor([0]), 0, 4), ValueError,
         r"height and width must be >= 1"),
        ("nearest dtype", lambda: ops.nearest_anchor_map(torch.tensor([0.0]), 4, 4), TypeError, r"must be int64"),
        # lift_field
        ("lift nearest size", lambda: ops.lift_field(vals, a, near[:-1], wt, h, w), ValueError,
         r"lift_field: nearest has 90 entries, expected N = 91"),
        ("lift grid mismatch", lambda: ops.lift_field(vals, a, near, wt, 7, 12), ValueError,
         r"nearest has 91 entries, expected N = 84"),
        ("lift nearest range", lambda: ops.lift_field(vals, a, near.clamp(max=5) + 15, wt, h, w), IndexError,
         r"lift_field: nearest has value 20 outside \[0, 20\)"),
        ("lift anchors range", lambda: ops.lift_field(vals, a.clamp(min=0) + 91, near, wt, h, w), IndexError,
         r"anchor_idx has value"),
        ("lift anchor count", lambda: ops.lift_field(vals[:, :19], a, near, wt, h, w), ValueError,
         r"values has 19 rows but anchor_idx has 20"),
        ("lift empty", lambda: ops.lift_field(vals[:, :0], a[:0], near, wt, h, w), ValueError, r"anchor_idx is empty"),
        ("lift weights even", lambda: ops.lift_field(vals, a, near, wt[:6], h, w), ValueError, r"odd-length"),
        ("lift weights dtype", lambda: ops.lift_field(vals, a, near, wt.double(), h, w), TypeError,
         r"weights must be float32"),
        ("lift per-sample mix", lambda: ops.lift_field(vals, a.expand(2, -1), near, wt, h, w), ValueError,
         r"nearest must be per sample exactly when"),
        ("lift values dtype", lambda: ops.lift_field(vals.double(), a, near, wt, h, w), TypeError, r"values must be"),
        # lift_euler_
        ("euler y shape", lambda: ops.lift_euler_(y[:, :-1], vals, a, near, wt, h, w, 0.1), ValueError,
         r"lift_euler_: y must be \[B, H\*W, C\]"),
        ("euler y expanded", lambda: ops.lift_euler_(y[:1].expand(2, -1, -1), vals, a, near, wt, h, w, 0.1),
         ValueError, r"lift_euler_: y has internally overlapping memory"),
        ("euler values alias y", lambda: ops.lift_euler_(y, y[:, :20], a, near, wt, h, w, 0.1), ValueError,
         r"lift_euler_: values overlaps the memory of y"),
        ("euler nearest size", lambda: ops.lift_euler_(y, vals, a, near[:10], wt, h, w, 0.1), ValueError,
         r"lift_euler_: nearest has 10 entries"),
        # token_importance / select_new_tokens
        ("importance grid", lambda: ops.token_importance(field, 7, 12), ValueError,
         r"token_importance: grid 7 x 12 = 84 does not match N = 91"),
        ("importance rank", lambda: ops.token_importance(field[0], 7, 13), ValueError, r"field must be \[B, N, C\]"),
        ("importance dtype", lambda: ops.token_importance(field.double(), 7, 13), TypeError, r"field must be float32"),
        ("select count", lambda: ops.select_new_tokens(imp, a, n - 19), ValueError,
         r"select_new_tokens: count must be in \[0, 71\]"),
        ("select negative count", lambda: ops.select_new_tokens(imp, a, -1), ValueError, r"count must be in"),
        ("select duplicate", lambda: ops.select_new_tokens(imp, torch.tensor([1, 1]), 2), ValueError,
         r"active_idx contains duplicate"),
        ("select range", lambda: ops.select_new_tokens(imp, torch.tensor([n]), 2), IndexError, r"outside"),
        ("select rank", lambda: ops.select_new_tokens(imp[0], a, 2), ValueError, r"importance must be a float"),
        ("select int", lambda: ops.select_new_tokens(imp.long(), a, 2), ValueError, r"importance must be a float"),
        # microflow_update_ / microflow_target
        ("update weight 0", lambda: ops.microflow_update_(y, new, eps, 0.0), ValueError, r"weight must be in \(0, 1\]"),
        ("update weight > 1", lambda: ops.microflow_update_(y, new, eps, 1.5), ValueError, r"weight must be in"),
        ("update duplicate", lambda: ops.microflow_update_(y, torch.tensor([2, 2, 3]), eps, 0.5), ValueError,
         r"microflow_update_: new_idx contains duplicate"),
        ("update target shape", lambda: ops.microflow_update_(y, new, eps[:, :2], 0.5), ValueError,
         r"target must be \[B, R, C\]"),
        ("update range", lambda: ops.microflow_update_(y, torch.tensor([0, 1, n]), eps, 0.5), IndexError, r"outside"),
        ("update y expanded", lambda: ops.microflow_update_(y[:1].expand(2, -1, -1), new, eps, 0.5), ValueError,
         r"microflow_update_: y has internally overlapping memory"),
        ("update target alias y", lambda: ops.microflow_update_(y, new, y[:, 10:13], 0.5), ValueError,
         r"microflow_update_: target overlaps the memory of y"),
        ("scatter_ base expanded", lambda: ops.scatter_tokens_(x[:1].expand(2, -1, -1), idx, src), ValueError,
         r"scatter_tokens_: base has internally overlapping memory"),
        ("scatter_ src alias base", lambda: ops.scatter_tokens_(x, idx, x[:, 5:8]), ValueError,
         r"scatter_tokens_: src overlaps the memory of base"),
        ("importance no channels", lambda: ops.token_importance(field[..., :0], 7, 13), ValueError,
         r"token_importance: field has no channels"),
        ("importance huge grid", lambda: ops.token_importance(field, 2**40, 2**40), ValueError,
         r"token_importance: grid 1099511627776 x 1099511627776 is too large"),
        ("nearest huge grid", lambda: ops.nearest_anchor_map(torch.tensor([0]), 2**62 + 1, 4), ValueError,
         r"nearest_anchor_map: grid 4611686018427387905 x 4 is too large"),
        ("target sigma order", lambda: ops.microflow_target(y, y, a, near, wt, new, eps, 0.3, 0.5, h, w), ValueError,
         r"need 0 <= sigma <= sigma_prev <= 1"),
        ("target grid", lambda: ops.microflow_target(y, y, a, near, wt, new, eps, 0.5, 0.3, 7, 7), ValueError,
         r"does not match N = 91"),
        ("target eps", lambda: ops.microflow_target(y, y, a, near, wt, new, eps[:, :1], 0.5, 0.3, h, w), ValueError,
         r"eps must be \[B, R, C\]"),
        ("target v shape", lambda: ops.microflow_target(y, y[:1], a, near, wt, new, eps, 0.5, 0.3, h, w), ValueError,
         r"v_prev .* must match y_prev"),
        ("target nearest", lambda: ops.microflow_target(y, y, a, near[1:], wt, new, eps, 0.5, 0.3, h, w), ValueError,
         r"nearest has 90 entries"),
        ("target new dup", lambda: ops.microflow_target(y, y, a, near, wt, new[[0, 0, 1]], eps, 0.5, 0.3, h, w),
         ValueError, r"new_idx contains duplicate"),
    ]


_CASES = _bad_cases()


@pytest.mark.parametrize("case", _CASES, ids=[c[0] for c in _CASES])
def test_bad_inputs_raise_clear_errors(case):
    _, fn, exc, pattern = case
    # TORCH_CHECK_VALUE / _TYPE / _INDEX surface as ValueError / TypeError /
    # IndexError (what the public Python functions raise too); check the exact type.
    with pytest.raises(exc, match=pattern):
        fn()


def test_failed_inplace_ops_write_nothing():
    """Validation runs before any work: a rejected in-place call leaves its tensor untouched."""
    x = _tokens(2, 10, 4)
    keep = x.clone()
    src = _tokens(2, 3, 4, seed=1)
    for bad in (torch.tensor([1, 2, 1]), torch.tensor([1, 2, 10]), torch.tensor([[1, 2, 3], [0, 0, 1]])):
        with pytest.raises((ValueError, IndexError)):
            ops.scatter_tokens_(x, bad, src)
        assert torch.equal(x, keep)
    with pytest.raises(ValueError):
        ops.microflow_update_(x, torch.tensor([4, 5, 4]), src, 0.5)
    assert torch.equal(x, keep)
    vals, a, near, wt = _lift_inputs()
    y = _tokens(2, 91, 5)
    keep = y.clone()
    with pytest.raises(IndexError):
        ops.lift_euler_(y, vals, a, torch.full_like(near, 20), wt, 7, 13, 0.5)
    assert torch.equal(y, keep)


@pytest.mark.gpu
def test_device_mix_raises():
    x = _tokens(1, 10, 4).cuda()
    with pytest.raises(ValueError, match="must be on one device"):
        ops.gather_tokens(x, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="must be on one device"):
        ops.lift_field(x[:, :2], torch.tensor([0, 5], device="cuda"), torch.zeros(10, dtype=torch.long),
                       jk.gaussian_weights(1.0, 3, "cuda"), 2, 5)


# ---------------------------------------------------------------- non-contiguous inputs


def _strided_tokens(b, n, c, seed=0):
    """A [B, N, C] view whose channel stride is not 1 (and whose rows are interleaved)."""
    t = torch.randn(b, c, 2 * n, generator=gen(seed)) + 2.0
    return t[:, :, ::2].transpose(1, 2)


def test_gather_scatter_noncontiguous():
    x = _strided_tokens(2, 30, 6)
    assert not x.is_contiguous()
    idx = torch.arange(29, -1, -1)[::3]  # strided index view
    pidx = torch.stack([idx, idx.flip(0)], 1).t()  # [2, M] view with non-unit strides
    assert not pidx.is_contiguous()
    for i in (idx, pidx):
        assert torch.equal(ops.gather_tokens(x, i), ref.gather_tokens_ref(x.contiguous(), i.contiguous()))
        src = _strided_tokens(2, i.shape[-1], 6, seed=3)
        want = ref.scatter_tokens_ref(x.contiguous(), i.contiguous(), src.contiguous())
        assert torch.equal(ops.scatter_tokens(x, i, src), want)
        base = _strided_tokens(2, 30, 6)  # in place into a strided base: its view must see the rows
        ops.scatter_tokens_(base, i, src)
        assert torch.equal(base, want)


def test_scatter_casts_src_dtype():
    base = _tokens(2, 12, 8, torch.bfloat16)
    src = _tokens(2, 3, 8, torch.float32, seed=1)
    idx = torch.tensor([0, 5, 11])
    assert torch.equal(ops.scatter_tokens(base, idx, src), ref.scatter_tokens_ref(base, idx, src))


def test_lift_and_importance_noncontiguous():
    h, w, m, c = 7, 13, 20, 6
    n = h * w
    vals = _strided_tokens(2, m, c)
    a = anchors(n, 2 * m)[::2]  # a strided anchor set
    near = torch.stack([ref.nearest_anchor_map_ref(a, h, w)] * 2, 1)[:, 0]  # strided [N]
    assert not (vals.is_contiguous() or a.is_contiguous() or near.is_contiguous())
    wt = jk.gaussian_weights(1.0, 7)
    want = ref.lift_field_ref(vals.contiguous(), a.contiguous(), near.contiguous(), wt, h, w)
    torch.testing.assert_close(ops.lift_field(vals, a, near, wt, h, w), want, **F32)
    assert torch.equal(ops.nearest_anchor_map(a, h, w), near)
    field = _strided_tokens(2, n, c, seed=4)
    torch.testing.assert_close(ops.token_importance(field, h, w), ref.token_importance_ref(field.contiguous(), h, w),
                               **F32)
    imp = torch.rand(n, 2, generator=gen(5)).t()
    assert torch.equal(ops.select_new_tokens(imp, a, 9), ref.select_new_tokens_ref(imp.contiguous(), a, 9))


def test_microflow_noncontiguous():
    h, w, c = 7, 13, 6
    n = h * w
    y = _tokens(2, n, c)
    a = anchors(n, 20)
    near = ref.nearest_anchor_map_ref(a, h, w)
    wt = jk.gaussian_weights(1.0, 7)
    new = torch.tensor([i for i in range(n) if i not in set(a.tolist())][:8])
    target = _strided_tokens(2, 8, c, seed=2)
    for weight in (1.0, 1 / 3):
        got = y.clone()
        ops.microflow_update_(got, new, target, weight)
        want = ref.microflow_update_ref_(y.clone(), new, target.contiguous(), weight)
        torch.testing.assert_close(got, want, **F32)
    v = _strided_tokens(2, n, c, seed=7)
    eps = _strided_tokens(2, 8, c, seed=8)
    got = ops.microflow_target(y, v, a, near, wt, new, eps, 0.6, 0.4, h, w)
    want = ref.microflow_target_ref(y, v.contiguous(), a, near, wt, new, eps.contiguous(), 0.6, 0.4, h, w)
    torch.testing.assert_close(got, want, **F32)


# ---------------------------------------------------------------- thread-count independence


def _run_all_ops():
    h = w = 48
    n, c, m, b = h * w, 24, 700, 2
    x = _tokens(b, n, c)
    a = anchors(n, m)
    pa = torch.stack([anchors(n, m, seed=5), anchors(n, m, seed=6)])
    wt = jk.gaussian_weights(1.0, 7)
    out = {}
    out["near"] = ops.nearest_anchor_map(a, h, w)
    out["near_ps"] = ops.nearest_anchor_map(pa, h, w)
    out["near_few"] = ops.nearest_anchor_map(a[:30], h, w)  # brute-force path
    out["gather"] = ops.gather_tokens(x, pa)
    out["scatter"] = ops.scatter_tokens(x, a, x[:, :m] * 2)
    vals = x[:, :m].contiguous()
    out["lift"] = ops.lift_field(vals, a, out["near"], wt, h, w)
    out["lift_ps_bf16"] = ops.lift_field(vals.bfloat16(), pa, out["near_ps"], wt, h, w)
    y = x.clone()
    ops.lift_euler_(y, vals, a, out["near"], wt, h, w, -0.1)
    out["euler"] = y
    out["imp"] = ops.token_importance(x, h, w)
    out["select"] = ops.select_new_tokens(out["imp"], pa, 500)
    new = out["select"][0]
    out["target"] = ops.microflow_target(x, x * 0.5, a, out["near"], wt, new, x[:, :500], 0.7, 0.5, h, w)
    y = x.clone()
    ops.microflow_update_(y, new, out["target"], 1 / 3)
    out["update"] = y
    return out


def test_results_do_not_depend_on_thread_count():
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_all_ops()
        torch.set_num_threads(2)
        two = _run_all_ops()
    finally:
        torch.set_num_threads(prev)
    for k in one:
        assert torch.equal(one[k], two[k]), f"{k} differs between 1 and 2 threads"


# ---------------------------------------------------------------- C++-only code paths


def _tie_heavy_anchors(h, w, m, seed):
    """Anchors on a coarse lattice (many equidistant pairs) plus random ones, in random order."""
    n = h * w
    lattice = torch.tensor([r * w + c for r in range(0, h, 3) for c in range(0, w, 3)])
    rest = torch.randperm(n, generator=gen(seed))
    pool = torch.cat([lattice, rest[~torch.isin(rest, lattice)]])[:m]
    return pool[torch.randperm(pool.numel(), generator=gen(seed + 1))]


@pytest.mark.parametrize("grid", [(1, 37), (37, 1), (7, 13), (32, 32), (20, 45)])
def test_nearest_map_both_search_paths_exact(grid):
    # Few anchors take the brute-force path, many take the ring search (m*m > 8n).
    h, w = grid
    n = h * w
    for m in sorted({1, 2, 3, max(1, n // 20), int((8 * n) ** 0.5) + 1, n // 3, n - 1, n}):
        a = _tie_heavy_anchors(h, w, m, seed=m)
        assert torch.equal(ops.nearest_anchor_map(a, h, w), ref.nearest_anchor_map_ref(a, h, w)), (grid, m)


def test_nearest_map_ties_prefer_first_listed_anchor():
    # Cell 12 (row 2, col 2) of a 5 x 5 grid is equidistant from all four anchors.
    for order in ([2, 10, 14, 22], [22, 14, 10, 2], [14, 2, 22, 10]):
        a = torch.tensor(order)
        got = ops.nearest_anchor_map(a, 5, 5)
        assert int(got[12]) == 0
        assert torch.equal(got, ref.nearest_anchor_map_ref(a, 5, 5))
    # The same on a dense set that takes the ring search.
    h = w = 16
    a = torch.tensor([r * w + c for r in range(0, h, 2) for c in range(0, w, 2)]).flip(0)
    assert torch.equal(ops.nearest_anchor_map(a, h, w), ref.nearest_anchor_map_ref(a, h, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 3, 7, 15])
def test_lift_kernel_wider_than_grid_and_merged_taps(dtype, k):
    # Sparse anchors make long runs of equal nearest anchors (the merged-tap path);
    # a 2 x 3 grid with a 15-tap kernel exercises the periodic reflect extension.
    wt = jk.gaussian_weights(2.0, k)
    tol = tolerance(dtype)
    for h, w, m in ((2, 3, 1), (1, 23, 3), (9, 11, 4), (16, 16, 256)):
        a = anchors(h * w, m, seed=h + w)
        near = ref.nearest_anchor_map_ref(a, h, w)
        vals = _tokens(2, m, 5, dtype)
        got = ops.lift_field(vals, a, near, wt, h, w)
        want = ref.lift_field_ref(vals, a, near, wt, h, w)
        torch.testing.assert_close(got, want, **tol)
        # Anchors are exact copies, whatever the dtype.
        assert torch.equal(got[:, a], vals)


@pytest.mark.parametrize("c", [1, 3, 8, 13, 64])
def test_importance_channel_tails(c):
    # The channel mean is split into 8 lanes; channel counts off the lane width take the tail loop.
    h, w = 5, 9
    field = _tokens(2, h * w, c) * 3
    torch.testing.assert_close(ops.token_importance(field, h, w), ref.token_importance_ref(field, h, w),
                               rtol=1e-5, atol=1e-4)


def test_select_new_tokens_ties_nan_and_signed_zero():
    n = 12
    s = torch.tensor([[0.0, -0.0, 1.0, float("nan"), 1.0, -1.0, float("inf"), 0.5, float("-inf"), 1.0, 0.0, 2.0]])
    for active in (torch.tensor([2]), torch.tensor([3, 6]), torch.tensor([], dtype=torch.long)):
        for count in range(0, n - active.numel() + 1):
            got = ops.select_new_tokens(s, active, count)
            assert torch.equal(got, ref.select_new_tokens_ref(s, active, count)), (active, count)


def test_microflow_assign_is_exact_copy():
    y = _tokens(1, 20, 7, torch.bfloat16)
    t = _tokens(1, 4, 7, torch.bfloat16, seed=9)
    idx = torch.tensor([19, 0, 7, 3])
    ops.microflow_update_(y, idx, t, 1.0)
    assert torch.equal(y[:, idx], t)
