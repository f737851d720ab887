"""anchor_attention: the op on every backend against the reference and diffusers' math,
padding / per-sample semantics, errors, opcheck and the C++-only paths; then the two Triton kernels
(``$JIT_KERNELS_ATTN_VARIANT``). The FLUX attention processor built on it is tested in
tests/pipelines/test_attention_processor.py.

The op tests run on every (device, backend) pair of :func:`jit_kernels.testing.device_backends`:
Triton on CPU only through its interpreter (``TRITON_INTERPRET=1``, set in conftest), compiled
on CUDA tensors by the ``gpu``-marked ``cuda-*`` params on a CUDA machine (and lowered for sm_90
by ``tests/ops/test_triton_launch.py::test_aot_lowers_every_kernel``). Results are compared on
the CPU, against the reference run on the CPU tensors.

The Triton kernels of the op: ``v1`` rotates every k tile in registers inside the attention
loop; ``v2`` rotates q and k once (``rotate_qk``) and runs a pipelined flash loop on the rotated
copies (full k blocks unmasked, one masked tail block). Both are driven through
:func:`jit_kernels.triton.attention.anchor_attention_forward`, with the heuristic tiles and with
small explicit tiles (``blocks``) so that short sequences still cross several query and key
blocks and a partial tail. On a CPU-only machine Triton runs through its interpreter, so the
shapes stay small; on a CUDA machine the same tests run compiled on the GPU (``needs_runner``
skips them where Triton can run neither way). The sm_90 lowering of both variants is checked by
the same AOT test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import jit_kernels as jk
from jit_kernels import _env
from jit_kernels.reference.attention import anchor_attention_ref, rotary_ref
from jit_kernels.testing import assert_close, device_backends, gen, on, qkv, tolerance
from tests.ops._helpers import TRITON_DEV, TRITON_INTERPRET, interpreter_rows_slow, needs_runner

try:
    from jit_kernels.triton import attention as ta
    from jit_kernels.triton import common
except ImportError:  # triton is not importable: the Triton kernel tests are skipped (needs_runner)
    ta = common = None

CPU_BACKENDS = [b for b in ("reference", "cpp", "triton") if b in jk.available_backends("cpu")]
COMPILED = [b for b in ("cpp", "triton") if b in CPU_BACKENDS]
HAS_CPP = "cpp" in CPU_BACKENDS
# (device, backend) params: every backend with the reference; the kernels only.
# The Triton interpreter's rows are slow (interpreter_rows_slow).
ALL = interpreter_rows_slow(device_backends(("reference", "cuda", "cpp", "triton")))
KERNELS = interpreter_rows_slow(device_backends(("cuda", "cpp", "triton")))
DEV = TRITON_DEV  # where the Triton kernel tests run (None: skipped by needs_runner)

AXES = {16: (4, 6, 6), 32: (8, 12, 12), 64: (16, 24, 24), 128: (16, 56, 56)}


def _tables(text: int, anchors: int, d: int, grid: int = 64, seed: int = 0):
    """FluxPosEmbed tables of ``text`` text tokens (ids 0) then ``anchors`` scattered grid tokens."""
    ids = torch.zeros(text + anchors, 3)
    cells = torch.randperm(grid * grid, generator=gen(seed))[:anchors]
    ids[text:, 1] = (cells // grid).float()
    ids[text:, 2] = (cells % grid).float()
    try:
        from diffusers.models.transformers.transformer_flux import FluxPosEmbed
    except ImportError:  # a GPU machine without diffusers: the same tables
        from benchmarks.bench_attention import rope_tables

        return rope_tables(ids, AXES[d])
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=list(AXES[d]))(ids)
    return cos, sin


def _stock(q, k, v, cos, sin):
    """diffusers' FluxAttnProcessor core: apply_rotary_emb on q, k (sequence_dim=1), then SDPA."""
    from diffusers.models.embeddings import apply_rotary_emb

    qr = apply_rotary_emb(q, (cos, sin), sequence_dim=1)
    kr = apply_rotary_emb(k, (cos, sin), sequence_dim=1)
    out = F.scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).to(q.dtype)


def _close(got, want, dtype):
    assert_close(got.float(), want.float(), dtype, kind="attention")


# ---------------------------------------------------------------- the math


def test_rotary_ref_is_diffusers_apply_rotary_emb():
    from diffusers.models.embeddings import apply_rotary_emb

    q, _, _ = qkv(2, 9, 3, 32)
    cos, sin = _tables(3, 6, 32)
    torch.testing.assert_close(rotary_ref(q, cos, sin), apply_rotary_emb(q, (cos, sin), sequence_dim=1), rtol=0,
                               atol=1e-6)


@pytest.mark.parametrize("d", [32, 64, 128])
def test_reference_is_stock_flux_math(d):
    q, k, v = qkv(2, 37, 2, d)
    cos, sin = _tables(5, 32, d)
    torch.testing.assert_close(anchor_attention_ref(q, k, v, cos, sin), _stock(q, k, v, cos, sin), **tolerance(torch.float32, "attention"))


@pytest.mark.parametrize("device,backend", ALL)
@pytest.mark.parametrize("d,n,text", [(32, 37, 5), (64, 133, 4), (128, 67, 0), (32, 11, 11), (6, 9, 2)])
def test_matches_stock_and_reference(device, backend, d, n, text):
    # text == 0: anchor-only sequence; text == n: text-only (cos = 1, sin = 0); d = 6: not a power of 2.
    q, k, v = qkv(2, n, 3, d, seed=d + n)
    cos, sin = _tables(text, n - text, d) if d in AXES else (torch.rand(n, d), torch.rand(n, d))
    out = jk.anchor_attention(*on(device, q, k, v, cos, sin), backend=backend)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous() and out.device.type == device
    out = out.cpu()
    _close(out, anchor_attention_ref(q, k, v, cos, sin), torch.float32)
    _close(out, _stock(q, k, v, cos, sin), torch.float32)


@pytest.mark.parametrize("device,backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(device, backend, dtype):
    q, k, v = qkv(2, 45, 2, 32, dtype)
    cos, sin = _tables(4, 41, 32)
    out = jk.anchor_attention(*on(device, q, k, v, cos, sin), backend=backend).cpu()
    assert out.dtype == dtype
    _close(out, anchor_attention_ref(q, k, v, cos, sin), dtype)
    torch.testing.assert_close(out.float(), _stock(q, k, v, cos, sin).float(), **tolerance(dtype, "stock"))


@pytest.mark.parametrize("device,backend", ALL)
def test_scale_and_single_token(device, backend):
    q, k, v = qkv(1, 1, 1, 2)
    cos, sin = torch.rand(1, 2), torch.rand(1, 2)
    # One key: softmax is 1 whatever the scale, so the output is v.
    _close(jk.anchor_attention(*on(device, q, k, v, cos, sin), scale=3.0, backend=backend).cpu(), v, torch.float32)
    q, k, v = qkv(2, 20, 2, 32)
    cos, sin = _tables(4, 16, 32)
    _close(jk.anchor_attention(*on(device, q, k, v, cos, sin), scale=0.3, backend=backend).cpu(),
           anchor_attention_ref(q, k, v, cos, sin, scale=0.3), torch.float32)


@pytest.mark.parametrize("device,backend", KERNELS)
def test_strided_inputs(device, backend):
    # q, k, v as views of a fused qkv projection (unit channel stride), and a channel-strided q;
    # the views are taken on the device (moving a view would make it contiguous).
    b, n, h, d = 2, 29, 2, 32
    fused = torch.randn(b, n, 3, h, d, generator=gen(3))
    q, k, v = fused.unbind(2)
    qd, kd, vd = on(device, fused).unbind(2)
    cos, sin = _tables(3, n - 3, d)
    cd, sd = on(device, cos, sin)
    _close(jk.anchor_attention(qd, kd, vd, cd, sd, backend=backend).cpu(), anchor_attention_ref(q, k, v, cos, sin),
           torch.float32)
    base = torch.randn(b, n, d, h, generator=gen(4))
    qt, qtd = base.transpose(2, 3), on(device, base).transpose(2, 3)
    _close(jk.anchor_attention(qtd, kd, vd, cd, sd, backend=backend).cpu(), anchor_attention_ref(qt, k, v, cos, sin),
           torch.float32)


@pytest.mark.skipif(not HAS_CPP, reason="compiled extension not loaded")
@pytest.mark.parametrize("isa", ["avx2", "default"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_instruction_set_clones(monkeypatch, isa, dtype):
    # The C++ kernel is compiled for AVX-512, AVX2 and the baseline ISA; force the narrower ones.
    monkeypatch.setenv("JIT_KERNELS_ATTN_ISA", isa)
    q, k, v = qkv(2, 150, 2, 40, dtype)  # D = 40: the RD = 8 tiles plus a 2-wide tail on AVX-512
    cos, sin = torch.rand(150, 40), torch.rand(150, 40)
    lens = torch.tensor([150, 77])
    _close(jk.anchor_attention(q, k, v, cos, sin, lens, backend="cpp"),
           anchor_attention_ref(q, k, v, cos, sin, lens), dtype)


@pytest.mark.skipif(not HAS_CPP, reason="compiled extension not loaded")
def test_cpp_thread_count_does_not_change_results():
    q, k, v = qkv(2, 300, 3, 32)
    cos, sin = _tables(4, 296, 32)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = jk.anchor_attention(q, k, v, cos, sin, backend="cpp")
        torch.set_num_threads(2)
        two = jk.anchor_attention(q, k, v, cos, sin, backend="cpp")
    finally:
        torch.set_num_threads(prev)
    torch.testing.assert_close(one, two, rtol=0, atol=0)


# ---------------------------------------------------------------- padding and per-sample sets


# The padding below is NaN on purpose. The Triton interpreter evaluates the row max of padded
# query rows with numpy, which warns about the all-NaN slice; those rows are then written as zeros
# (asserted below), so the warning is expected and says nothing about valid rows.
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("device,backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_batch_equals_each_sample_alone(device, backend, dtype):
    # Three samples with anchor sets of different sizes, padded to one length; the padding
    # holds NaN, which must never reach a valid row (and padded rows come out zero).
    b, n, h, d, text = 3, 150, 2, 32, 4
    lens = torch.tensor([150, 61, 130])
    q, k, v = qkv(b, n, h, d, dtype, seed=7)
    cos, sin = _tables(text, n - text, d)
    for i, ln in enumerate(lens.tolist()):
        for t in (q, k, v):
            t[i, ln:] = float("nan")
    out = jk.anchor_attention(*on(device, q, k, v, cos, sin, lens), backend=backend).cpu()
    for i, ln in enumerate(lens.tolist()):
        alone = jk.anchor_attention(*on(device, q[i:i + 1, :ln], k[i:i + 1, :ln], v[i:i + 1, :ln], cos[:ln], sin[:ln]),
                                    backend=backend).cpu()
        _close(out[i:i + 1, :ln], alone, dtype)
        _close(out[i:i + 1, :ln], anchor_attention_ref(q[i:i + 1, :ln], k[i:i + 1, :ln], v[i:i + 1, :ln],
                                                       cos[:ln], sin[:ln]), dtype)
        assert bool((out[i, ln:] == 0).all())
    # Full lengths are the unpadded op; int32 lengths are accepted.
    full = torch.full((b,), n, dtype=torch.int32)
    q2, k2, v2 = qkv(b, n, h, d, dtype, seed=8)
    q2, k2, v2, cos, sin, full = on(device, q2, k2, v2, cos, sin, full)
    torch.testing.assert_close(jk.anchor_attention(q2, k2, v2, cos, sin, full, backend=backend),
                               jk.anchor_attention(q2, k2, v2, cos, sin, backend=backend), rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", ALL)
def test_per_sample_tables_and_lengths(device, backend):
    # Per-sample anchor sets: each sample has its own positions ([B, L, D] tables) and size.
    b, h, d, text = 3, 2, 32, 4
    counts = [140, 57, 96]
    n = text + max(counts)
    tabs = [_tables(text, n - text, d, seed=10 + i) for i in range(b)]
    cos = torch.stack([t[0] for t in tabs])
    sin = torch.stack([t[1] for t in tabs])
    lens = torch.tensor([text + c for c in counts])
    q, k, v = qkv(b, n, h, d, seed=11)
    out = jk.anchor_attention(*on(device, q, k, v, cos, sin, lens), backend=backend).cpu()
    _close(out, anchor_attention_ref(q, k, v, cos, sin, lens), torch.float32)
    for i, ln in enumerate(lens.tolist()):
        alone = anchor_attention_ref(q[i:i + 1, :ln], k[i:i + 1, :ln], v[i:i + 1, :ln], cos[i, :ln], sin[i, :ln])
        _close(out[i:i + 1, :ln], alone, torch.float32)
        _close(out[i:i + 1, :ln], _stock(q[i:i + 1, :ln], k[i:i + 1, :ln], v[i:i + 1, :ln], cos[i, :ln], sin[i, :ln]),
               torch.float32)
        assert bool((out[i, ln:] == 0).all())
    # A [B, L, D] table with identical rows is the shared [L, D] table.
    q, k, v, cos, sin = on(device, q, k, v, cos, sin)
    shared = jk.anchor_attention(q, k, v, cos[0], sin[0], backend=backend)
    torch.testing.assert_close(jk.anchor_attention(q, k, v, cos[:1].expand(b, -1, -1), sin[:1].expand(b, -1, -1),
                                                   backend=backend), shared, rtol=0, atol=0)


# ---------------------------------------------------------------- opcheck and errors


def _op_args(lengths: bool, per_sample: bool = False):
    q, k, v = qkv(2, 19, 2, 16)
    shape = (2, 19, 16) if per_sample else (19, 16)
    cos, sin = torch.rand(*shape), torch.rand(*shape)
    return (q, k, v, cos, sin, torch.tensor([19, 7]) if lengths else None, 0.25)


@pytest.mark.parametrize("lengths,per_sample", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("backend", COMPILED)
def test_opcheck(backend, lengths, per_sample):
    op = torch.ops.jit_kernels.anchor_attention_triton if backend == "triton" else torch.ops.jit_kernels.anchor_attention
    torch.library.opcheck(op.default, _op_args(lengths, per_sample))


def test_schema_and_triton_twin():
    main = torch.ops.jit_kernels.anchor_attention.default._schema
    tri = torch.ops.jit_kernels.anchor_attention_triton.default._schema
    assert [a.name for a in tri.arguments] == [a.name for a in main.arguments]
    assert [str(a.type) for a in tri.arguments] == [str(a.type) for a in main.arguments]
    from jit_kernels import triton as T
    from jit_kernels.triton import aot

    assert "_anchor_attention_fwd_kernel" in aot.KERNELS["attention"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("jit_kernels::anchor_attention", "CUDA")
    assert "anchor_attention" in T.CUDA_ROUTABLE and jk._library.OPS["anchor_attention"].cuda_via_triton


def _bad_cases():
    q, k, v = qkv(2, 10, 2, 8)
    cos, sin = torch.rand(10, 8), torch.rand(10, 8)
    lens = torch.tensor([10, 4])
    return [
        ("q rank", lambda be: jk.anchor_attention(q[0], k, v, cos, sin, backend=be), ValueError, r"q must be \[B, L, H, D\]"),
        ("q dtype", lambda be: jk.anchor_attention(q.double(), k, v, cos, sin, backend=be), TypeError, r"q must be float32"),
        ("q int", lambda be: jk.anchor_attention(q.long(), k, v, cos, sin, backend=be), TypeError, r"q must be float32"),
        ("not a tensor", lambda be: jk.anchor_attention(q, k.tolist(), v, cos, sin, backend=be), TypeError,
         r"k must be a torch.Tensor"),
        ("k shape", lambda be: jk.anchor_attention(q, k[:, :9], v, cos, sin, backend=be), ValueError, r"k .* must match q"),
        ("v dtype", lambda be: jk.anchor_attention(q, k, v.half(), cos, sin, backend=be), TypeError, r"share one dtype"),
        ("odd D", lambda be: jk.anchor_attention(q[..., :7], k[..., :7], v[..., :7], cos[:, :7], sin[:, :7], backend=be),
         ValueError, r"D must be even"),
        ("cos shape", lambda be: jk.anchor_attention(q, k, v, cos[:9], sin, backend=be), ValueError, r"cos must be \[L, D\]"),
        ("cos batch", lambda be: jk.anchor_attention(q, k, v, cos.expand(3, 10, 8), sin, backend=be), ValueError,
         r"or \[B, L, D\] = \[2, 10, 8\]"),
        ("cos/sin rank", lambda be: jk.anchor_attention(q, k, v, cos.expand(2, 10, 8), sin, backend=be), ValueError,
         r"cos and sin must both be"),
        ("sin dtype", lambda be: jk.anchor_attention(q, k, v, cos, sin.long(), backend=be), TypeError,
         r"sin must be a floating tensor"),
        ("lengths dtype", lambda be: jk.anchor_attention(q, k, v, cos, sin, lens.float(), backend=be), TypeError,
         r"key_lengths must be int32 or int64"),
        ("lengths shape", lambda be: jk.anchor_attention(q, k, v, cos, sin, lens[:1], backend=be), ValueError,
         r"key_lengths must be \[B\]"),
        ("lengths zero", lambda be: jk.anchor_attention(q, k, v, cos, sin, torch.tensor([10, 0]), backend=be), IndexError,
         r"key_lengths has value.* outside \[1, 10\]"),
        ("lengths high", lambda be: jk.anchor_attention(q, k, v, cos, sin, torch.tensor([11, 3]), backend=be), IndexError,
         r"key_lengths has value.* outside \[1, 10\]"),
        ("scale", lambda be: jk.anchor_attention(q, k, v, cos, sin, scale=-1.0, backend=be), ValueError, r"scale must be"),
        ("scale nan", lambda be: jk.anchor_attention(q, k, v, cos, sin, scale=float("nan"), backend=be), ValueError,
         r"scale must be finite"),
    ]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_inputs(backend):
    for name, call, exc, msg in _bad_cases():
        with pytest.raises(exc, match=msg):
            call(backend)


def test_unknown_and_unavailable_backend():
    q, k, v = qkv(1, 4, 1, 4)
    cos, sin = torch.rand(4, 4), torch.rand(4, 4)
    with pytest.raises(ValueError, match="unknown backend"):
        jk.anchor_attention(q, k, v, cos, sin, backend="fast")
    with pytest.raises(jk.BackendUnavailableError):
        jk.anchor_attention(q, k, v, cos, sin, backend="cuda")


@pytest.mark.skipif(not HAS_CPP, reason="compiled extension not loaded")
def test_cpp_kernel_checks_its_own_inputs():
    # Called directly (no Python validation): the C++ TORCH_CHECKs raise before any work.
    ops = torch.ops.jit_kernels
    q, k, v, cos, sin, lens, s = _op_args(True)
    cases = [
        (lambda: ops.anchor_attention(q[0], k, v, cos, sin, lens, s), ValueError, r"q must be \[B, L, H, D\]"),
        (lambda: ops.anchor_attention(q, k.double(), v, cos, sin, lens, s), TypeError, r"k must be float32"),
        (lambda: ops.anchor_attention(q, k, v.half(), cos, sin, lens, s), TypeError, r"share one dtype"),
        (lambda: ops.anchor_attention(q, k[:, :3], v, cos, sin, lens, s), ValueError, r"must match q"),
        (lambda: ops.anchor_attention(q[..., :15], k[..., :15], v[..., :15], cos[:, :15], sin[:, :15], lens, s),
         ValueError, r"D must be even"),
        (lambda: ops.anchor_attention(q, k, v, cos[:3], sin, lens, s), ValueError, r"cos must be \[L, D\]"),
        (lambda: ops.anchor_attention(q, k, v, cos.expand(2, 19, 16), sin, lens, s), ValueError,
         r"cos and sin must both be"),
        (lambda: ops.anchor_attention(q, k, v, cos, sin.long(), lens, s), TypeError, r"sin must be a floating"),
        (lambda: ops.anchor_attention(q, k, v, cos, sin, lens.int(), s), TypeError, r"key_lengths must be int64"),
        (lambda: ops.anchor_attention(q, k, v, cos, sin, lens[:1], s), ValueError, r"key_lengths must be \[B\]"),
        (lambda: ops.anchor_attention(q, k, v, cos, sin, torch.tensor([20, 1]), s), IndexError, r"outside \[1, 19\]"),
        (lambda: ops.anchor_attention(q, k, v, cos, sin, torch.tensor([0, 1]), s), IndexError, r"outside \[1, 19\]"),
        (lambda: ops.anchor_attention(q, k, v, cos, sin, lens, 0.0), ValueError, r"scale must be finite and > 0"),
    ]
    for call, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            call()


def test_torch_compile_fullgraph():
    q, k, v, cos, sin, lens, _ = _op_args(True)
    want = jk.anchor_attention(q, k, v, cos, sin, lens)  # eager first: resolves (and caches) the backend
    fn = torch.compile(lambda *a: jk.anchor_attention(*a), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(q, k, v, cos, sin, lens), want)


# ---------------------------------------------------------------- GPU (compiled Triton)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [32, 64, 128])
def test_gpu_matches_reference(dtype, d):
    b, n, h = 2, 600, 3
    q, k, v = (t.cuda() for t in qkv(b, n, h, d, dtype))
    cos, sin = (t.cuda() for t in _tables(7, n - 7, d))
    lens = torch.tensor([600, 333], device="cuda")
    want = anchor_attention_ref(q, k, v, cos, sin, lens)
    for be in [x for x in ("cuda", "triton") if x in jk.available_backends("cuda")]:
        got = jk.anchor_attention(q, k, v, cos, sin, lens, backend=be)
        _close(got, want, dtype)
        assert bool((got[1, 333:] == 0).all())


# ---------------------------------------------------------------- the two Triton kernels (JIT_KERNELS_ATTN_VARIANT)
#
# The kernel runs below go through the Triton interpreter on a CPU-only machine: the parity tests are
# marked slow, the plumbing of the variant choice is not.


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


@pytest.mark.slow
@needs_runner
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("blocks", [None, SMALL], ids=["heuristic", "small"])
def test_shared_tables_match_reference(variant, dtype, blocks):
    q, k, v = qkv(2, 37, 3, 16, dtype, seed=3)
    cos, sin = _pair_tables(37, 16)
    assert_close(_run(variant, q, k, v, cos, sin, blocks=blocks).float(), _ref(q, k, v, cos, sin).float(),
                 dtype, kind="attention")


@pytest.mark.slow
@needs_runner
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


@pytest.mark.slow
@needs_runner
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


@pytest.mark.slow
@needs_runner
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("d", [2, 6, 40, 128])
def test_head_dims(variant, d):
    # D = 2 (one pair), D not a power of two (v2 zero-pads its copies to 16 / 64), FLUX's 128.
    q, k, v = qkv(1, 21, 2, d, torch.float32, seed=d)
    cos, sin = _pair_tables(21, d)
    lengths = torch.tensor([17])
    assert_close(_run(variant, q, k, v, cos, sin, lengths, blocks=SMALL),
                 _ref(q, k, v, cos, sin, lengths), torch.float32, kind="attention")


@pytest.mark.slow
@needs_runner
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t)[6:])
def test_variants_agree(dtype):
    # Same math, different tiling: within the attention tolerance of each other, with a custom scale.
    q, k, v = qkv(2, 33, 2, 32, dtype, seed=7)
    cos, sin = _pair_tables(33, 32, seed=8)
    a = _run("v1", q, k, v, cos, sin, scale=0.3)
    b = _run("v2", q, k, v, cos, sin, scale=0.3, blocks=SMALL)
    assert_close(b.float(), a.float(), dtype, kind="attention")
    assert_close(b.float(), _ref(q, k, v, cos, sin, scale=0.3).float(), dtype, kind="attention")


@needs_runner
def test_public_op_runs_the_default_variant_and_matches_reference():
    q, k, v = qkv(2, 19, 2, 16, torch.bfloat16, seed=9)
    cos, sin = _pair_tables(19, 16)
    lengths = torch.tensor([19, 5])
    out = jk.anchor_attention(*(t.to(DEV) for t in (q, k, v, cos, sin, lengths)), backend="triton").cpu()
    assert torch.equal(out, _run(ta.DEFAULT_VARIANT, q, k, v, cos, sin, lengths))
    assert_close(out.float(), _ref(q, k, v, cos, sin, lengths).float(), torch.bfloat16, kind="attention")


@pytest.mark.slow
@needs_runner
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


@pytest.mark.slow
@needs_runner
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


@pytest.mark.slow
@needs_runner
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


@pytest.mark.slow
@needs_runner
@pytest.mark.parametrize("variant", VARIANTS)
def test_same_inputs_same_bits(variant):
    q, k, v = qkv(1, 25, 2, 16, torch.bfloat16, seed=14)
    cos, sin = _pair_tables(25, 16)
    a = _run(variant, q, k, v, cos, sin, blocks=SMALL)
    b = _run(variant, q, k, v, cos, sin, blocks=SMALL)
    assert torch.equal(a, b)


@needs_runner
def test_bad_variant_and_blocks_raise_before_launch():
    q, k, v = qkv(1, 4, 1, 4)
    cos, sin = _pair_tables(4, 4)
    with pytest.raises(ValueError, match="variant"):
        ta.anchor_attention_forward(q, k, v, cos, sin, None, 0.5, variant="v3")
    for blocks in ((8, 16, 4, 1), (16, 24, 4, 1), (16, 16, 3, 1), (16, 16, 4, 0)):
        with pytest.raises(ValueError, match="blocks"):
            ta.anchor_attention_forward(q, k, v, cos, sin, None, 0.5, variant="v2", blocks=blocks)


@needs_runner
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


@needs_runner
def test_attention_variant_env(monkeypatch):
    monkeypatch.delenv(_env.ATTN_VARIANT, raising=False)
    assert _env.attention_variant() == "v2"
    for raw, want in (("v1", "v1"), (" V2 ", "v2"), ("", "v2")):
        monkeypatch.setenv(_env.ATTN_VARIANT, raw)
        assert _env.attention_variant() == want
    monkeypatch.setenv(_env.ATTN_VARIANT, "flash")
    with pytest.raises(ValueError, match="expected one of v1, v2"):
        _env.attention_variant()


@pytest.mark.slow
@needs_runner
def test_env_variable_is_read_at_import():
    env = dict(os.environ, **{_env.ATTN_VARIANT: "v1"})
    code = "from jit_kernels.triton import attention as a; print(a.DEFAULT_VARIANT)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "v1"


@needs_runner
def test_v2_tile_heuristic_on_a_gpu():
    # The configs the sm_90 lowering checks (jit_kernels.triton.aot records these launches).
    blocks = lambda n, b, dtype=torch.bfloat16: ta.attention_blocks_v2(  # noqa: E731
        128, dtype, programs=-(-n // 128) * b * 24, sms=132, interpret=False)
    assert blocks(512 + 1310, 1) == (64, 64, 4, 3)  # 360 programs of 128 rows: under 3 waves
    assert blocks(512 + 1310, 2) == blocks(512 + 4096, 1) == (128, 64, 8, 3)
    assert blocks(512 + 4096, 1, torch.float32) == (64, 16, 8, 2)
    assert ta.attention_blocks_v2(32, torch.bfloat16, interpret=False) == (128, 64, 8, 3)
    assert ta.attention_blocks_v2(256, torch.float16, interpret=False) == (64, 32, 4, 2)


@needs_runner
def test_bench_variant_fns_time_both_kernels_and_the_sweep():
    from benchmarks.bench_attention import V2_SWEEP, variant_fns

    q, k, v = (t.to(DEV) for t in qkv(1, 20, 2, 16, torch.float32, seed=15))
    cos, sin = (t.to(DEV) for t in _pair_tables(20, 16))
    fns = variant_fns(q, k, v, cos, sin, sweep=True)
    assert list(fns)[:2] == ["triton_v1", "triton_v2"] and len(fns) == 2 + len(V2_SWEEP)
    want = _ref(q.cpu(), k.cpu(), v.cpu(), cos.cpu(), sin.cpu())
    for name in ("triton_v1", "triton_v2", list(fns)[-1]):
        assert_close(fns[name]().cpu(), want, torch.float32, kind="attention")


@pytest.mark.slow
@needs_runner
@pytest.mark.skipif(torch.cuda.is_available() or not TRITON_INTERPRET, reason="the dry run of the kit (CPU only)")
def test_gpu_kit_bench_section_times_both_variants(tmp_path):
    from benchmarks import gpu_check as gc

    assert gc.main(["--dry-run", "--section", "bench", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["bench"]["attention"]
    assert rows and all(r["triton_v1_ms"][1] > 0 and r["triton_v2_ms"][1] > 0 for r in rows)
    assert all("x_vs_stock_triton_v2" in r for r in rows)
