"""Triton layer: AOT lowering, launch shapes and edge cases of the launchers.

On this machine (no GPU) the Triton kernels are only ever executed through the
Triton interpreter (TRITON_INTERPRET=1, set by conftest.py); their GPU code is
checked only by lowering it ahead of time to sm_90 (``test_aot_lowers_every_kernel``),
never run. Tests marked ``gpu`` run the compiled kernels and are skipped here.
The cross-backend parity against the references is in the per-family files
(test_tokens.py, test_lift.py, ...); the Triton twins and the CUDA routing of every op
are tested with the op table in test_op_table.py.
"""

from __future__ import annotations

import importlib
from functools import partial

import pytest
import torch

import jit_kernels as jk
from jit_kernels import reference as ref
from jit_kernels.testing import anchors, assert_close, gen, randn

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


@needs_runner
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_exact_paths_in_half_precision(dtype):
    h, w, b, c = 7, 13, 3, 5
    n = h * w
    a = anchors(n, n, batch=b, device=DEV)[:, :20].contiguous()
    vals = _x(b, 20, c, dtype=dtype)
    got = jk.lift_field(vals, a, h, w, backend="triton")
    assert torch.equal(ref.gather_tokens_ref(got, a), vals), "anchors must be exact"
    y = _x(b, n, c, dtype=dtype, seed=3)
    tgt = _x(b, 20, c, dtype=torch.float32, seed=4)
    out = jk.microflow_update(y, a, tgt, "assign", backend="triton")
    assert torch.equal(ref.gather_tokens_ref(out, a), tgt.to(dtype)), "assign must copy the target exactly"


@needs_runner
def test_microflow_target_at_an_old_anchor_is_exact_x0():
    h, w, b, c = 5, 6, 2, 3
    n = h * w
    a = anchors(n, n, device=DEV)[:8]
    y, v = _x(b, n, c), _x(b, n, c, seed=1, offset=0.0)
    new = a[:3]  # new positions that happen to be old anchors: the compose rule applies
    eps = _x(b, 3, c, seed=2, offset=0.0)
    got = jk.microflow_target(y, v, a, new, eps, 0.8, 0.5, h, w, backend="triton")
    x0 = (y - 0.8 * v)[:, new]
    torch.testing.assert_close(got, 0.5 * x0 + 0.5 * eps)


# ---------------------------------------------------------------- compiled kernels (GPU only)


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


@pytest.mark.gpu
def test_flux_size_lift_on_cuda():
    h = w = 64
    n, b, c, m = h * w, 2, 64, 1310
    a = torch.randperm(n, device="cuda")[:m]
    vals = torch.randn(b, m, c, device="cuda", dtype=torch.bfloat16)
    near = jk.nearest_anchor_map(a, h, w, backend="triton")
    assert torch.equal(near, ref.nearest_anchor_map_ref(a, h, w))
    got = jk.lift_field(vals, a, h, w, nearest=near, backend="triton")
    want = ref.lift_field_ref(vals, a, near, jk.lift_weights(m, n, device="cuda"), h, w)
    assert_close(got, want, torch.bfloat16)


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
