"""The two Triton kernels of ``anchor_attention`` (``$JIT_KERNELS_ATTN_VARIANT``): parity and plumbing.

``v1`` rotates every k tile in registers inside the attention loop; ``v2`` rotates q and k once
(``rotate_qk``) and runs a pipelined flash loop on the rotated copies (full k blocks unmasked,
one masked tail block). Both are driven here through
:func:`jit_kernels.triton.attention.anchor_attention_forward`, with the heuristic tiles and
with small explicit tiles (``blocks``) so that short sequences still cross several query and
key blocks and a partial tail. On a CPU-only machine Triton runs through its interpreter
(conftest sets ``TRITON_INTERPRET=1``), so the shapes stay small; on a CUDA machine the same
tests run compiled on the GPU. The sm_90 lowering of both variants is checked by
``tests/test_triton_kernels.py::test_aot_lowers_every_kernel``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import jit_kernels as jk  # noqa: E402
from jit_kernels import _env  # noqa: E402
from jit_kernels.reference.attention import anchor_attention_ref, rotary_ref  # noqa: E402
from jit_kernels.testing import assert_close, gen, qkv  # noqa: E402
from jit_kernels.triton import attention as ta  # noqa: E402
from jit_kernels.triton import common  # noqa: E402

if common.INTERPRET:
    DEV = "cpu"
elif torch.cuda.is_available():
    DEV = "cuda"
else:  # compiled Triton without a GPU cannot launch
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 or a CUDA GPU", allow_module_level=True)

VARIANTS = ("v1", "v2")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SMALL = (16, 16, 4, 2)  # 16 x 16 tiles: several query / key blocks and a partial tail at L = 37


def _pair_tables(n: int, d: int, batch: int | None = None, seed: int = 1):
    """FLUX-like tables: one angle per channel pair, each value repeated for both channels."""
    shape = (n, d // 2) if batch is None else (batch, n, d // 2)
    ang = torch.rand(*shape, generator=gen(seed)) * 40.0
    return ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)


def _free_tables(n: int, d: int, batch: int | None = None, seed: int = 2):
    """Tables with a different value in every channel (not pair-repeated, not even unit-norm)."""
    shape = (n, d) if batch is None else (batch, n, d)
    g = gen(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def _run(variant, q, k, v, cos, sin, lengths=None, scale=None, blocks=None):
    d = q.shape[-1]
    dev = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    out = ta.anchor_attention_forward(dev(q), dev(k), dev(v), dev(cos), dev(sin), dev(lengths),
                                      d ** -0.5 if scale is None else scale, variant=variant, blocks=blocks)
    return out.cpu()


def _ref(q, k, v, cos, sin, lengths=None, scale=None):
    return anchor_attention_ref(q, k, v, cos, sin, lengths, q.shape[-1] ** -0.5 if scale is None else scale)


# ---------------------------------------------------------------- parity with the reference


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("blocks", [None, SMALL], ids=["heuristic", "small"])
def test_shared_tables_match_reference(variant, dtype, blocks):
    q, k, v = qkv(2, 37, 3, 16, dtype, seed=3)
    cos, sin = _pair_tables(37, 16)
    assert_close(_run(variant, q, k, v, cos, sin, blocks=blocks).float(), _ref(q, k, v, cos, sin).float(),
                 dtype, kind="attention")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
def test_per_sample_tables_and_key_lengths_match_reference(variant, dtype):
    # Per-sample [B, L, D] tables, key lengths that end mid-block, on a block boundary, and at L;
    # padded query rows must come out as zeros (the reference writes zeros there too).
    q, k, v = qkv(3, 37, 2, 16, dtype, seed=4)
    cos, sin = _pair_tables(37, 16, batch=3, seed=5)
    lengths = torch.tensor([21, 16, 37])
    out = _run(variant, q, k, v, cos, sin, lengths, blocks=SMALL)
    assert_close(out.float(), _ref(q, k, v, cos, sin, lengths).float(), dtype, kind="attention")
    assert not out[0, 21:].any() and not out[1, 16:].any()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
def test_tables_that_are_not_pair_repeated(variant, dtype, per_sample):
    # Any [L, D] table is valid input: each channel must use its own cos / sin entry.
    q, k, v = qkv(2, 29, 2, 16, dtype, seed=6)
    cos, sin = _free_tables(29, 16, batch=2 if per_sample else None)
    lengths = torch.tensor([29, 11])
    assert_close(_run(variant, q, k, v, cos, sin, lengths, blocks=SMALL).float(),
                 _ref(q, k, v, cos, sin, lengths).float(), dtype, kind="attention")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("d", [2, 6, 40, 128])
def test_head_dims(variant, d):
    # D = 2 (one pair), D not a power of two (v2 zero-pads its copies to 16 / 64), FLUX's 128.
    q, k, v = qkv(1, 21, 2, d, torch.float32, seed=d)
    cos, sin = _pair_tables(21, d)
    lengths = torch.tensor([17])
    assert_close(_run(variant, q, k, v, cos, sin, lengths, blocks=SMALL),
                 _ref(q, k, v, cos, sin, lengths), torch.float32, kind="attention")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
def test_variants_agree(dtype):
    # Same math, different tiling: within the attention tolerance of each other, with a custom scale.
    q, k, v = qkv(2, 33, 2, 32, dtype, seed=7)
    cos, sin = _pair_tables(33, 32, seed=8)
    a = _run("v1", q, k, v, cos, sin, scale=0.3)
    b = _run("v2", q, k, v, cos, sin, scale=0.3, blocks=SMALL)
    assert_close(b.float(), a.float(), dtype, kind="attention")
    assert_close(b.float(), _ref(q, k, v, cos, sin, scale=0.3).float(), dtype, kind="attention")


def test_public_op_runs_the_default_variant_and_matches_reference():
    q, k, v = qkv(2, 19, 2, 16, torch.bfloat16, seed=9)
    cos, sin = _pair_tables(19, 16)
    lengths = torch.tensor([19, 5])
    out = jk.anchor_attention(*(t.to(DEV) for t in (q, k, v, cos, sin, lengths)), backend="triton").cpu()
    assert torch.equal(out, _run(ta.DEFAULT_VARIANT, q, k, v, cos, sin, lengths))
    assert_close(out.float(), _ref(q, k, v, cos, sin, lengths).float(), torch.bfloat16, kind="attention")


# ---------------------------------------------------------------- v2's rotation kernel


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize("heads_per_program", [None, 2], ids=["default-heads", "2-heads"])
def test_rotate_qk_writes_the_rotated_scaled_copies(dtype, per_sample, heads_per_program, monkeypatch):
    # 2 heads per program over 3 heads: a partial last group; with the grid limit shrunk, the
    # (sample x head group) axis is split into launches too.
    b, n, h, d = 2, 23, 3, 12
    q, k, _ = qkv(b, n, h, d, dtype, seed=10)
    cos, sin = _free_tables(n, d, batch=b if per_sample else None, seed=11)
    dot = {torch.float16: torch.float16, torch.bfloat16: ta._TORCH_DOT[ta._dot_dtype(torch.bfloat16)]}.get(dtype, torch.float32)
    if heads_per_program:
        monkeypatch.setattr(common, "MAX_GRID_YZ", 2)
    rot = ta.rotate_qk(q.to(DEV), k.to(DEV), cos.to(DEV), sin.to(DEV), 0.7, dot, heads_per_program).cpu()
    assert rot.shape == (2, b, h, n, 16) and rot.dtype == dot
    want_q = (rotary_ref(q, cos, sin) * 0.7).permute(0, 2, 1, 3)
    want_k = rotary_ref(k, cos, sin).permute(0, 2, 1, 3)
    # fp32 values agree to an ulp (a GPU may fuse multiply-adds); one rounding to a half type then
    # agrees to one ulp of that type.
    rtol = {torch.float32: 1e-6, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dot]
    torch.testing.assert_close(rot[0, ..., :d].float(), want_q.to(dot).float(), rtol=rtol, atol=1e-6)
    torch.testing.assert_close(rot[1, ..., :d].float(), want_k.to(dot).float(), rtol=rtol, atol=1e-6)
    assert not rot[..., d:].any()  # zero padding: the attention kernel reads it unmasked


# ---------------------------------------------------------------- layout, splits, determinism


@pytest.mark.parametrize("variant", VARIANTS)
def test_strided_inputs_are_read_in_place_and_not_mutated(variant):
    # q, k, v as views of one fused [B, L, 3, H, D] projection (as a fused qkv linear gives them).
    qkv_all = torch.randn(2, 27, 3, 2, 16, generator=gen(12)).to(DEV)
    q, k, v = qkv_all.unbind(2)
    cos, sin = (t.to(DEV) for t in _pair_tables(27, 16))
    lengths = torch.tensor([27, 9], device=DEV)
    before = [t.clone() for t in (qkv_all, cos, sin, lengths)]
    out = ta.anchor_attention_forward(q, k, v, cos, sin, lengths, 0.25, variant=variant, blocks=SMALL)
    for t, t0 in zip((qkv_all, cos, sin, lengths), before):
        assert torch.equal(t, t0)
    assert out.is_contiguous()
    assert_close(out.cpu(), _ref(q.cpu(), k.cpu(), v.cpu(), cos.cpu(), sin.cpu(), lengths.cpu(), 0.25),
                 torch.float32, kind="attention")


@pytest.mark.parametrize("variant", VARIANTS)
def test_grid_splits_give_the_same_bits(variant, monkeypatch):
    # B * H beyond the grid limit is split into launches over samples and heads.
    q, k, v = qkv(3, 18, 3, 16, torch.float32, seed=13)
    cos, sin = _pair_tables(18, 16, batch=3)
    lengths = torch.tensor([18, 7, 12])
    whole = _run(variant, q, k, v, cos, sin, lengths, blocks=SMALL)
    monkeypatch.setattr(common, "MAX_GRID_YZ", 2)
    split = _run(variant, q, k, v, cos, sin, lengths, blocks=SMALL)
    assert torch.equal(whole, split)


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_inputs_same_bits(variant):
    q, k, v = qkv(1, 25, 2, 16, torch.bfloat16, seed=14)
    cos, sin = _pair_tables(25, 16)
    a = _run(variant, q, k, v, cos, sin, blocks=SMALL)
    b = _run(variant, q, k, v, cos, sin, blocks=SMALL)
    assert torch.equal(a, b)


# ---------------------------------------------------------------- selection of the variant


def test_bad_variant_and_blocks_raise_before_launch():
    q, k, v = qkv(1, 4, 1, 4)
    cos, sin = _pair_tables(4, 4)
    with pytest.raises(ValueError, match="variant"):
        ta.anchor_attention_forward(q, k, v, cos, sin, None, 0.5, variant="v3")
    for blocks in ((8, 16, 4, 1), (16, 24, 4, 1), (16, 16, 3, 1), (16, 16, 4, 0)):
        with pytest.raises(ValueError, match="blocks"):
            ta.anchor_attention_forward(q, k, v, cos, sin, None, 0.5, variant="v2", blocks=blocks)


def test_default_variant_dispatch(monkeypatch):
    calls = []
    monkeypatch.setitem(ta._IMPLS, "v1", lambda *a: calls.append("v1") or a[-2])
    monkeypatch.setattr(ta, "DEFAULT_VARIANT", "v1")
    q, k, v = qkv(1, 4, 1, 4)
    cos, sin = _pair_tables(4, 4)
    ta.launch_anchor_attention(q, k, v, cos, sin, None, 0.5)
    assert calls == ["v1"]
    # An invalid $JIT_KERNELS_ATTN_VARIANT at import is reported by the first launch.
    monkeypatch.setattr(ta, "DEFAULT_VARIANT", None)
    monkeypatch.setattr(ta, "_VARIANT_ERROR", "JIT_KERNELS_ATTN_VARIANT='v9': expected one of v1, v2")
    with pytest.raises(ValueError, match="JIT_KERNELS_ATTN_VARIANT"):
        ta.launch_anchor_attention(q, k, v, cos, sin, None, 0.5)


def test_attention_variant_env(monkeypatch):
    monkeypatch.delenv(_env.ATTN_VARIANT, raising=False)
    assert _env.attention_variant() == "v2"
    for raw, want in (("v1", "v1"), (" V2 ", "v2"), ("", "v2")):
        monkeypatch.setenv(_env.ATTN_VARIANT, raw)
        assert _env.attention_variant() == want
    monkeypatch.setenv(_env.ATTN_VARIANT, "flash")
    with pytest.raises(ValueError, match="expected one of v1, v2"):
        _env.attention_variant()


def test_env_variable_is_read_at_import():
    env = dict(os.environ, **{_env.ATTN_VARIANT: "v1"})
    code = "from jit_kernels.triton import attention as a; print(a.DEFAULT_VARIANT)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "v1"


def test_v2_tile_heuristic_on_a_gpu():
    # The configs the sm_90 lowering checks (jit_kernels.triton.aot records these launches).
    blocks = lambda n, b, dtype=torch.bfloat16: ta.attention_blocks_v2(  # noqa: E731
        128, dtype, programs=-(-n // 128) * b * 24, sms=132, interpret=False)
    assert blocks(512 + 1310, 1) == (64, 64, 4, 3)  # 360 programs of 128 rows: under 3 waves
    assert blocks(512 + 1310, 2) == blocks(512 + 4096, 1) == (128, 64, 8, 3)
    assert blocks(512 + 4096, 1, torch.float32) == (64, 16, 8, 2)
    assert ta.attention_blocks_v2(32, torch.bfloat16, interpret=False) == (128, 64, 8, 3)
    assert ta.attention_blocks_v2(256, torch.float16, interpret=False) == (64, 32, 4, 2)


# ---------------------------------------------------------------- the A/B timing hooks


def test_bench_variant_fns_time_both_kernels_and_the_sweep():
    from benchmarks.bench_attention import V2_SWEEP, variant_fns

    q, k, v = (t.to(DEV) for t in qkv(1, 20, 2, 16, torch.float32, seed=15))
    cos, sin = (t.to(DEV) for t in _pair_tables(20, 16))
    fns = variant_fns(q, k, v, cos, sin, sweep=True)
    assert list(fns)[:2] == ["triton_v1", "triton_v2"] and len(fns) == 2 + len(V2_SWEEP)
    want = _ref(q.cpu(), k.cpu(), v.cpu(), cos.cpu(), sin.cpu())
    for name in ("triton_v1", "triton_v2", list(fns)[-1]):
        assert_close(fns[name]().cpu(), want, torch.float32, kind="attention")


@pytest.mark.skipif(torch.cuda.is_available() or not common.INTERPRET, reason="the dry run of the kit (CPU only)")
def test_gpu_kit_bench_section_times_both_variants(tmp_path):
    from benchmarks import gpu_check as gc

    assert gc.main(["--dry-run", "--section", "bench", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["bench"]["attention"]
    assert rows and all(r["triton_v1_ms"][1] > 0 and r["triton_v2_ms"][1] > 0 for r in rows)
    assert all("x_vs_stock_triton_v2" in r for r in rows)
