"""Triton ``anchor_attention``: rotary + flash-attention forward in one kernel (``launch_anchor_attention``).

One program per (block of ``BLOCK_M`` queries, sample x head). The rotation is applied
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

from . import common
from .common import INTERPRET, cast, f32, spans, sub

__all__ = ["launch_anchor_attention", "attention_blocks"]

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
        length = tl.load(len_ptr + b).to(tl.int32)
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


def launch_anchor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_lengths: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """``[B, L, H, D]`` attention of rotated q, k (``cos, sin [L, D] | [B, L, D]``), keys limited to ``key_lengths [B]``."""
    b, n, h, d = q.shape
    out = torch.empty((b, n, h, d), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    cs = cos.to(torch.float32).contiguous()
    sn = sin.to(torch.float32).contiguous()
    lens = key_lengths.to(torch.int64).contiguous() if key_lengths is not None else None
    bm, bn, warps, stages = attention_blocks(d, q.dtype)
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
