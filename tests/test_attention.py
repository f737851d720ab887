"""anchor_attention: the op on every backend against the reference and diffusers' math,
padding / per-sample semantics, errors, opcheck and the C++-only paths. The FLUX attention
processor built on it is tested in test_attention_processor.py.

The op tests run on every (device, backend) pair of :func:`jit_kernels.testing.device_backends`:
Triton on CPU only through its interpreter (``TRITON_INTERPRET=1``, set in conftest), compiled
on CUDA tensors by the ``gpu``-marked ``cuda-*`` params on a CUDA machine (and lowered for sm_90
by ``tests/test_triton_kernels.py::test_aot_lowers_every_kernel``). Results are compared on
the CPU, against the reference run on the CPU tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import jit_kernels as jk
from jit_kernels.reference.attention import anchor_attention_ref, rotary_ref
from jit_kernels.testing import assert_close, device_backends, gen, on, qkv, tolerance

CPU_BACKENDS = [b for b in ("reference", "cpp", "triton") if b in jk.available_backends("cpu")]
COMPILED = [b for b in ("cpp", "triton") if b in CPU_BACKENDS]
HAS_CPP = "cpp" in CPU_BACKENDS
# (device, backend) params: every backend with the reference; the kernels only.
ALL = device_backends(("reference", "cuda", "cpp", "triton"))
KERNELS = device_backends(("cuda", "cpp", "triton"))

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
