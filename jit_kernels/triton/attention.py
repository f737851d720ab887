"""Triton ``anchor_attention``: rotary + flash-attention forward (``launch_anchor_attention``).

Two kernels, chosen by ``$JIT_KERNELS_ATTN_VARIANT`` (read once, at import; ``v2`` when unset)
or per call through :func:`anchor_attention_forward`:

- ``v2`` (default): rotate q and k once into a scratch copy (``_rotate_qk_fwd_kernel``), then
  a software-pipelined flash loop over it (``_anchor_attention_v2_fwd_kernel``); see the
  "v2" section below for why.
- ``v1``: one kernel that rotates in registers (``_anchor_attention_fwd_kernel``), described here.

v1: one program per (block of ``BLOCK_M`` queries, sample x head). The rotation is applied
to the q tile once and to every k tile as it is loaded, in registers: no rotated copy of
q or k is written. The rotary pairs are interleaved (``x[2i], x[2i+1]``), so q and k are
loaded as their even and odd channel halves; ``rot(q) . rot(k)`` is then the sum of two
``tl.dot`` over ``D / 2`` channels each (even . even + odd . odd), with no shuffles.
Online softmax in base 2 (``scale * log2(e)`` folded into q), fp32 accumulation.

Key lengths: keys at positions ``>= key_lengths[b]`` are masked and never loaded past the
last valid block; padded query rows store zeros.

Dot operand dtype: fp32 inputs use ``input_precision="ieee"`` (full fp32, like the other
backends; TF32 would cost ~1e-3 relative); fp16 inputs use fp16; bf16 inputs use bf16 on a
GPU and fp32 under ``TRITON_INTERPRET=1`` (bf16 ``tl.dot`` operands give garbage there).
Triton is tested on CPU only through the interpreter.

Why Triton serves CUDA here (no CUDA C++ kernel): a hand-written CUDA attention kernel
that competes with this one needs tensor-core MMA tiles (``mma.sync``/``wgmma``), async
copies and a pipelined schedule per architecture, i.e. FlashAttention's code base; Triton
generates exactly that from this tile-level description for every arch it supports, and
its sm_90 lowering is checked in CI (``python -m jit_kernels.triton.aot``). The op is
routed to this launcher for CUDA tensors (its row of ``jit_kernels._library.OPS`` says ``cuda_via_triton``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._env import attention_variant
from . import common
from .common import INTERPRET, cast, f32, spans, sub

__all__ = ["launch_anchor_attention", "anchor_attention_forward", "attention_blocks", "attention_blocks_v2",
           "rotate_qk", "DEFAULT_VARIANT"]

_LOG2E = 1.4426950408889634


def attention_blocks(d: int, dtype: torch.dtype = torch.bfloat16, interpret: bool = INTERPRET) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` for head dim ``d`` and input ``dtype``.

    Measured on an H100 (bf16, 512 text + 1310..4096 anchors, benchmarks/NOTES.md): with
    software pipelining (``num_stages`` 2-3) the kernel ran at 13-25 TFLOP/s whatever the
    tile; with ``num_stages=1`` it reached 140 TFLOP/s at 24 x 128 heads (128 x 64 tiles,
    8 warps) and 74 at 4 x 32 (64 x 64 tiles, 4 warps). The k tile is rotated in registers
    before the dot, so it cannot be streamed into shared memory by the pipeliner anyway;
    single-stage tiles leave room for more resident programs. fp32 (full-precision dots,
    twice the registers per operand) takes 64 x 32 tiles, 64 x 16 with 8 warps at D >= 128:
    the sm_90 lowering then has no spills (64 x 32 spilled 764 B at D = 128). Interpreter:
    every program instance costs ~0.6 ms of Python, so big tiles.
    """
    if interpret:
        return 128, 128, 4, 1
    if dtype == torch.float32:
        return (64, 16, 8, 1) if d >= 128 else (64, 32, 4, 1)
    if d >= 128:
        return 128, 64, 8, 1
    return 64, 64, 4, 1


@triton.jit
def _anchor_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, len_ptr, out_ptr,
    L, H, D, HALF, qmul,
    sq_b, sq_l, sq_h,
    sk_b, sk_l, sk_h,
    sv_b, sv_l, sv_h,
    sc_b, sc_l,
    so_b, so_l, so_h,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LENS: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
):
    """out[b, i, h] = sum_j softmax_j(qmul * rot(q_i) . rot(k_j)) v_j  (base-2 softmax, j < length[b])."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if HAS_LENS:
        # Clamped to [0, L]: a stale length never loads keys past L (its rows are unspecified).
        length = tl.minimum(tl.maximum(tl.load(len_ptr + b), 0), L).to(tl.int32)
    else:
        length = L
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    half = tl.arange(0, BLOCK_HALF)
    dcol = tl.arange(0, BLOCK_D)
    rvalid = rows < length
    hmask = half < HALF
    qm = rvalid[:, None] & hmask[None, :]

    # q tile [BLOCK_M, HALF] x (even, odd), rotated and scaled in fp32.
    q_rows = q_ptr + b * sq_b + h * sq_h + rows[:, None].to(tl.int64) * sq_l
    qe = f32(tl.load(q_rows + 2 * half[None, :], mask=qm, other=0.0))
    qo = f32(tl.load(q_rows + 2 * half[None, :] + 1, mask=qm, other=0.0))
    cos_ptr += b * sc_b  # per-sample tables ([B, L, D]); sc_b = 0 when shared
    sin_ptr += b * sc_b
    t_rows = rows[:, None] * sc_l + 2 * half[None, :]
    ce = tl.load(cos_ptr + t_rows, mask=qm, other=0.0)
    co = tl.load(cos_ptr + t_rows + 1, mask=qm, other=0.0)
    se = tl.load(sin_ptr + t_rows, mask=qm, other=0.0)
    so = tl.load(sin_ptr + t_rows + 1, mask=qm, other=0.0)
    qre = ((qe * ce - qo * se) * qmul).to(DOT_DTYPE)
    qro = ((qo * co + qe * so) * qmul).to(DOT_DTYPE)

    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)  # finite: exp2(m_old - m_new) stays defined
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # Padded query blocks do no work (and store zeros below).
    n_end = tl.where(pid_m * BLOCK_M < length, length, 0)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    for start in range(0, n_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cvalid = cols < length
        km = hmask[:, None] & cvalid[None, :]
        # k tile loaded transposed, [HALF, BLOCK_N] x (even, odd), rotated in registers.
        k_cols = k_base + cols[None, :].to(tl.int64) * sk_l + 2 * half[:, None]
        ke = f32(tl.load(k_cols, mask=km, other=0.0))
        ko = f32(tl.load(k_cols + 1, mask=km, other=0.0))
        t_cols = cols[None, :] * sc_l + 2 * half[:, None]
        kce = tl.load(cos_ptr + t_cols, mask=km, other=0.0)
        kco = tl.load(cos_ptr + t_cols + 1, mask=km, other=0.0)
        kse = tl.load(sin_ptr + t_cols, mask=km, other=0.0)
        kso = tl.load(sin_ptr + t_cols + 1, mask=km, other=0.0)
        kre = (ke * kce - ko * kse).to(DOT_DTYPE)
        kro = (ko * kco + ke * kso).to(DOT_DTYPE)
        if IEEE:
            s = tl.dot(qre, kre, input_precision="ieee") + tl.dot(qro, kro, input_precision="ieee")
        else:
            s = tl.dot(qre, kre) + tl.dot(qro, kro)
        s = tl.where(cvalid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vm = cvalid[:, None] & (dcol < D)[None, :]
        vt = tl.load(v_base + cols[:, None].to(tl.int64) * sv_l + dcol[None, :], mask=vm, other=0.0)
        vt = f32(vt).to(DOT_DTYPE)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), vt, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), vt)
        m_i = m_new

    res = acc / tl.where(rvalid, l_i, 1.0)[:, None]
    res = tl.where(rvalid[:, None], res, 0.0)
    om = (rows < L)[:, None] & (dcol < D)[None, :]
    dst = out_ptr + b * so_b + h * so_h + rows[:, None].to(tl.int64) * so_l + dcol[None, :]
    tl.store(dst, cast(res, out_ptr.dtype.element_ty), mask=om)


def _dot_dtype(dtype: torch.dtype):
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not INTERPRET:
        return tl.bfloat16
    return tl.float32


_TORCH_DOT = {tl.float16: torch.float16, tl.bfloat16: torch.bfloat16, tl.float32: torch.float32}


# ---------------------------------------------------------------- v2: rotate once, then a pipelined flash loop
#
# v1 (above) rotates every k tile in registers inside the attention loop. That costs, per
# (query block, head) program and per k tile, four fp32 table loads of [BLOCK_N, D/2]: the
# tables are 2/3 of the loop's memory traffic, they are re-read by every query block of every
# head, and the rotated k lives in registers, so Triton's pipeliner cannot stream k into shared
# memory ahead of the dot (v1 measured its best with num_stages=1).
#
# v2 splits the work in two launches:
#
# 1. ``_rotate_qk_fwd_kernel``: one pass over q and k that writes rot(q) * qmul and rot(k) in the
#    dot dtype to a head-major scratch ``[2, B, H, L, DP]`` (DP = D rounded up to a power of two
#    >= 16, zero padded). A program holds BLOCK_L tokens of one sample: it loads their cos/sin
#    rows once and applies them to a group of up to 8 heads, so the tables are read 3 times per
#    token at 24 heads instead of once per (query block, head, token). Pair-repeated (FLUX)
#    tables or not makes no difference, so there is no detection (which would need a host sync
#    per forward: FluxTransformer2DModel computes fresh tables in every forward) and no fallback.
#    The values written are exactly the dot operands v1 computes in registers (fp32 rotation,
#    qmul folded into q, then one rounding to the dot dtype).
# 2. ``_anchor_attention_v2_fwd_kernel``: a plain flash-attention forward on those copies (one
#    D-wide dot per tile instead of two D/2-wide ones, contiguous [BLOCK_N, DP] k tiles, unmasked
#    loads for every full k block and one masked tail block), with the k/v loop software-
#    pipelined (``tl.range(..., num_stages=STAGES)``).
#
# Extra traffic of step 1: read q, k and write their copies once, ~4 * B * L * H * D * 2 bytes
# in bf16 (113 MB at 4608 tokens x 24 x 128: ~25-30 us at H200 bandwidth, against ~0.7 ms of
# attention), less than diffusers' stock rotary moves for the same copies (several fp32 passes).


@triton.jit
def _rotate_qk_fwd_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, rot_ptr,
    L, H, D, HG, n_groups, qmul,
    sq_b, sq_l, sq_h,
    sk_b, sk_l, sk_h,
    sc_b, sc_l,
    sr_t, sr_b, sr_h,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """rot[0, b, h, i] = rot(q[b, i, h]) * qmul, rot[1, b, h, i] = rot(k[b, i, h]) (rows of DP = BLOCK_D).

    ``rot(x)[2j] = x[2j] cos[2j] - x[2j+1] sin[2j]``, ``rot(x)[2j+1] = x[2j+1] cos[2j+1] + x[2j] sin[2j+1]``
    (diffusers' ``apply_rotary_emb``, interleaved pairs) in fp32; padding channels are written as 0.
    Program (token block, sample x group of ``HG`` heads): the table rows are loaded once per group.
    """
    pid = tl.program_id(0)
    bg = tl.program_id(1)
    b = (bg // n_groups).to(tl.int64)
    h0 = (bg % n_groups) * HG
    rows = pid * BLOCK_L + tl.arange(0, BLOCK_L)
    dcol = tl.arange(0, BLOCK_D)
    partner = dcol ^ 1  # the other channel of the pair
    sign = tl.where((dcol % 2) == 0, -1.0, 1.0)
    rvalid = rows < L
    m = rvalid[:, None] & (dcol < D)[None, :]
    r64 = rows[:, None].to(tl.int64)
    t_off = b * sc_b + r64 * sc_l + dcol[None, :]
    c = tl.load(cos_ptr + t_off, mask=m, other=0.0)
    sn = tl.load(sin_ptr + t_off, mask=m, other=0.0) * sign[None, :]
    wm = rvalid[:, None] & (dcol < BLOCK_D)[None, :]
    # Row pointers of head h0, advanced by one head per iteration (64-bit: no int32 head offsets).
    hb = h0.to(tl.int64)
    q_row = q_ptr + b * sq_b + hb * sq_h + r64 * sq_l
    k_row = k_ptr + b * sk_b + hb * sk_h + r64 * sk_l
    dst = rot_ptr + b * sr_b + hb * sr_h + r64 * BLOCK_D + dcol[None, :]
    for _ in range(h0, tl.minimum(h0 + HG, H)):
        x = f32(tl.load(q_row + dcol[None, :], mask=m, other=0.0))
        xp = f32(tl.load(q_row + partner[None, :], mask=m, other=0.0))
        rq = (x * c + xp * sn) * qmul
        x = f32(tl.load(k_row + dcol[None, :], mask=m, other=0.0))
        xp = f32(tl.load(k_row + partner[None, :], mask=m, other=0.0))
        rk = x * c + xp * sn
        tl.store(dst, cast(rq, rot_ptr.dtype.element_ty), mask=wm)
        tl.store(dst + sr_t, cast(rk, rot_ptr.dtype.element_ty), mask=wm)
        q_row += sq_h
        k_row += sk_h
        dst += sr_h


@triton.jit
def _flash_tile(acc, l_i, m_i, q, q2, k_base, v_base, start, length, sv_l, D,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr,
                DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, V_IS_DOT: tl.constexpr, SPLIT: tl.constexpr):
    """One k/v tile of the online softmax; ``MASKED``: keys at or past ``length`` are excluded.

    ``SPLIT``: ``q`` and ``q2`` are the two channel halves of the q tile and ``q . k`` is two dots
    over ``BLOCK_D / 2`` channels (fp32 FMA dots: a thread holds whole reduction rows of its
    operands, and a 128-wide one spilled on sm_90); otherwise ``q`` is the whole tile.
    """
    cols = start + tl.arange(0, BLOCK_N)
    dcol = tl.arange(0, BLOCK_D)
    c64 = cols.to(tl.int64)
    v_ptrs = v_base + c64[:, None] * sv_l + dcol[None, :]
    if SPLIT:
        kd = tl.arange(0, BLOCK_D // 2)
    else:
        kd = dcol
    k_ptrs = k_base + c64[None, :] * BLOCK_D + kd[:, None]  # [BLOCK_D (/2), BLOCK_N], rows of DP contiguous
    if MASKED:
        cvalid = cols < length
        kt = tl.load(k_ptrs, mask=cvalid[None, :], other=0.0)
        vt = tl.load(v_ptrs, mask=cvalid[:, None] & (dcol < D)[None, :], other=0.0)
        if SPLIT:
            kt2 = tl.load(k_ptrs + BLOCK_D // 2, mask=cvalid[None, :], other=0.0)
    else:
        kt = tl.load(k_ptrs)
        if EVEN_D:
            vt = tl.load(v_ptrs)
        else:
            vt = tl.load(v_ptrs, mask=(dcol < D)[None, :], other=0.0)
        if SPLIT:
            kt2 = tl.load(k_ptrs + BLOCK_D // 2)
    if IEEE:
        s = tl.dot(q, kt, input_precision="ieee")
        if SPLIT:
            s += tl.dot(q2, kt2, input_precision="ieee")
    else:
        s = tl.dot(q, kt)
        if SPLIT:
            s += tl.dot(q2, kt2)
    if MASKED:
        s = tl.where(cvalid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if not V_IS_DOT:
        vt = f32(vt).to(DOT_DTYPE)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), vt, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), vt)
    return acc, l_i, m_new


@triton.jit
def _anchor_attention_v2_fwd_kernel(
    rot_ptr, v_ptr, len_ptr, out_ptr,
    L, H, D,
    sr_t, sr_b, sr_h,
    sv_b, sv_l, sv_h,
    so_b, so_l, so_h,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
    HAS_LENS: tl.constexpr, EVEN_D: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
    V_IS_DOT: tl.constexpr, SPLIT: tl.constexpr,
):
    """out[b, i, h] = sum_j softmax_j(rq_i . rk_j) v_j (base 2, j < length[b]) on the rotated copies."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    if HAS_LENS:
        # Clamped to [0, L]: a stale length never loads keys past L (its rows are unspecified).
        length = tl.minimum(tl.maximum(tl.load(len_ptr + b), 0), L).to(tl.int32)
    else:
        length = L
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcol = tl.arange(0, BLOCK_D)
    q_base = rot_ptr + b * sr_b + h * sr_h
    k_base = q_base + sr_t
    v_base = v_ptr + b * sv_b + h * sv_h
    q_rows = q_base + rows[:, None].to(tl.int64) * BLOCK_D
    if SPLIT:
        qd = tl.arange(0, BLOCK_D // 2)
        q = tl.load(q_rows + qd[None, :], mask=(rows < L)[:, None], other=0.0)
        q2 = tl.load(q_rows + BLOCK_D // 2 + qd[None, :], mask=(rows < L)[:, None], other=0.0)
    else:
        q = tl.load(q_rows + dcol[None, :], mask=(rows < L)[:, None], other=0.0)
        q2 = q

    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)  # finite: exp2(m_old - m_new) stays defined
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # Padded query blocks do no work (and store zeros below).
    n_end = tl.where(pid_m * BLOCK_M < length, length, 0)
    if SPLIT:
        # fp32: one loop, every tile masked (a second copy of the tile code for the tail kept
        # more values live across the loop: 756 B of spills at D = 128 on sm_90).
        for start in tl.range(0, n_end, BLOCK_N, num_stages=STAGES):
            acc, l_i, m_i = _flash_tile(acc, l_i, m_i, q, q2, k_base, v_base, start, length, sv_l, D,
                                        BLOCK_N, BLOCK_D, True, EVEN_D, DOT_DTYPE, IEEE, V_IS_DOT, SPLIT)
    else:
        # Every full k block unmasked, then at most one masked tail block.
        n_full = (n_end // BLOCK_N) * BLOCK_N
        for start in tl.range(0, n_full, BLOCK_N, num_stages=STAGES):
            acc, l_i, m_i = _flash_tile(acc, l_i, m_i, q, q2, k_base, v_base, start, length, sv_l, D,
                                        BLOCK_N, BLOCK_D, False, EVEN_D, DOT_DTYPE, IEEE, V_IS_DOT, SPLIT)
        if n_full < n_end:
            acc, l_i, m_i = _flash_tile(acc, l_i, m_i, q, q2, k_base, v_base, n_full, length, sv_l, D,
                                        BLOCK_N, BLOCK_D, True, EVEN_D, DOT_DTYPE, IEEE, V_IS_DOT, SPLIT)

    rvalid = rows < length
    res = acc / tl.where(rvalid, l_i, 1.0)[:, None]
    res = tl.where(rvalid[:, None], res, 0.0)
    om = (rows < L)[:, None] & (dcol < D)[None, :]
    dst = out_ptr + b * so_b + h * so_h + rows[:, None].to(tl.int64) * so_l + dcol[None, :]
    tl.store(dst, cast(res, out_ptr.dtype.element_ty), mask=om)


def attention_blocks_v2(d: int, dtype: torch.dtype = torch.bfloat16, programs: int | None = None,
                        sms: int = 132, interpret: bool = INTERPRET) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of the v2 attention kernel (not yet measured on a GPU).

    fp16/bf16, D <= 128: 128 x 64 tiles, 8 warps (two warpgroups of 64 rows for Hopper's
    wgmma), 3 stages (q 32 KB + 2 in-flight k/v tiles of 16 KB each, well inside sm_90's
    227 KB); when that gives fewer than ~3 waves of programs (``programs``: query blocks of
    128 x B x H; ``sms`` multiprocessors), e.g. FLUX's 512 + 1310 tokens x 24 heads at batch 1
    (15 x 24 = 360 programs on 132 SMs), 64-row tiles with 4 warps halve the tail wave. D > 128
    takes 64 x 32 tiles. fp32 (full-precision FMA dots, no tensor cores) takes v1's tiles with 2
    stages (104 registers at D = 128, no spills; 64 x 32 tiles needed 236). The sm_90 lowering of each is in ``python -m jit_kernels.triton.aot``. Interpreter:
    big tiles (every program instance costs Python time).
    """
    if interpret:
        return 128, 128, 4, 1
    if dtype == torch.float32:
        return (64, 16, 8, 2) if d >= 128 else (64, 32, 4, 2)
    if d > 128:
        return 64, 32, 4, 2
    if programs is not None and programs < 3 * sms:
        return 64, 64, 4, 3
    return 128, 64, 8, 3


def _rotate_blocks(d: int, interpret: bool = INTERPRET) -> tuple[int, int]:
    """``(BLOCK_L, num_warps)`` of the rotation kernel: 2K elements per [BLOCK_L, DP] tile on a GPU
    (4K spilled in fp32 on sm_90: a dozen live tiles, pointers included, per program)."""
    dp = max(16, triton.next_power_of_2(d))
    if interpret:
        return max(1, (1 << 15) // dp), 4
    return max(1, 2048 // dp), 4


def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100/H200 (the recorder of jit_kernels.triton.aot runs on CPU tensors)


def rotate_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, qmul: float,
              dot_dtype: torch.dtype, heads_per_program: int | None = None) -> torch.Tensor:
    """``[2, B, H, L, DP]`` scratch: ``rot(q) * qmul`` and ``rot(k)`` in ``dot_dtype`` (v2's first launch).

    ``heads_per_program``: heads one program rotates with the table rows it loaded (default 8 on
    a GPU, all heads under the interpreter).
    """
    b, n, h, d = q.shape
    dp = max(16, triton.next_power_of_2(d))
    rot = torch.empty((2, b, h, n, dp), dtype=dot_dtype, device=q.device)
    bl, warps = _rotate_blocks(d)
    # Heads per program: 8 (a third of FLUX's 24) keeps enough programs in flight at short
    # sequences (512 + 1310 tokens: 114 token blocks x 3 groups) for 3 reads of each table row.
    hg = max(1, min(h, heads_per_program or (h if INTERPRET else 8)))
    groups = triton.cdiv(h, hg)
    per_sample = cos.dim() == 3
    for bs in spans(b, max(common.MAX_GRID_YZ // groups, 1)):
        qv, kv = sub(q, 0, bs, b), sub(k, 0, bs, b)
        cv = sub(cos, 0, bs, b) if per_sample else cos
        sv = sub(sin, 0, bs, b) if per_sample else sin
        rv = sub(rot, 1, bs, b)
        _rotate_qk_fwd_kernel[(triton.cdiv(n, bl), (bs[1] - bs[0]) * groups)](
            qv, kv, cv, sv, rv,
            n, h, d, hg, groups, float(qmul),
            qv.stride(0), qv.stride(1), qv.stride(2),
            kv.stride(0), kv.stride(1), kv.stride(2),
            cv.stride(0) if per_sample else 0, cv.stride(-2),
            rv.stride(0), rv.stride(1), rv.stride(2),
            BLOCK_L=bl, BLOCK_D=dp,
            num_warps=warps,
        )
    return rot


def _attention_v2(q, k, v, cs, sn, lens, scale, out, blocks):
    b, n, h, d = q.shape
    dot = _dot_dtype(q.dtype)
    rot = rotate_qk(q, k, cs, sn, float(scale) * _LOG2E, _TORCH_DOT[dot])
    dp = rot.shape[-1]
    if blocks is None:
        blocks = attention_blocks_v2(d, q.dtype, programs=triton.cdiv(n, 128) * b * h, sms=_sms(q.device))
    bm, bn, warps, stages = blocks
    limit = common.MAX_GRID_YZ
    hspans = spans(h, limit)
    for bs in spans(b, max(limit // h, 1)):
        lv = sub(lens, 0, bs, b) if lens is not None else None
        for hs in hspans:
            rv = sub(sub(rot, 1, bs, b), 2, hs, h)
            vv, ov = (sub(sub(t, 0, bs, b), 2, hs, h) for t in (v, out))
            nh = hs[1] - hs[0]
            _anchor_attention_v2_fwd_kernel[(triton.cdiv(n, bm), (bs[1] - bs[0]) * nh)](
                rv, vv, lv if lv is not None else rv, ov,
                n, nh, d,
                rv.stride(0), rv.stride(1), rv.stride(2),
                vv.stride(0), vv.stride(1), vv.stride(2),
                ov.stride(0), ov.stride(1), ov.stride(2),
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=dp, STAGES=stages,
                HAS_LENS=lens is not None, EVEN_D=dp == d, DOT_DTYPE=dot,
                IEEE=dot == tl.float32 and not INTERPRET, V_IS_DOT=_TORCH_DOT[dot] == v.dtype,
                SPLIT=dot == tl.float32 and dp >= 32,
                num_warps=warps, num_stages=stages,
            )
    return out


def _attention_v1(q, k, v, cs, sn, lens, scale, out, blocks):
    b, n, h, d = q.shape
    bm, bn, warps, stages = blocks if blocks is not None else attention_blocks(d, q.dtype)
    half = d // 2
    dot = _dot_dtype(q.dtype)
    # Grid axis 1 holds (sample, head) pairs, at most 65535 per launch: larger B * H is split
    # into launches over samples (and over heads when H alone exceeds the limit).
    limit = common.MAX_GRID_YZ
    hspans = spans(h, limit)
    for bs in spans(b, max(limit // h, 1)):
        per_sample = cs.dim() == 3
        csv = sub(cs, 0, bs, b) if per_sample else cs
        snv = sub(sn, 0, bs, b) if per_sample else sn
        lv = sub(lens, 0, bs, b) if lens is not None else None
        for hs in hspans:
            qv, kv, vv, ov = (sub(sub(t, 0, bs, b), 2, hs, h) for t in (q, k, v, out))
            nh = hs[1] - hs[0]
            _anchor_attention_fwd_kernel[(triton.cdiv(n, bm), (bs[1] - bs[0]) * nh)](
                qv, kv, vv, csv, snv, lv if lv is not None else csv, ov,
                n, nh, d, half, float(scale) * _LOG2E,
                qv.stride(0), qv.stride(1), qv.stride(2),
                kv.stride(0), kv.stride(1), kv.stride(2),
                vv.stride(0), vv.stride(1), vv.stride(2),
                csv.stride(0) if per_sample else 0, csv.stride(-2),
                ov.stride(0), ov.stride(1), ov.stride(2),
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_HALF=max(16, triton.next_power_of_2(half)),
                BLOCK_D=max(16, triton.next_power_of_2(d)),
                HAS_LENS=lens is not None, DOT_DTYPE=dot, IEEE=dot == tl.float32 and not INTERPRET,
                num_warps=warps, num_stages=stages,
            )
    return out


# $JIT_KERNELS_ATTN_VARIANT, read once (an invalid value is reported at the first launch).
try:
    DEFAULT_VARIANT: str | None = attention_variant()
    _VARIANT_ERROR = ""
except ValueError as _exc:
    DEFAULT_VARIANT, _VARIANT_ERROR = None, str(_exc)

_IMPLS = {"v1": _attention_v1, "v2": _attention_v2}


def anchor_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_lengths: Optional[torch.Tensor],
    scale: float,
    *,
    variant: str | None = None,
    blocks: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """:func:`launch_anchor_attention` with the kernel chosen here (benchmarks, A/B tests).

    ``variant``: ``"v1"`` (rotation inside the attention loop) or ``"v2"`` (rotate once, then a
    pipelined flash loop); default ``$JIT_KERNELS_ATTN_VARIANT`` as read at import (``v2`` when
    unset). ``blocks``: ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` of the attention kernel
    instead of the heuristic (:func:`attention_blocks` / :func:`attention_blocks_v2`); powers of
    two >= 16 for the tiles. Inputs as in :func:`launch_anchor_attention` (checked by the caller).
    """
    if variant is None:
        if DEFAULT_VARIANT is None:
            raise ValueError(f"anchor_attention: {_VARIANT_ERROR}")
        variant = DEFAULT_VARIANT
    if variant not in _IMPLS:
        raise ValueError(f"anchor_attention: variant must be one of {', '.join(_IMPLS)}, got {variant!r}")
    if blocks is not None:
        bm, bn, warps, stages = (int(x) for x in blocks)
        if any(x < 16 or x & (x - 1) for x in (bm, bn)) or warps not in (1, 2, 4, 8, 16) or stages < 1:
            raise ValueError(f"anchor_attention: blocks (BLOCK_M, BLOCK_N, num_warps, num_stages) = {tuple(blocks)} "
                             "need power-of-two tiles >= 16, num_warps in 1..16 (a power of two), num_stages >= 1")
        blocks = (bm, bn, warps, stages)
    b, n, h, d = q.shape
    out = torch.empty((b, n, h, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cs = cos.to(torch.float32).contiguous()
    sn = sin.to(torch.float32).contiguous()
    lens = key_lengths.to(torch.int64).contiguous() if key_lengths is not None else None
    return _IMPLS[variant](q, k, v, cs, sn, lens, scale, out, blocks)


def launch_anchor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_lengths: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """``[B, L, H, D]`` attention of rotated q, k (``cos, sin [L, D] | [B, L, D]``), keys limited to ``key_lengths [B]``.

    Runs the kernel variant ``$JIT_KERNELS_ATTN_VARIANT`` (``v2`` by default; see
    :func:`anchor_attention_forward`).
    """
    return anchor_attention_forward(q, k, v, cos, sin, key_lengths, scale)
