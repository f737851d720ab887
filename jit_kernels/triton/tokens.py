"""Triton token gather / scatter: the launchers of ``gather_tokens``, ``scatter_tokens``, ``scatter_tokens_``.

Every kernel works on a ``BLOCK_M x BLOCK_C`` tile of rows x channels; grid =
(row tiles, B, channel tiles), split into several launches when B or the channel tiles
exceed the 65535 limit of grid axes 1 and 2 (or M the int32 row range). Layout
conventions: :mod:`jit_kernels.triton.common`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .common import NUM_WARPS, batch_stride, cast, spans, sub, tile_shape

__all__ = ["launch_gather_tokens", "launch_scatter_tokens", "launch_scatter_tokens_"]


@triton.jit
def _gather_tokens_fwd_kernel(
    x_ptr, idx_ptr, out_ptr,
    M, C, N,
    sx_b, sx_n, sx_c,
    si_b, si_m,
    so_b, so_m, so_c,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[b, m, :] = x[b, idx[b, m], :]; a pure copy in the input dtype (exact).

    An index outside ``[0, N)`` is never read through: its output row is zero (the public function
    checks the values before the launch; a caller that skips that check gets no out-of-bounds access)."""
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
    ok = (src_row >= 0) & (src_row < N)
    vals = tl.load(x_ptr + b * sx_b + src_row[:, None] * sx_n + cols[None, :] * sx_c, mask=mask & ok[:, None],
                   other=0)
    dst = out_ptr + b * so_b + rows[:, None].to(tl.int64) * so_m + cols[None, :] * so_c
    tl.store(dst, vals, mask=mask)


@triton.jit
def _scatter_tokens_fwd_kernel(
    base_ptr, idx_ptr, src_ptr,
    M, C, N,
    sb_b, sb_n, sb_c,
    si_b, si_m,
    ss_b, ss_m, ss_c,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """base[b, idx[b, m], :] = src[b, m, :] cast to base's dtype (indices are unique: no write races).

    A row index outside ``[0, N)`` is skipped (never written through)."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < M
    mask = rmask[:, None] & (cols < C)[None, :]
    dst_row = tl.load(idx_ptr + b * si_b + rows * si_m, mask=rmask, other=0)
    mask = mask & ((dst_row >= 0) & (dst_row < N))[:, None]
    vals = tl.load(src_ptr + b * ss_b + rows[:, None].to(tl.int64) * ss_m + cols[None, :] * ss_c, mask=mask)
    dst = base_ptr + b * sb_b + dst_row[:, None] * sb_n + cols[None, :] * sb_c
    tl.store(dst, cast(vals, base_ptr.dtype.element_ty), mask=mask)


def _row_launches(b: int, m: int, c: int, bc: int):
    """(batch span, row span, channel span) of each launch of a (row tiles, B, channel tiles) grid."""
    return [(bs, ms, cs) for bs in spans(b, common.MAX_GRID_YZ) for ms in spans(m, common.MAX_FLAT_ROWS)
            for cs in spans(c, common.MAX_GRID_YZ * bc)]


def _index_view(idx: torch.Tensor, bs, b: int, ms, m: int) -> torch.Tensor:
    """An index ``[M] | [B, M]`` narrowed to a batch span (per-sample only) and a row span."""
    if idx.dim() == 2:
        idx = sub(idx, 0, bs, b)
    return sub(idx, idx.dim() - 1, ms, m)


def launch_gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x [B, N, C]``, ``idx`` int64 ``[M] | [B, M]`` -> ``[B, M, C]`` (Triton)."""
    b, _, c = x.shape
    m = idx.shape[-1]
    out = torch.empty((b, m, c), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    bm, bc = tile_shape(m, c)
    for bs, ms, cs in _row_launches(b, m, c, bc):
        xv = sub(sub(x, 0, bs, b), 2, cs, c)
        iv = _index_view(idx, bs, b, ms, m)
        ov = sub(sub(sub(out, 0, bs, b), 1, ms, m), 2, cs, c)
        mm, cc = ms[1] - ms[0], cs[1] - cs[0]
        grid = (triton.cdiv(mm, bm), bs[1] - bs[0], triton.cdiv(cc, bc))
        _gather_tokens_fwd_kernel[grid](
            xv, iv, ov, mm, cc, xv.shape[1],
            *xv.stride(), batch_stride(iv), iv.stride(-1), *ov.stride(),
            BLOCK_M=bm, BLOCK_C=bc, num_warps=NUM_WARPS,
        )
    return out


def launch_scatter_tokens_(base: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    """In place: rows ``idx`` (unique) of ``base [B, N, C]`` <- ``src [B, M, C]`` (Triton).

    ``base`` must not overlap itself nor ``idx``/``src``: the kernel writes through its strides (checked,
    with the shapes, by :mod:`jit_kernels._metadata` before the launch; see :func:`jit_kernels.triton.guarded`).
    """
    b, _, c = base.shape
    m = idx.shape[-1]
    if b * m * c == 0:
        return
    bm, bc = tile_shape(m, c)
    for bs, ms, cs in _row_launches(b, m, c, bc):
        bv = sub(sub(base, 0, bs, b), 2, cs, c)
        iv = _index_view(idx, bs, b, ms, m)
        sv = sub(sub(sub(src, 0, bs, b), 1, ms, m), 2, cs, c)
        mm, cc = ms[1] - ms[0], cs[1] - cs[0]
        grid = (triton.cdiv(mm, bm), bs[1] - bs[0], triton.cdiv(cc, bc))
        _scatter_tokens_fwd_kernel[grid](
            bv, iv, sv, mm, cc, bv.shape[1],
            *bv.stride(), batch_stride(iv), iv.stride(-1), *sv.stride(),
            BLOCK_M=bm, BLOCK_C=bc, num_warps=NUM_WARPS,
        )


def launch_scatter_tokens(base: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Contiguous copy of ``base [B, N, C]`` with rows ``idx`` (unique) replaced by ``src [B, M, C]`` (Triton)."""
    out = base.clone(memory_format=torch.contiguous_format)
    launch_scatter_tokens_(out, idx, src)
    return out
