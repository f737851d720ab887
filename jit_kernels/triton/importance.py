"""Triton importance-guided token activation: ``launch_token_importance``, ``launch_select_new_tokens``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .common import INTERPRET, NUM_WARPS, batch_stride, f32, spans, sub, tile_shape

__all__ = ["launch_token_importance", "launch_select_new_tokens"]


# ------------------------------------------------------------------ token importance


@triton.jit
def _token_importance_fwd_kernel(
    f_ptr, out_ptr,
    N, C, H, W,
    sf_b, sf_n, sf_c,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[b, p] = mean_c(E9[v^2] - E9[v]^2) over the 3x3 window of cell p (fp32).

    Zero padding is counted (always divide by 9), as avg_pool2d(count_include_pad=True).
    Channels are reduced in BLOCK_C chunks so any C fits one program per cell tile.
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pos = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = pos < N
    r = pos // W
    c = pos % W
    total = tl.zeros([BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        s1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        s2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for dy in tl.static_range(3):
            for dx in tl.static_range(3):
                rr = r + (dy - 1)
                cc = c + (dx - 1)
                ok = pmask & (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W)
                q = (rr * W + cc).to(tl.int64)
                v = f32(tl.load(f_ptr + b * sf_b + q[:, None] * sf_n + cols[None, :] * sf_c,
                                 mask=ok[:, None] & cmask[None, :], other=0.0))
                s1 += v
                s2 += v * v
        mean = s1 / 9.0
        var = s2 / 9.0 - mean * mean
        total += tl.sum(tl.where(cmask[None, :], var, 0.0), axis=1)
    tl.store(out_ptr + b * N + pos, total / C, mask=pmask)


# A 3x3 stencil keeps two fp32 accumulators live: half the copy tile.
_IMPORTANCE_TILE_GPU = 2048


def importance_tile_shape(n: int, c: int, interpret: bool = INTERPRET) -> tuple[int, int]:
    return tile_shape(n, c, tile=None if interpret else _IMPORTANCE_TILE_GPU, interpret=interpret)


def launch_token_importance(field: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``field [B, H*W, C]`` -> fp32 ``[B, H*W]``: 3x3 local variance averaged over channels (Triton)."""
    b, n, c = field.shape  # C > 0 (a mean over no channels is undefined): checked by jit_kernels._metadata
    out = torch.empty((b, n), dtype=torch.float32, device=field.device)
    if out.numel() == 0:
        return out
    bp, bc = importance_tile_shape(n, c)
    for bs in spans(b, common.MAX_GRID_YZ):  # samples past the grid's axis-1 limit: more launches
        fv, ov = sub(field, 0, bs, b), sub(out, 0, bs, b)
        _token_importance_fwd_kernel[(triton.cdiv(n, bp), bs[1] - bs[0])](
            fv, ov, n, c, height, width, *fv.stride(),
            BLOCK_P=bp, BLOCK_C=bc, num_warps=NUM_WARPS,
        )
    return out


# ------------------------------------------------------------------ select new tokens


@triton.jit
def _select_new_tokens_fwd_kernel(
    imp_ptr, key_ptr,
    N,
    si_b, si_n,
    BLOCK_N: tl.constexpr,
):
    """key[b, n]: a unique int64 whose descending order is (score descending, index ascending).

    High 32 bits: the fp32 score's bits made order-preserving as signed ints
    (negative floats get their magnitude bits flipped); -0.0 is folded onto +0.0
    (they tie in torch.sort) and every NaN onto 0x7FFFFFFF, above +inf (0x7F800000),
    where torch.sort puts NaN. Low 32 bits: N - 1 - n, so the lower index wins a tie.
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    s = f32(tl.load(imp_ptr + b * si_b + n * si_n, mask=nmask, other=0.0))
    s = tl.where(s == 0.0, 0.0, s)
    bits = s.to(tl.int32, bitcast=True)
    k32 = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    k32 = tl.where(s != s, 0x7FFFFFFF, k32)
    key = k32.to(tl.int64) * 4294967296 + (N - 1 - n).to(tl.int64)
    tl.store(key_ptr + b * N + n, key, mask=nmask)


@triton.jit
def _select_mask_active_kernel(
    key_ptr, act_ptr,
    N, M,
    sa_b, sa_m,
    BLOCK_M: tl.constexpr,
):
    """key[b, active[b, m]] = INT64_MIN, strictly below every score key (their high word is > INT32_MIN)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = m < M
    cell = tl.load(act_ptr + b * sa_b + m * sa_m, mask=mmask, other=0)
    lowest = tl.full([BLOCK_M], -2147483648, tl.int64) * 4294967296
    # A cell outside [0, N) is skipped: never written through (the selection is then unspecified).
    tl.store(key_ptr + b * N + cell, lowest, mask=mmask & (cell >= 0) & (cell < N))


# Tokens per program of the key kernels (1-D: one int64 key per token).
_SELECT_BLOCK_GPU = 1024
_SELECT_BLOCK_INTERP = 1 << 16


def select_block(n: int, interpret: bool = INTERPRET) -> int:
    return min(triton.next_power_of_2(max(n, 1)), _SELECT_BLOCK_INTERP if interpret else _SELECT_BLOCK_GPU)


def launch_select_new_tokens(importance: torch.Tensor, active_idx: torch.Tensor, count: int) -> torch.Tensor:
    """Top-``count`` inactive tokens of ``importance [B, N]``, int64 ``[B, count]`` (Triton keys + torch.topk).

    The keys are unique, so ``topk`` over them is exact and deterministic and equals a
    stable descending sort of the scores (ties to the lower index, NaN first).
    """
    b, n = importance.shape
    if count == 0 or b == 0:
        return torch.empty((b, count), dtype=torch.int64, device=importance.device)
    keys = torch.empty((b, n), dtype=torch.int64, device=importance.device)
    bn = select_block(n)
    m = active_idx.shape[-1]
    bm = select_block(m)
    for bs in spans(b, common.MAX_GRID_YZ):  # samples past the grid's axis-1 limit: more launches
        iv, kv = sub(importance, 0, bs, b), sub(keys, 0, bs, b)
        _select_new_tokens_fwd_kernel[(triton.cdiv(n, bn), bs[1] - bs[0])](
            iv, kv, n, *iv.stride(), BLOCK_N=bn, num_warps=NUM_WARPS,
        )
        if m > 0:
            av = sub(active_idx, 0, bs, b) if active_idx.dim() == 2 else active_idx
            _select_mask_active_kernel[(triton.cdiv(m, bm), bs[1] - bs[0])](
                kv, av, n, m, batch_stride(av), av.stride(-1),
                BLOCK_M=bm, num_warps=NUM_WARPS,
            )
    return torch.topk(keys, count, dim=1, largest=True, sorted=True).indices
