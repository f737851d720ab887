"""Triton token gather / scatter: the launchers of ``gather_tokens``, ``scatter_tokens``, ``scatter_tokens_``.

Every kernel works on a ``BLOCK_M x BLOCK_C`` tile of rows x channels; grid =
(row tiles, B, channel tiles). Layout conventions: :mod:`jit_kernels.triton.common`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import NUM_WARPS, batch_stride, cast, tile_shape

__all__ = ["launch_gather_tokens", "launch_scatter_tokens", "launch_scatter_tokens_"]


@triton.jit
def _gather_tokens_fwd_kernel(
    x_ptr, idx_ptr, out_ptr,
    M, C,
    sx_b, sx_n, sx_c,
    si_b, si_m,
    so_b, so_m, so_c,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[b, m, :] = x[b, idx[b, m], :]; a pure copy in the input dtype (exact)."""
    pid_m = tl.program_id(0)
    # int64 batch offsets: B * N * C may exceed 2^31 elements.
    b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < M
    mask = rmask[:, None] & (cols < C)[None, :]
    # Masked lanes read index 0, a valid row, and their values are masked anyway.
    src_row = tl.load(idx_ptr + b * si_b + rows * si_m, mask=rmask, other=0)
    vals = tl.load(x_ptr + b * sx_b + src_row[:, None] * sx_n + cols[None, :] * sx_c, mask=mask)
    dst = out_ptr + b * so_b + rows[:, None].to(tl.int64) * so_m + cols[None, :] * so_c
    tl.store(dst, vals, mask=mask)


@triton.jit
def _scatter_tokens_fwd_kernel(
    base_ptr, idx_ptr, src_ptr,
    M, C,
    sb_b, sb_n, sb_c,
    si_b, si_m,
    ss_b, ss_m, ss_c,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """base[b, idx[b, m], :] = src[b, m, :] cast to base's dtype (indices are unique: no write races)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < M
    mask = rmask[:, None] & (cols < C)[None, :]
    dst_row = tl.load(idx_ptr + b * si_b + rows * si_m, mask=rmask, other=0)
    vals = tl.load(src_ptr + b * ss_b + rows[:, None].to(tl.int64) * ss_m + cols[None, :] * ss_c, mask=mask)
    dst = base_ptr + b * sb_b + dst_row[:, None] * sb_n + cols[None, :] * sb_c
    tl.store(dst, cast(vals, base_ptr.dtype.element_ty), mask=mask)


def launch_gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x [B, N, C]``, ``idx`` int64 ``[M] | [B, M]`` -> ``[B, M, C]`` (Triton)."""
    b, _, c = x.shape
    m = idx.shape[-1]
    out = torch.empty((b, m, c), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    bm, bc = tile_shape(m, c)
    grid = (triton.cdiv(m, bm), b, triton.cdiv(c, bc))
    _gather_tokens_fwd_kernel[grid](
        x, idx, out, m, c,
        *x.stride(), batch_stride(idx), idx.stride(-1), *out.stride(),
        BLOCK_M=bm, BLOCK_C=bc, num_warps=NUM_WARPS,
    )
    return out


def launch_scatter_tokens_(base: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    """In place: rows ``idx`` (unique) of ``base [B, N, C]`` <- ``src [B, M, C]`` (Triton)."""
    b, _, c = base.shape
    m = idx.shape[-1]
    if b * m * c == 0:
        return
    bm, bc = tile_shape(m, c)
    grid = (triton.cdiv(m, bm), b, triton.cdiv(c, bc))
    _scatter_tokens_fwd_kernel[grid](
        base, idx, src, m, c,
        *base.stride(), batch_stride(idx), idx.stride(-1), *src.stride(),
        BLOCK_M=bm, BLOCK_C=bc, num_warps=NUM_WARPS,
    )


def launch_scatter_tokens(base: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Contiguous copy of ``base [B, N, C]`` with rows ``idx`` (unique) replaced by ``src [B, M, C]`` (Triton)."""
    out = base.clone(memory_format=torch.contiguous_format)
    launch_scatter_tokens_(out, idx, src)
    return out
