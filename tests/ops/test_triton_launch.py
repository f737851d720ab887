"""Triton launches across every op: AOT lowering, launch shapes, grid limits and edge cases of the launchers.

On this machine (no GPU) the Triton kernels are only ever executed through the
Triton interpreter (TRITON_INTERPRET=1, set by conftest.py); their GPU code is
checked only by lowering it ahead of time to sm_90 (``test_aot_lowers_every_kernel``),
never run. Tests marked ``gpu`` run the compiled kernels and are skipped here.
The cross-backend parity against the references, and the Triton tests of a single op family,
are in the per-family files (test_tokens.py, test_lift.py, ...); the Triton twins and the CUDA
routing of every op are tested with the op table in test_op_table.py.
"""

from __future__ import annotations

import importlib
from functools import partial

import pytest
import torch

import jit_kernels as jk
from jit_kernels import reference as ref
from jit_kernels.testing import anchors, assert_close, gen, randn, tokens
from tests.ops._helpers import BACKENDS

triton = pytest.importorskip("triton")
from jit_kernels.triton import aot, common, importance, lift  # noqa: E402

INTERP = common.INTERPRET
DEV = "cpu" if INTERP else ("cuda" if torch.cuda.is_available() else None)
needs_runner = pytest.mark.skipif(DEV is None, reason="Triton needs a CUDA GPU or TRITON_INTERPRET=1")


# Inputs on the device the Triton kernels run on, offset away from zero.
_x = partial(randn, offset=2.0, device=DEV)


@pytest.fixture
def tiny_tiles(monkeypatch):
    """Shrink every launch tile so grids have many programs with ragged last blocks.

    Exercises the masks on rows, channels and anchor chunks (C not a multiple of the
    channel block, N not a multiple of the row block) that the default big
    interpreter tiles would cover in a single program.
    """
    monkeypatch.setattr(common, "_TILE_INTERP", 32)
    monkeypatch.setattr(common, "_TILE_GPU", 32)
    monkeypatch.setattr(common, "_MAX_BLOCK_C_INTERP", 4)
    monkeypatch.setattr(common, "_MAX_BLOCK_C_GPU", 4)
    monkeypatch.setattr(lift, "_ANCHOR_CHUNK_INTERP", 4)
    monkeypatch.setattr(lift, "_ANCHOR_CHUNK_GPU", 4)
    monkeypatch.setattr(lift, "_LIFT_TILE_GPU", 32)
    monkeypatch.setattr(importance, "_IMPORTANCE_TILE_GPU", 32)
    monkeypatch.setattr(importance, "_SELECT_BLOCK_INTERP", 8)
    monkeypatch.setattr(importance, "_SELECT_BLOCK_GPU", 8)


# ---------------------------------------------------------------- kernel registry


def test_aot_registry_lists_every_kernel():
    # A kernel missing from aot.KERNELS would silently escape the sm_90 lowering check.
    for mod_name, names in aot.KERNELS.items():
        mod = importlib.import_module(f"jit_kernels.triton.{mod_name}")
        defined = {k for k in vars(mod) if k.startswith("_") and k.endswith("_kernel")}
        assert defined == set(names), mod_name


# ---------------------------------------------------------------- AOT lowering (no GPU needed)


@pytest.mark.slow
def test_aot_lowers_every_kernel():
    """Every kernel lowers to sm_90 PTX + cubin in a clean process (without TRITON_INTERPRET)."""
    rc, rows, output = aot.compile_all_isolated(90)
    assert rc == 0, output[-3000:]
    assert all(r["ok"] for r in rows), output[-3000:]
    lowered = {r["kernel"] for r in rows}
    assert lowered == {k for names in aot.KERNELS.values() for k in names}, output[-3000:]
    # dtype-generic kernels are lowered for fp32 and bf16 at least
    for k in ("_gather_tokens_fwd_kernel", "_lift_field_fwd_kernel", "_lift_euler_fwd_kernel",
              "_token_importance_fwd_kernel", "_microflow_target_fwd_kernel"):
        assert {r["dtype"] for r in rows if r["kernel"] == k} >= {"float32", "bfloat16"}, k
    # both variants of the lift kernels (JIT_KERNELS_LIFT_VARIANT) are lowered
    for k in ("_lift_field_fwd_kernel", "_lift_euler_fwd_kernel", "_microflow_target_fwd_kernel"):
        assert {"STEP_REFLECT=True" in r["constexprs"] for r in rows if r["kernel"] == k} == {True, False}, k
    for r in rows:
        assert r["shared"] is not None and r["shared"] < 227 * 1024, r
        if r["registers"] is not None:  # ptxas present
            assert r["registers"] <= 255 and not r["spills"], r


def test_aot_specialisation_matches_the_jit():
    class P:
        def __init__(self, num, c):
            self.num, self.is_constexpr = num, c

    class F:
        __name__ = "k"
        arg_names = ["x", "n", "s", "one", "f", "big", "B"]
        params = [P(i, i == 6) for i in range(7)]

    sig, consts, attrs = aot._specialise(F, (torch.zeros(2), 7, 64, 1, 0.5, 2**40), {"B": 8, "num_warps": 4})
    assert sig == {"x": "*fp32", "n": "i32", "s": "i32", "one": "constexpr", "f": "fp32", "big": "i64", "B": "constexpr"}
    assert consts == {"one": 1, "B": 8}
    assert set(attrs) == {(0,), (2,), (5,)}


# ---------------------------------------------------------------- launch-shape edge cases


def test_tile_shapes_are_powers_of_two_and_bounded():
    for rows, cols in ((1, 1), (3, 5), (91, 37), (4096, 64), (10, 3000)):
        for interp in (False, True):
            r, c = common.tile_shape(rows, cols, interpret=interp)
            assert r & (r - 1) == 0 and c & (c - 1) == 0
            assert c <= (1024 if interp else 128) and r <= triton.next_power_of_2(rows)
            assert r * c <= (1 << 16 if interp else 4096) or r == 1
    # GPU shapes of the FLUX size: one 64-channel tile, 4096-element fp32 tiles
    assert common.tile_shape(4096, 64, interpret=False) == (64, 64)
    assert lift.lift_tile_shape(2 * 4096, 64, interpret=False) == (32, 64)


@pytest.mark.slow
@needs_runner
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_tiles_ragged_blocks(tiny_tiles, dtype):
    """C = 7 and N = 35 over blocks of 4 channels x 8 rows: every kernel's masks are exercised."""
    h, w, b, c = 5, 7, 2, 7
    n = h * w
    x = _x(b, n, c, dtype=dtype)
    perm = anchors(n, n, batch=b, device=DEV)
    a, new = perm[:, :9].contiguous(), perm[:, 9:14].contiguous()
    vals = _x(b, 9, c, dtype=dtype, seed=3)
    assert torch.equal(jk.gather_tokens(x, a, backend="triton"), ref.gather_tokens_ref(x, a))
    assert torch.equal(jk.scatter_tokens(x, a, vals, backend="triton"), ref.scatter_tokens_ref(x, a, vals))
    near = jk.nearest_anchor_map(a, h, w, backend="triton")
    assert torch.equal(near, ref.nearest_anchor_map_ref(a, h, w))
    blur = dict(sigma=1.0, kernel_size=3)  # 9 taps: the interpreter pays per tap and per program
    wts = jk.lift_weights(9, n, **blur)
    got = jk.lift_field(vals, a, h, w, nearest=near, backend="triton", **blur)
    assert_close(got, ref.lift_field_ref(vals, a, near, wts, h, w), dtype)
    y = x.clone()
    jk.lift_euler_(y, vals, a, h, w, 0.25, nearest=near, backend="triton", **blur)
    assert_close(y, ref.lift_euler_ref_(x.clone(), vals, a, near, wts, h, w, 0.25), dtype)
    torch.testing.assert_close(jk.token_importance(x, h, w, backend="triton"), ref.token_importance_ref(x, h, w),
                               rtol=1e-4, atol=1e-4)
    imp = torch.randint(-2, 3, (b, n), generator=gen(4)).float().to(DEV)
    for count in (1, 13, n - 9):
        assert torch.equal(jk.select_new_tokens(imp, a, count, backend="triton"), ref.select_new_tokens_ref(imp, a, count))
    tgt = _x(b, 5, c, dtype=dtype, seed=5)
    got = jk.microflow_update(x, new, tgt, "blend", 0.3, backend="triton")
    assert_close(got, ref.microflow_update_ref_(x.clone(), new, tgt, 0.3), dtype)
    v = _x(b, n, c, dtype=dtype, seed=6, offset=0.0)
    got = jk.microflow_target(x, v, a, new, tgt, 0.9, 0.5, h, w, nearest=near, blur_sigma=1.0, kernel_size=3,
                              backend="triton")
    assert_close(got, ref.microflow_target_ref(x, v, a, near, wts, new, tgt, 0.9, 0.5, h, w), dtype)


@needs_runner
@pytest.mark.parametrize("c", [1, 3, 37])
def test_channels_not_power_of_two_and_n_below_block(c):
    # N = 3 cells and a 1 x 3 grid: far smaller than any block; a 7-tap blur on a 3-wide grid.
    h, w, b = 1, 3, 3
    x = _x(b, 3, c)
    a = torch.tensor([2], device=DEV)
    vals = _x(b, 1, c, seed=2)
    near = jk.nearest_anchor_map(a, h, w, backend="triton")
    assert near.tolist() == [0, 0, 0]
    got = jk.lift_field(vals, a, h, w, nearest=near, sigma=1.0, kernel_size=7, backend="triton")
    wts = jk.lift_weights(1, 3, sigma=1.0, kernel_size=7)
    assert_close(got, ref.lift_field_ref(vals, a, near, wts, h, w), torch.float32)
    # a single anchor fills the whole grid with its value (the taps sum to 1)
    assert_close(got, vals.expand(b, 3, c), torch.float32)
    torch.testing.assert_close(jk.token_importance(x, h, w, backend="triton"), ref.token_importance_ref(x, h, w),
                               rtol=1e-4, atol=1e-5)
    assert torch.equal(jk.gather_tokens(x, torch.tensor([2, 0], device=DEV), backend="triton"), x[:, [2, 0]])


@needs_runner
def test_single_cell_grid():
    x = _x(2, 1, 5)
    a = torch.tensor([0], device=DEV)
    assert jk.nearest_anchor_map(a, 1, 1, backend="triton").tolist() == [0]
    assert torch.equal(jk.lift_field(x, a, 1, 1, backend="triton"), x)
    torch.testing.assert_close(jk.token_importance(x, 1, 1, backend="triton"), ref.token_importance_ref(x, 1, 1))


@needs_runner
def test_noncontiguous_and_expanded_inputs():
    h, w, b, c = 6, 7, 2, 4
    n = h * w
    base = _x(n, b, 2 * c)
    x = base.transpose(0, 1)[:, :, ::2]  # [B, N, C] with batch stride 2C and channel stride 2
    a = anchors(n, n, device=DEV)[:12]
    a_exp = a.expand(b, -1)  # per-sample index with batch stride 0
    a_str = torch.stack([a, a.flip(0)], dim=1)[:, 0]  # stride-2 view
    for idx in (a_exp, a_str):
        assert torch.equal(jk.gather_tokens(x, idx, backend="triton"), ref.gather_tokens_ref(x, idx))
    vals = _x(c, 12, b).permute(2, 1, 0)  # [B, M, C], fully strided
    near = jk.nearest_anchor_map(a, h, w, backend="triton")
    wts = jk.lift_weights(12, n)
    want = ref.lift_field_ref(vals, a, near, wts, h, w)
    torch.testing.assert_close(jk.lift_field(vals, a, h, w, nearest=near, backend="triton"), want)
    torch.testing.assert_close(jk.token_importance(x, h, w, backend="triton"), ref.token_importance_ref(x, h, w),
                               rtol=1e-4, atol=1e-5)
    storage = base.clone()
    y = storage.transpose(0, 1)[:, :, ::2]
    y0 = y.clone()
    jk.lift_euler_(y, vals, a, h, w, 0.5, nearest=near, backend="triton")
    torch.testing.assert_close(y, ref.lift_euler_ref_(y0, vals, a, near, wts, h, w, 0.5))
    assert torch.equal(storage[:, :, 1::2], base[:, :, 1::2]), "lift_euler_ wrote outside its strided view"


# ---------------------------------------------------------------- grid limits


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


@pytest.mark.slow
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


# ---------------------------------------------------------------- the interpreter


@pytest.mark.skipif(not INTERP, reason="the interpreter's __index__ patch (compiled Triton never runs it)")
def test_interpreter_index_mend_for_triton_36(monkeypatch):
    """Triton <= 3.6's interpreter converts a runtime scalar with ``int(array)``, which numpy >= 2.4
    refuses; ``common._mend_interpreter_index`` wraps that patch on those versions only.

    Reproduced here on a newer Triton by putting the 3.6 form of the patch back."""
    import numpy as np
    from triton.runtime import interpreter
    from triton.runtime.errors import InterpreterError

    real = interpreter._patch_lang_tensor

    def patch_as_in_36(tensor, scope):
        real(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", patch_as_in_36)
    idx = torch.tensor([3, 0, 7, 20, 33])
    want = jk.nearest_anchor_map(idx, 7, 13, backend="reference")
    try:
        int(np.array([1]))
        numpy_refuses = False
    except TypeError:
        numpy_refuses = True
    if numpy_refuses:  # the failure the mend exists for
        with pytest.raises(InterpreterError, match="0-dimensional"):
            jk.nearest_anchor_map(idx, 7, 13, backend="triton")

    monkeypatch.setattr(common, "_triton_version", lambda: (3, 7))
    assert common._mend_interpreter_index() is False  # fixed upstream from 3.7 on: nothing wrapped
    assert interpreter._patch_lang_tensor is patch_as_in_36
    monkeypatch.setattr(common, "_triton_version", lambda: (3, 6))
    assert common._mend_interpreter_index() is True
    assert common._mend_interpreter_index() is False  # once only
    assert torch.equal(jk.nearest_anchor_map(idx, 7, 13, backend="triton"), want)
