"""Hardening of the kernel layer (issue 10): empty sizes, devices, memory overlap, size bounds, strided
in-place targets, the Triton nearest map on wide grids, and the Triton grid limits.

Every backend present on the machine (``reference``, ``cpp``, ``triton`` through the interpreter)
through the public functions, plus the compiled kernels called directly
(``torch.ops.jit_kernels.<op>``) where they check for themselves. The corpus of bad inputs
across every op is tests/test_bad_inputs.py.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import jit_kernels as jk
from jit_kernels import _checks
from jit_kernels import reference as ref
from jit_kernels.reference.attention import anchor_attention_ref
from jit_kernels.testing import anchors, assert_close, compiled_backends, gen, tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ["reference"] + compiled_backends("cpu")
HAS_CPP = "cpp" in BACKENDS
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"compiled extension not loaded: {jk.extension_error()}")
ops = torch.ops.jit_kernels


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


# ---------------------------------------------------------------- 1. empty channels, batch, anchors


@needs_cpp
def test_zero_channels_do_not_kill_the_process():
    """C = 0 divided the grain size of the compiled CPU kernels by zero (SIGFPE)."""
    proc = _python("""
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


# ---------------------------------------------------------------- 2. mixed devices


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


# ---------------------------------------------------------------- 3, 8. memory overlap of in-place targets


def _brute_offsets(t: torch.Tensor) -> list[int]:
    return [sum(i * s for i, s in zip(ix, t.stride())) for ix in itertools.product(*map(range, t.shape))]


def test_overlap_helpers_are_exact():
    g = torch.Generator().manual_seed(0)
    buf = torch.zeros(400)
    for _ in range(300):
        dims = int(torch.randint(1, 4, (1,), generator=g))
        sizes = torch.randint(1, 5, (dims,), generator=g).tolist()
        strides = torch.randint(0, 7, (dims,), generator=g).tolist()
        t = buf.as_strided(sizes, strides, int(torch.randint(0, 20, (1,), generator=g)))
        offs = _brute_offsets(t)
        assert _checks.has_internal_overlap(t) == (len(set(offs)) != len(offs)), (sizes, strides)
        if _checks.has_internal_overlap(t):
            continue
        sizes2 = torch.randint(1, 5, (dims,), generator=g).tolist()
        strides2 = torch.randint(1, 7, (dims,), generator=g).tolist()
        u = buf.as_strided(sizes2, strides2, int(torch.randint(0, 40, (1,), generator=g)))
        cells_t = {t.storage_offset() + o for o in offs}
        cells_u = {u.storage_offset() + o for o in _brute_offsets(u)}
        assert _checks.overlaps(t, u) == bool(cells_t & cells_u), (sizes, strides, sizes2, strides2)
    # Byte-exact across dtypes: an int64 over two float32 cells.
    f = torch.zeros(8)
    assert _checks.overlaps(f[1:2], f.view(torch.int64)[0:1])
    assert not _checks.overlaps(f[2:3], f.view(torch.int64)[0:1])
    assert not _checks.overlaps(f[0:4], torch.zeros(4)) and not _checks.overlaps(f[:0], f)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_targets_must_not_overlap(backend):
    h, w, c = 4, 5, 3
    n = h * w
    a = torch.tensor([0, 7, 13])
    kw = dict(backend=backend)
    base = tokens(1, n, c)
    keep = base.clone()
    wide = base.expand(2, -1, -1)  # stride 0 over the batch: both samples are one memory
    with pytest.raises(ValueError, match="scatter_tokens_: base has internally overlapping memory"):
        jk.scatter_tokens_(wide, torch.tensor([[1], [2]]), tokens(2, 1, c, seed=1), **kw)
    with pytest.raises(ValueError, match="lift_euler_: y has internally overlapping memory"):
        jk.lift_euler_(wide, tokens(2, 3, c, seed=1), a, h, w, 0.5, **kw)
    with pytest.raises(ValueError, match="microflow_update_: y has internally overlapping memory"):
        jk.microflow_update_(wide, torch.tensor([1, 2]), tokens(2, 2, c, seed=1), "blend", 0.5, **kw)
    assert torch.equal(base, keep)
    # An input sharing memory with the target: lift_euler_ read values while it wrote y.
    y = tokens(2, n, c, seed=2)
    keep = y.clone()
    with pytest.raises(ValueError, match="lift_euler_: values overlaps the memory of y"):
        jk.lift_euler_(y, y[:, 3:6], a, h, w, 0.5, **kw)
    with pytest.raises(ValueError, match="scatter_tokens_: src overlaps the memory of base"):
        jk.scatter_tokens_(y, torch.tensor([0, 1, 2]), y[:, 1:4], **kw)
    with pytest.raises(ValueError, match="microflow_update_: target overlaps the memory of y"):
        jk.microflow_update_(y, torch.tensor([0, 1]), y[:, 5:7], "blend", 0.5, **kw)
    assert torch.equal(y, keep)
    # Views of one buffer that share no element are fine (exact check): even vs odd channels.
    buf = tokens(2, n, 2 * c, seed=3)
    want = ref.scatter_tokens_ref(buf[..., 0::2].clone(), torch.tensor([4, 9]), buf[:, :2, 1::2].clone())
    got = jk.scatter_tokens_(buf[..., 0::2], torch.tensor([4, 9]), buf[:, :2, 1::2], **kw)
    assert torch.equal(got, want)
    # Out of place, an expanded y is copied first: fine.
    out = jk.microflow_update(wide, torch.tensor([1, 2]), tokens(2, 2, c, seed=1), "blend", 0.5, **kw)
    assert out.shape == (2, n, c)


@needs_cpp
def test_compiled_kernels_refuse_overlap_themselves():
    h, w, c = 4, 5, 3
    n = h * w
    a = torch.tensor([0, 7, 13])
    near = ref.nearest_anchor_map_ref(a, h, w)
    wt = jk.gaussian_weights(1.0, 3)
    y = tokens(2, n, c)
    keep = y.clone()
    with pytest.raises(ValueError, match="lift_euler_: values overlaps the memory of y"):
        ops.lift_euler_(y, y[:, :3], a, near, wt, h, w, 0.5)
    with pytest.raises(ValueError, match="lift_euler_: y has internally overlapping memory"):
        ops.lift_euler_(y[:1].expand(2, -1, -1), y[:, :3].clone(), a, near, wt, h, w, 0.5)
    with pytest.raises(ValueError, match="scatter_tokens_: base has internally overlapping memory"):
        ops.scatter_tokens_(y[:1].expand(2, -1, -1), torch.tensor([1]), tokens(2, 1, c))
    with pytest.raises(ValueError, match="microflow_update_: new_idx overlaps the memory of y"):
        ops.microflow_update_(y, y.view(-1)[:4].view(torch.int64), tokens(2, 2, c), 0.5)
    assert torch.equal(y, keep)
    buf = tokens(2, n, 2 * c, seed=3)  # interleaved, disjoint: accepted
    ops.scatter_tokens_(buf[..., 0::2], torch.tensor([4, 9]), buf[:, :2, 1::2])


# ---------------------------------------------------------------- 4. grid bounds


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


# ---------------------------------------------------------------- 5. nearest map on wide grids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hw", [(1, 50000), (50000, 1), (46342, 3)])
def test_nearest_map_exact_where_squared_distances_exceed_int32(backend, hw):
    """The Triton kernel squared distances in int32: 7318 of 50000 cells were wrong on a 1 x 50000 grid."""
    h, w = hw
    n = h * w
    a = torch.stack([anchors(n, 5, seed=3), torch.tensor([0, n - 1, 17, n // 2, 123])])
    got = jk.nearest_anchor_map(a, h, w, backend=backend)
    assert torch.equal(got, ref.nearest_anchor_map_ref(a, h, w))
    # Ties go to the first-listed anchor in the wide variant too: anchors at both ends, probe the middle.
    b = torch.tensor([n - 1, 0]) if h == 1 or w == 1 else torch.tensor([0, n - 1])
    assert torch.equal(jk.nearest_anchor_map(b, h, w, backend=backend), ref.nearest_anchor_map_ref(b, h, w))


def test_triton_nearest_switches_to_int64_exactly_past_int32():
    lift = pytest.importorskip("jit_kernels.triton.lift")
    assert not lift.nearest_is_wide(1, 46341)  # 46340^2 = 2147395600 < 2^31
    assert lift.nearest_is_wide(1, 46342)
    assert not lift.nearest_is_wide(2**15, 2**15)  # the largest square grid: 2 (2^15 - 1)^2 < 2^31


# ---------------------------------------------------------------- 6. strided in-place targets


def _strided(b, n, c, seed=0, dtype=torch.float32):
    """Fresh strided [B, N, C] tensors: channel stride 2, and batch-major (non-contiguous rows)."""
    views = [tokens(b, n, 2 * c, dtype, seed=seed)[..., ::2], tokens(n, b, c, dtype, seed=seed + 1).transpose(0, 1)]
    return [_fresh(v) for v in views]


def _fresh(t):
    """A copy of ``t`` with its strides (``clone`` makes a gapped layout contiguous)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_y_is_accepted_and_updated_in_place(backend, dtype):
    """cpp refused a strided y (microflow_update out of place even cloned it with its strides and failed)."""
    h, w, c = 5, 6, 3
    n = h * w
    a = anchors(n, 7)
    vals = tokens(2, 7, c, dtype, seed=5)
    new = torch.tensor([i for i in range(n) if i not in set(a.tolist())][:4])
    tgt = tokens(2, 4, c, dtype, seed=6)
    near = ref.nearest_anchor_map_ref(a, h, w)
    for y in _strided(2, n, c, seed=7, dtype=dtype):
        assert not y.is_contiguous()
        want = ref.lift_euler_ref_(y.contiguous(), vals, a, near, jk.lift_weights(7, n), h, w, 0.25)
        yy, stride = _fresh(y), y.stride()
        assert jk.lift_euler_(yy, vals, a, h, w, 0.25, backend=backend) is yy
        assert yy.stride() == stride
        assert_close(yy, want, dtype)
        for mode, wt in (("assign", None), ("blend", 1 / 3)):
            want = ref.microflow_update_ref_(y.contiguous(), new, tgt, 1.0 if wt is None else wt)
            keep = y.clone()
            assert_close(jk.microflow_update(y, new, tgt, mode, wt, backend=backend), want, dtype)
            assert torch.equal(y, keep)
            yi = _fresh(y)
            jk.microflow_update_(yi, new, tgt, mode, wt, backend=backend)
            assert_close(yi, want, dtype)


@needs_cpp
def test_compiled_kernels_take_strided_y():
    h, w, c = 5, 6, 3
    n = h * w
    a = anchors(n, 7)
    near = ref.nearest_anchor_map_ref(a, h, w)
    wt = jk.gaussian_weights(1.0, 5)
    vals = tokens(2, 7, c, seed=5)
    for y in _strided(2, n, c, seed=7):
        want = ref.lift_euler_ref_(y.contiguous(), vals, a, near, wt, h, w, -0.5)
        got = _fresh(y)
        ops.lift_euler_(got, vals, a, near, wt, h, w, -0.5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # bit-identical to the contiguous kernel
        cont = y.contiguous()
        ops.lift_euler_(cont, vals, a, near, wt, h, w, -0.5)
        assert torch.equal(got, cont)
        got = _fresh(y)
        ops.microflow_update_(got, torch.tensor([3, 1]), tokens(2, 2, c, seed=8), 0.25)
        cont = y.contiguous()
        ops.microflow_update_(cont, torch.tensor([3, 1]), tokens(2, 2, c, seed=8), 0.25)
        assert torch.equal(got, cont)


# ---------------------------------------------------------------- 9. blur parameters


def test_blur_parameter_bounds():
    with pytest.raises(ValueError, match="blur_scale must be finite"):
        jk.lift_weights(3, 10, blur_scale=float("inf"))
    with pytest.raises(ValueError, match="blur_scale must be finite"):
        jk.lift_weights(10, 10, blur_scale=float("nan"))  # rho = 1 used to skip the check
    with pytest.raises(ValueError, match="finite and positive"):
        jk.blur_params(10, 10, float("nan"))
    with pytest.raises(ValueError, match=r"sigma = 1000000000.0 asks for a 6000000001-tap blur"):
        jk.lift_weights(3, 10, sigma=1e9)
    with pytest.raises(ValueError, match="kernel_size 1099511627777 is larger than the 1025 supported"):
        jk.lift_weights(3, 10, kernel_size=2**40 + 1)
    with pytest.raises(ValueError, match="larger than the 1025 supported"):
        jk.gaussian_weights(1.0, 1027)
    with pytest.raises(TypeError, match="kernel_size must be a positive odd int"):
        jk.lift_weights(3, 10, kernel_size=3.0)
    with pytest.raises(ValueError, match="kernel_size must be a positive odd int"):
        jk.lift_weights(3, 10, kernel_size=4)
    with pytest.raises(ValueError, match="sigma must be finite and positive"):
        jk.gaussian_weights(float("inf"), 3)
    with pytest.raises(ValueError, match="lift_field: kernel_size"):
        jk.lift_field(tokens(1, 2, 2), torch.tensor([0, 3]), 2, 2, sigma=1.0, kernel_size=2**40 + 1)
    # The bound is generous: the largest accepted kernel and the defaults pass, values unchanged.
    assert jk.gaussian_weights(1.0, jk.blur.MAX_KERNEL_SIZE).shape == (1025,)
    assert jk.lift_weights(3, 10, sigma=1e9, kernel_size=5).shape == (5,)
    for m in range(1, 4097, 97):
        s, k = jk.blur_params(m, 4096)
        assert k <= 61
        assert torch.equal(jk.lift_weights(m, 4096), jk.gaussian_weights(s, k))
    # A sigma whose square underflows gave NaN taps; now the identity (the limit).
    tiny = jk.gaussian_weights(1e-200, 5)
    assert torch.equal(tiny, torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]))


# ---------------------------------------------------------------- 16. Triton grid limits


class _Recorder:
    """Wraps a Triton kernel: records every launch grid, then launches."""

    def __init__(self, kernel, grids):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


def _triton_runs(monkeypatch, run):
    from jit_kernels.triton import aot

    grids: list = []
    for mod_name, names in aot.KERNELS.items():
        mod = __import__(f"jit_kernels.triton.{mod_name}", fromlist=["x"])
        for name in names:
            monkeypatch.setattr(mod, name, _Recorder(getattr(mod, name), grids))
    return run(), grids


def _all_ops(b=5, c=11, h=4, w=5):
    n = h * w
    out = {}
    x = tokens(b, n, c)
    pa = torch.stack([anchors(n, 6, seed=s) for s in range(b)])
    a = anchors(n, 6)
    kw = dict(backend="triton", sigma=1.0, kernel_size=3)
    out["gather"] = jk.gather_tokens(x, pa, backend="triton")
    out["scatter"] = jk.scatter_tokens(x, a, tokens(b, 6, c, seed=1), backend="triton")
    out["near"] = jk.nearest_anchor_map(pa, h, w, backend="triton")
    out["lift"] = jk.lift_field(tokens(b, 6, c, seed=2), pa, h, w, nearest=out["near"], **kw)
    y = tokens(b, n, c, seed=3)
    jk.lift_euler_(y, tokens(b, 6, c, seed=2), pa, h, w, 0.5, nearest=out["near"], **kw)
    out["euler"] = y
    out["imp"] = jk.token_importance(x, h, w, backend="triton")
    out["select"] = jk.select_new_tokens(out["imp"], pa, 4, backend="triton")
    y = tokens(b, n, c, seed=4)
    jk.microflow_update_(y, out["select"], tokens(b, 4, c, seed=5), "blend", 0.5, backend="triton")
    out["update"] = y
    out["target"] = jk.microflow_target(x, tokens(b, n, c, seed=6), pa, out["select"], tokens(b, 4, c, seed=7), 0.8,
                                        0.5, h, w, nearest=out["near"], blur_sigma=1.0, kernel_size=3, backend="triton")
    q, k, v = (torch.randn(b, 6, 3, 4, generator=gen(s)) for s in range(3))
    cs = torch.randn(b, 6, 4, generator=gen(9))
    out["attn"] = jk.anchor_attention(q, k, v, cs, cs.cos(), torch.tensor([6, 3, 1, 5, 2]), backend="triton")
    return out


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton needs TRITON_INTERPRET=1 on CPU")
@pytest.mark.parametrize("limits", [(2, 1 << 30), (7, 1 << 30), (65535, 24)])
def test_triton_launches_split_past_grid_limits(monkeypatch, limits):
    """Grid axes 1 and 2 hold at most 65535 programs (B, B * H, channel tiles) and the flattened row axes
    are int32: the launchers split the work into several launches, with the same results."""
    from jit_kernels.triton import common

    monkeypatch.setattr(common, "_TILE_INTERP", 32)  # small tiles: several channel tiles at C = 11
    monkeypatch.setattr(common, "_MAX_BLOCK_C_INTERP", 4)
    want, whole = _triton_runs(monkeypatch, _all_ops)
    whole = list(whole)  # the next run wraps these recorders, which keep appending
    monkeypatch.setattr(common, "MAX_GRID_YZ", limits[0])
    monkeypatch.setattr(common, "MAX_FLAT_ROWS", limits[1])
    got, split = _triton_runs(monkeypatch, _all_ops)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert len(split) > len(whole)  # the work was split
    for g in split:
        assert all(d <= limits[0] for d in g[1:]), g


# ---------------------------------------------------------------- 9. metadata of direct kernel calls
#
# Every kernel checks its arguments' metadata (ranks, shapes, dtypes, devices, in-place targets) itself,
# before any work, whatever validate says: the C++ kernels with TORCH_CHECK (csrc/checks.h), the Triton
# launchers through jit_kernels._metadata (jit_kernels.triton.guarded). One table of bad calls per op,
# with the exception type the C++ CPU kernel raises (the cpu-cpp rows check that the table says what
# C++ does), run on every kernel: the C++ CPU kernels, the Triton twins (interpreted on CPU, compiled on
# CUDA) and, on a CUDA machine, torch.ops.jit_kernels.<op> on CUDA tensors (CUDA C++, or the Triton
# launcher for the ops routed to it). Before, the Triton kernels checked index values only: a target too
# short, a per-sample index of a larger batch or an odd head dim read (or wrote) out of bounds.

from jit_kernels._library import OPS  # noqa: E402
from jit_kernels.testing import device_backends  # noqa: E402

MH, MW = 4, 5  # the grid of the default arguments (N = 20)


def _kernel_args(op: str) -> dict:
    """Valid schema arguments of ``op`` (without validate), on the CPU."""
    b, c, n = 2, 3, MH * MW
    a = torch.tensor([0, 7, 13])
    near = ref.nearest_anchor_map_ref(a, MH, MW)
    wts = jk.lift_weights(3, n)
    new = torch.tensor([1, 2, 3, 4])  # none of them an anchor
    if op == "gather_tokens":
        return dict(x=tokens(b, n, c), idx=torch.tensor([1, 4, 9]))
    if op in ("scatter_tokens", "scatter_tokens_"):
        return dict(base=tokens(b, n, c), idx=torch.tensor([1, 4, 9]), src=tokens(b, 3, c, seed=1))
    if op == "nearest_anchor_map":
        return dict(anchor_idx=a, height=MH, width=MW)
    if op == "lift_field":
        return dict(values=tokens(b, 3, c, seed=2), anchor_idx=a, nearest=near, weights=wts, height=MH, width=MW)
    if op == "lift_euler_":
        return dict(y=tokens(b, n, c, seed=3), values=tokens(b, 3, c, seed=2), anchor_idx=a, nearest=near,
                    weights=wts, height=MH, width=MW, dt=0.1)
    if op == "token_importance":
        return dict(field=tokens(b, n, c), height=MH, width=MW)
    if op == "select_new_tokens":
        return dict(importance=torch.rand(b, n, generator=gen(4)), active_idx=a, count=5)
    if op == "microflow_update_":
        return dict(y=tokens(b, n, c), new_idx=new, target=tokens(b, 4, c, seed=5), weight=0.5)
    if op == "microflow_target":
        return dict(y_prev=tokens(b, n, c), v_prev=tokens(b, n, c, seed=6), anchor_idx=a, nearest=near, weights=wts,
                    new_idx=new, eps=tokens(b, 4, c, seed=7), sigma_prev=0.8, sigma=0.5, height=MH, width=MW)
    if op == "anchor_attention":
        q, k, v = (torch.randn(b, 5, 2, 4, generator=gen(8 + i)) for i in range(3))
        return dict(q=q, k=k, v=v, cos=torch.rand(5, 4, generator=gen(11)), sin=torch.rand(5, 4, generator=gen(12)),
                    key_lengths=torch.tensor([5, 3]), scale=0.5)
    raise KeyError(op)


# (op, label, exception type, message pattern, overrides, devices); an override maps an argument to a value
# or to a function of the arguments (on the test's device). devices="cuda": a mixed-device call (the
# arguments named in ``cpu`` stay on the CPU), which only a CUDA machine can make.
META_CASES = []


def meta_bad(op, label, exc, match, cpu=(), **over):
    META_CASES.append(pytest.param(op, over, exc, match, tuple(cpu), id=f"{op}: {label}"))


_I32 = lambda name: lambda a: a[name].int()  # noqa: E731
_F64 = lambda name: lambda a: a[name].double()  # noqa: E731
_RANK2 = lambda name: lambda a: a[name][0]  # noqa: E731
_EXPANDED = lambda name: lambda a: a[name][:1].expand(a[name].shape[0], -1, -1)  # noqa: E731
_EMPTY = torch.zeros(0, dtype=torch.int64)

meta_bad("gather_tokens", "x rank 2", ValueError, r"gather_tokens: x must be \[B, N, C\]", x=_RANK2("x"))
meta_bad("gather_tokens", "x float64", TypeError, "gather_tokens: x must be float32", x=_F64("x"))
meta_bad("gather_tokens", "idx int32", TypeError, "gather_tokens: idx must be int64", idx=_I32("idx"))
meta_bad("gather_tokens", "idx rank 3", ValueError, r"gather_tokens: idx must be \[M\] \(shared\) or \[B, M\]",
         idx=lambda a: a["idx"].view(1, 1, 3))
meta_bad("gather_tokens", "idx of a larger batch", ValueError, "gather_tokens: idx is per sample with batch 3",
         idx=torch.zeros(3, 2, dtype=torch.int64))
meta_bad("gather_tokens", "idx on the CPU", ValueError, "gather_tokens: .*one device", cpu=("idx",))
for _op in ("scatter_tokens", "scatter_tokens_"):
    meta_bad(_op, "src rows", ValueError, rf"{_op}: src must be \[B, M, C\] = \[2, 3, 3\]",
             src=lambda a: a["src"][:, :2])
    meta_bad(_op, "src channels", ValueError, rf"{_op}: src must be \[B, M, C\]", src=lambda a: a["src"][..., :2])
    meta_bad(_op, "src int64", TypeError, f"{_op}: src must be float32", src=lambda a: a["src"].long())
    meta_bad(_op, "base rank 2", ValueError, rf"{_op}: base must be \[B, N, C\]", base=_RANK2("base"))
    meta_bad(_op, "idx of a larger batch", ValueError, f"{_op}: idx is per sample with batch 3",
             idx=torch.zeros(3, 3, dtype=torch.int64))
    meta_bad(_op, "src on the CPU", ValueError, f"{_op}: .*one device", cpu=("src",))
meta_bad("scatter_tokens_", "base expanded", ValueError, "scatter_tokens_: base has internally overlapping memory",
         base=_EXPANDED("base"))
meta_bad("scatter_tokens_", "src a view of base", ValueError, "scatter_tokens_: src overlaps the memory of base",
         src=lambda a: a["base"][:, 5:8])
meta_bad("nearest_anchor_map", "no anchors (M = 0)", ValueError, "nearest_anchor_map: anchor_idx is empty",
         anchor_idx=_EMPTY)
meta_bad("nearest_anchor_map", "per-sample, no anchors", ValueError, "nearest_anchor_map: anchor_idx is empty",
         anchor_idx=torch.zeros(2, 0, dtype=torch.int64))
meta_bad("nearest_anchor_map", "anchor_idx int32", TypeError, "nearest_anchor_map: anchor_idx must be int64",
         anchor_idx=_I32("anchor_idx"))
meta_bad("nearest_anchor_map", "anchor_idx rank 3", ValueError, r"nearest_anchor_map: anchor_idx must be \[M\]",
         anchor_idx=lambda a: a["anchor_idx"].view(1, 1, 3))
meta_bad("nearest_anchor_map", "height 0", ValueError, "nearest_anchor_map: .*must be >= 1", height=0)
meta_bad("nearest_anchor_map", "grid past 2^30", ValueError, "nearest_anchor_map: grid 65536 x 32768 is too large",
         height=1 << 16, width=1 << 15)
meta_bad("lift_field", "values rank 2", ValueError, r"lift_field: values must be \[B, N, C\]", values=_RANK2("values"))
meta_bad("lift_field", "values float64", TypeError, "lift_field: values must be float32", values=_F64("values"))
meta_bad("lift_field", "weights float64", TypeError, "lift_field: weights must be float32", weights=_F64("weights"))
meta_bad("lift_field", "weights of even length", ValueError, "lift_field: weights must be an odd-length",
         weights=lambda a: a["weights"][1:])
meta_bad("lift_field", "nearest too short", ValueError, "lift_field: nearest has 19 entries, expected N = 20",
         nearest=lambda a: a["nearest"][:-1])
meta_bad("lift_field", "grid larger than nearest", ValueError, "lift_field: nearest has 20 entries, expected N = 25",
         height=5)
meta_bad("lift_field", "fewer values rows than anchors", ValueError,
         "lift_field: values has 2 rows but anchor_idx has 3 anchors", values=lambda a: a["values"][:, :2])
meta_bad("lift_field", "per-sample nearest, shared anchors", ValueError, "lift_field: nearest must be per sample",
         nearest=lambda a: a["nearest"].expand(2, -1))
meta_bad("lift_field", "anchor_idx of a larger batch", ValueError, "lift_field: anchor_idx is per sample with batch 3",
         anchor_idx=lambda a: a["anchor_idx"].expand(3, -1))
meta_bad("lift_field", "nearest int32", TypeError, "lift_field: nearest must be int64", nearest=_I32("nearest"))
meta_bad("lift_field", "values on the CPU", ValueError, "lift_field: .*one device", cpu=("values",))
meta_bad("lift_field", "weights on the CPU", ValueError, "lift_field: .*one device", cpu=("weights",))
meta_bad("lift_euler_", "y too short", ValueError, r"lift_euler_: y must be \[B, H\*W, C\] = \[2, 20, 3\]",
         y=lambda a: a["y"][:, :10])
meta_bad("lift_euler_", "y float64", TypeError, "lift_euler_: y must be float32", y=_F64("y"))
meta_bad("lift_euler_", "y rank 2", ValueError, r"lift_euler_: y must be \[B, N, C\]", y=_RANK2("y"))
meta_bad("lift_euler_", "y expanded", ValueError, "lift_euler_: y has internally overlapping memory",
         y=_EXPANDED("y"))
meta_bad("lift_euler_", "values a view of y", ValueError, "lift_euler_: values overlaps the memory of y",
         values=lambda a: a["y"][:, 2:5])
meta_bad("lift_euler_", "weights of even length", ValueError, "lift_euler_: weights must be an odd-length",
         weights=lambda a: a["weights"][1:])
meta_bad("lift_euler_", "y on the CPU", ValueError, "lift_euler_: .*one device", cpu=("y",))
meta_bad("token_importance", "field rank 2", ValueError, r"token_importance: field must be \[B, N, C\]",
         field=_RANK2("field"))
meta_bad("token_importance", "field int64", TypeError, "token_importance: field must be float32",
         field=lambda a: a["field"].long())
meta_bad("token_importance", "no channels", ValueError, r"token_importance: field has no channels \(C = 0\)",
         field=lambda a: a["field"][..., :0])
meta_bad("token_importance", "grid does not match N", ValueError, "token_importance: grid 5 x 5 = 25 does not match",
         height=5)
meta_bad("select_new_tokens", "importance rank 1", ValueError, r"select_new_tokens: importance must be a float \[B, N\]",
         importance=lambda a: a["importance"][0])
meta_bad("select_new_tokens", "importance int64", ValueError, r"select_new_tokens: importance must be a float \[B, N\]",
         importance=lambda a: a["importance"].long())
meta_bad("select_new_tokens", "active_idx int32", TypeError, "select_new_tokens: active_idx must be int64",
         active_idx=_I32("active_idx"))
meta_bad("select_new_tokens", "active_idx of a larger batch", ValueError,
         "select_new_tokens: active_idx is per sample with batch 3", active_idx=lambda a: a["active_idx"].expand(3, -1))
meta_bad("select_new_tokens", "count past the inactive tokens", ValueError,
         r"select_new_tokens: count must be in \[0, 17\]", count=18)
meta_bad("select_new_tokens", "count negative", ValueError, r"select_new_tokens: count must be in \[0, 17\]", count=-1)
meta_bad("select_new_tokens", "active_idx on the CPU", ValueError, "select_new_tokens: .*one device",
         cpu=("active_idx",))
meta_bad("microflow_update_", "target shorter than new_idx", ValueError,
         r"microflow_update_: target must be \[B, R, C\] = \[2, 4, 3\], got \[2, 2, 3\]",
         target=lambda a: a["target"][:, :2])
meta_bad("microflow_update_", "target channels", ValueError, r"microflow_update_: target must be \[B, R, C\]",
         target=lambda a: a["target"][..., :2])
meta_bad("microflow_update_", "target float64", TypeError, "microflow_update_: target must be float32",
         target=_F64("target"))
meta_bad("microflow_update_", "new_idx int32", TypeError, "microflow_update_: new_idx must be int64",
         new_idx=_I32("new_idx"))
meta_bad("microflow_update_", "new_idx of a larger batch", ValueError,
         "microflow_update_: new_idx is per sample with batch 3", new_idx=lambda a: a["new_idx"].expand(3, -1))
meta_bad("microflow_update_", "y rank 2", ValueError, r"microflow_update_: y must be \[B, N, C\]", y=_RANK2("y"))
for _w in (0.0, 1.5, float("nan")):
    meta_bad("microflow_update_", f"weight {_w}", ValueError, r"microflow_update_: weight must be in \(0, 1\]",
             weight=_w)
meta_bad("microflow_update_", "y expanded", ValueError, "microflow_update_: y has internally overlapping memory",
         y=_EXPANDED("y"))
meta_bad("microflow_update_", "target a view of y", ValueError, "microflow_update_: target overlaps the memory of y",
         target=lambda a: a["y"][:, 10:14])
meta_bad("microflow_update_", "target on the CPU", ValueError, "microflow_update_: .*one device", cpu=("target",))
meta_bad("microflow_target", "v_prev shape", ValueError, "microflow_target: v_prev .* must match y_prev",
         v_prev=lambda a: a["v_prev"][:, :10])
meta_bad("microflow_target", "eps shorter than new_idx", ValueError, r"microflow_target: eps must be \[B, R, C\]",
         eps=lambda a: a["eps"][:, :2])
meta_bad("microflow_target", "eps float64", TypeError, "microflow_target: eps must be float32", eps=_F64("eps"))
meta_bad("microflow_target", "grid does not match N", ValueError, "microflow_target: grid 5 x 5 = 25 does not match",
         height=5)
meta_bad("microflow_target", "weights float64", TypeError, "microflow_target: weights must be float32",
         weights=_F64("weights"))
meta_bad("microflow_target", "no anchors", ValueError, "microflow_target: anchor_idx is empty", anchor_idx=_EMPTY)
meta_bad("microflow_target", "nearest too short", ValueError, "microflow_target: nearest has 19 entries",
         nearest=lambda a: a["nearest"][:-1])
meta_bad("microflow_target", "new_idx of a larger batch", ValueError,
         "microflow_target: new_idx is per sample with batch 3", new_idx=lambda a: a["new_idx"].expand(3, -1))
meta_bad("microflow_target", "sigma above sigma_prev", ValueError, "microflow_target: need 0 <= sigma <= sigma_prev",
         sigma=0.9)
meta_bad("microflow_target", "eps on the CPU", ValueError, "microflow_target: .*one device", cpu=("eps",))
_ODD = {name: (lambda a, name=name: a[name][..., :3]) for name in ("q", "k", "v", "cos", "sin")}
meta_bad("anchor_attention", "odd head dim", ValueError, r"anchor_attention: the head dim D must be even .*D = 3",
         **_ODD)
meta_bad("anchor_attention", "q rank 3", ValueError, r"anchor_attention: q must be \[B, L, H, D\]", q=_RANK2("q"))
meta_bad("anchor_attention", "q float64", TypeError, "anchor_attention: q must be float32", q=_F64("q"))
meta_bad("anchor_attention", "k shape", ValueError, "anchor_attention: k .* must match q",
         k=lambda a: a["k"][:, :4])
meta_bad("anchor_attention", "v dtype", TypeError, "anchor_attention: v is .* but q is", v=lambda a: a["v"].half())
meta_bad("anchor_attention", "cos shape", ValueError, r"anchor_attention: cos must be \[L, D\] = \[5, 4\]",
         cos=lambda a: a["cos"][:4])
meta_bad("anchor_attention", "sin int64", TypeError, "anchor_attention: sin must be a floating tensor",
         sin=lambda a: a["sin"].long())
meta_bad("anchor_attention", "cos per sample, sin shared", ValueError,
         r"anchor_attention: cos and sin must both be \[L, D\] or both \[B, L, D\]",
         cos=lambda a: a["cos"].expand(2, -1, -1))
meta_bad("anchor_attention", "key_lengths int32", TypeError, "anchor_attention: key_lengths must be int64",
         key_lengths=_I32("key_lengths"))
meta_bad("anchor_attention", "key_lengths shape", ValueError, r"anchor_attention: key_lengths must be \[B\] = \[2\]",
         key_lengths=torch.tensor([5, 3, 1]))
for _s in (0.0, float("inf"), float("nan")):
    meta_bad("anchor_attention", f"scale {_s}", ValueError, "anchor_attention: scale must be finite and > 0", scale=_s)
meta_bad("anchor_attention", "cos on the CPU", ValueError, "anchor_attention: .*one device", cpu=("cos",))


def test_the_metadata_table_covers_every_op():
    assert {p.values[0] for p in META_CASES} == set(OPS)


def _schema_args(op: str, args: dict) -> list:
    return [args[a.name] for a in getattr(ops, op).default._schema.arguments if a.name != "validate"]


def _build_args(op: str, over: dict, device: str, cpu: tuple = ()) -> dict:
    """:func:`_kernel_args` on ``device`` (those named in ``cpu`` left on the CPU), with ``over`` applied."""
    args = {k: v.to(device) if isinstance(v, torch.Tensor) and k not in cpu else v
            for k, v in _kernel_args(op).items()}
    for k, v in over.items():
        v = v(args) if callable(v) else v
        args[k] = v.to(device) if isinstance(v, torch.Tensor) and v.device.type != device else v
    return args


def _kernel(op: str, backend: str):
    return getattr(ops, OPS[op].triton_op if backend == "triton" else op)


@pytest.mark.parametrize("device,backend", device_backends(("cuda", "cpp", "triton")))
@pytest.mark.parametrize("op,over,exc,match,cpu", META_CASES)
def test_kernels_refuse_bad_metadata(device, backend, op, over, exc, match, cpu):
    if cpu and device == "cpu":
        pytest.skip("a mixed-device call needs a CUDA device")
    args = _build_args(op, over, device, cpu)
    written = {name: args[name].clone() for name in OPS[op].mutates}
    kernel = _kernel(op, backend)
    with pytest.raises(exc, match=match):
        kernel(*_schema_args(op, args))  # validate=True: the metadata must be refused before the value checks
    with pytest.raises(exc, match=match):
        kernel(*_schema_args(op, args), False)  # and also without them
    for name, before in written.items():
        assert torch.equal(args[name], before), f"{name} was written"


@pytest.mark.parametrize("backend", ["main", "triton"])
@pytest.mark.parametrize("op", [op for op in sorted(OPS)  # the ops taking two or more tensors
                                if sum(isinstance(v, torch.Tensor) for v in _kernel_args(op).values()) > 1])
def test_a_meta_tensor_among_others_is_refused(op, backend):
    """Any ``meta`` tensor sends a call to the fake kernel, whatever the devices of the others: the fake
    refuses a mix (before, a direct call mixing CPU and meta tensors returned an empty result)."""
    if backend == "triton" and "triton" not in BACKENDS:
        pytest.skip("triton is not importable")
    kernel = getattr(ops, OPS[op].triton_op if backend == "triton" else op)
    args = _kernel_args(op)
    first = next(k for k, v in args.items() if isinstance(v, torch.Tensor))
    mixed = dict(args, **{first: args[first].to("meta")})
    with pytest.raises(ValueError, match=f"{op}: all tensors must be on one device"):
        kernel(*_schema_args(op, mixed))
    every = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    kernel(*_schema_args(op, every))  # all on meta: shapes only, no error


@pytest.mark.parametrize("device,backend", device_backends(("cuda", "cpp", "triton")))
@pytest.mark.parametrize("op,over,exc,match", [
    ("lift_euler_", dict(y=lambda a: a["y"][:, :10], anchor_idx=torch.tensor([0, 7, 99])), ValueError,
     r"lift_euler_: y must be \[B, H\*W, C\]"),
    ("lift_euler_", dict(y=lambda a: a["y"][:1].expand(2, -1, -1), nearest=lambda a: a["nearest"] + 5), ValueError,
     "lift_euler_: y has internally overlapping memory"),
    ("anchor_attention", dict(cos=lambda a: a["cos"].expand(2, -1, -1), key_lengths=torch.tensor([9, 3])),
     ValueError, "anchor_attention: cos and sin must both be"),
    ("microflow_update_", dict(target=lambda a: a["target"][:, :2], new_idx=torch.tensor([1, 2, 3, 99])), ValueError,
     r"microflow_update_: target must be \[B, R, C\]"),
    ("gather_tokens", dict(x=_F64("x"), idx=torch.tensor([99])), TypeError, "gather_tokens: x must be float32"),
], ids=["lift_euler_ y shape", "lift_euler_ y expanded", "attention tables", "microflow_update_ target",
        "gather_tokens x dtype"])
def test_metadata_is_refused_before_index_values(device, backend, op, over, exc, match):
    """Bad metadata and a bad index value in one call: every kernel reports the metadata (checked first, as
    the public functions do), not the index. The C++ lift_euler_ and anchor_attention checked the anchors
    and key lengths before the shape of y and the rank of the rotary tables."""
    args = _build_args(op, over, device)
    with pytest.raises(exc, match=match):
        _kernel(op, backend)(*_schema_args(op, args))


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not importable")
def test_compiled_triton_refuses_cpu_tensors():
    """Without the interpreter, a Triton twin called with CPU tensors is a ValueError (as the CUDA C++
    kernels' check_cuda), not an error from inside Triton's launcher."""
    proc = _python("""
        import os
        os.environ["TRITON_INTERPRET"] = "0"
        import torch, jit_kernels
        import jit_kernels.triton  # noqa: F401
        x = torch.randn(1, 4, 2)
        for call in (lambda: torch.ops.jit_kernels.gather_tokens_triton(x, torch.tensor([1])),
                     lambda: torch.ops.jit_kernels.token_importance_triton(x, 2, 2, False)):
            try:
                call()
            except ValueError as e:
                print("refused:", e)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("the Triton kernels need CUDA tensors") == 2, proc.stdout + proc.stderr[-2000:]


# ---------------------------------------------------------------- 10. in-place writes bump the version counter
#
# scatter_tokens_, lift_euler_ and microflow_update_ write an argument: like a torch in-place op, every
# backend bumps its autograd version counter, so a tensor saved for backward and then overwritten by
# them is reported at backward instead of giving wrong gradients (and the value-check cache sees the
# write). The C++ kernels and the Triton launcher the CUDA key routes to did not bump it.


def _inplace_calls(device):
    """(op, the written tensor, direct kernel call(kernel), public call(backend)) of each in-place op."""
    out = []
    for op in ("scatter_tokens_", "lift_euler_", "microflow_update_"):
        args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _kernel_args(op).items()}
        target = args[OPS[op].mutates[0]]
        direct = lambda kernel, op=op, args=args: kernel(*_schema_args(op, args))  # noqa: E731
        if op == "scatter_tokens_":
            public = lambda be, a=args: jk.scatter_tokens_(a["base"], a["idx"], a["src"], backend=be)  # noqa: E731
        elif op == "lift_euler_":
            public = lambda be, a=args: jk.lift_euler_(a["y"], a["values"], a["anchor_idx"], MH, MW, 0.1,  # noqa: E731
                                                       nearest=a["nearest"], backend=be)
        else:
            public = lambda be, a=args: jk.microflow_update_(a["y"], a["new_idx"], a["target"], "blend", 0.5,  # noqa: E731
                                                             backend=be)
        out.append((op, target, direct, public))
    return out


@pytest.mark.parametrize("device,backend", device_backends(("cuda", "cpp", "triton", "reference")))
def test_inplace_ops_bump_the_version_counter(device, backend):
    for op, target, direct, public in _inplace_calls(device):
        if backend != "reference":  # the kernel called directly (the reference has none)
            v0 = target._version
            direct(_kernel(op, backend))
            assert target._version > v0, f"{op} ({backend}) wrote {OPS[op].mutates[0]} without bumping its version"
        v0 = target._version
        public(backend)
        assert target._version > v0, f"jk.{op}(backend={backend!r}) did not bump the version"


@pytest.mark.parametrize("device,backend", device_backends(("cuda", "cpp", "triton", "reference")))
def test_overwriting_a_tensor_saved_for_backward_is_reported(device, backend):
    for op, target, direct, public in _inplace_calls(device):
        scale = torch.ones((), device=device, requires_grad=True)
        loss = (scale * target).sum()  # saves target for the gradient of scale
        public(backend)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
        if backend != "reference":
            loss = (scale * target).sum()
            direct(_kernel(op, backend))
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()
