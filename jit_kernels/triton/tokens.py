"""Triton token gather / scatter: ``gather_tokens_triton``, ``scatter_tokens_triton``, ``scatter_tokens__triton``.

Also holds the launch-shape helpers shared by every Triton module of the package.

Layout: token tensors ``[B, N, C]`` are addressed through their strides (no
``.contiguous()`` copies); index tensors are int64 ``[M]`` (shared, batch stride
0) or ``[B, M]``. Every kernel works on a ``BLOCK_M x BLOCK_C`` tile of rows x
channels; grid = (row tiles, B, channel tiles).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["gather_tokens_triton", "scatter_tokens_triton", "scatter_tokens__triton"]

# The interpreter is chosen when @triton.jit runs, so this must be read at import time too.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Elements per tile. On a GPU ~4K fp32 elements over 4 warps keeps 32 live values per
# thread (no spills, enough loads in flight). Under the interpreter every program
# instance costs ~0.6 ms of Python overhead, so tiles are made as large as numpy likes.
_TILE_GPU = 4096
_TILE_INTERP = 1 << 16
_MAX_BLOCK_C_GPU = 128
_MAX_BLOCK_C_INTERP = 1024
NUM_WARPS = 4


def tile_shape(rows: int, cols: int, *, tile: int | None = None, interpret: bool = INTERPRET) -> tuple[int, int]:
    """``(BLOCK_ROWS, BLOCK_C)``: powers of two, BLOCK_C covers C up to a cap, rows fill the tile budget."""
    budget = tile if tile is not None else (_TILE_INTERP if interpret else _TILE_GPU)
    cap = _MAX_BLOCK_C_INTERP if interpret else _MAX_BLOCK_C_GPU
    block_c = min(triton.next_power_of_2(max(cols, 1)), cap)
    block_r = max(1, min(budget // block_c, triton.next_power_of_2(max(rows, 1))))
    return block_r, block_c


def batch_stride(idx: torch.Tensor) -> int:
    """Batch stride of an index tensor: 0 for a shared ``[M]`` index (every sample reads the same row)."""
    return idx.stride(0) if idx.dim() == 2 else 0


# The interpreter converts fp32 -> bf16 by truncation and casts between bf16 and fp16 as
# integers, while GPUs round to nearest even like torch. Under the interpreter the kernels
# therefore convert through fp32 and round to bf16 with integer ops: both modes give torch's bits.
_SOFT_BF16 = tl.constexpr(INTERPRET)


@triton.jit
def _f32(x):
    """``x.to(tl.float32)``; under the interpreter bf16 is widened by a bit shift (its own
    conversion mangles bf16 subnormals)."""
    if _SOFT_BF16 and x.dtype == tl.bfloat16:
        bits = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """``x.to(dtype)``, exact (round to nearest even) for bf16 also under the interpreter."""
    if _SOFT_BF16 and x.dtype != dtype and (dtype == tl.bfloat16 or x.dtype == tl.bfloat16):
        f = _f32(x)  # exact from fp16 and bf16
        if dtype == tl.bfloat16:
            bits = f.to(tl.uint32, bitcast=True)
            rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
            # NaN payloads could carry into the sign bit: use the canonical quiet NaN.
            rounded = tl.where(f != f, 0x7FC0, rounded)
            return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return f.to(dtype)
    else:
        return x.to(dtype)


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
    tl.store(dst, _cast(vals, base_ptr.dtype.element_ty), mask=mask)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
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


def _scatter_into(base: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
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


@torch.library.custom_op("jit_kernels::gather_tokens_triton", mutates_args=())
def gather_tokens_triton(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x [B, N, C]``, ``idx`` int64 ``[M] | [B, M]`` -> ``[B, M, C]`` (Triton)."""
    return _gather(x, idx)


@gather_tokens_triton.register_fake
def _(x, idx):
    return x.new_empty((x.shape[0], idx.shape[-1], x.shape[2]))


@torch.library.custom_op("jit_kernels::scatter_tokens_triton", mutates_args=())
def scatter_tokens_triton(base: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Copy of ``base [B, N, C]`` with rows ``idx`` (unique) replaced by ``src [B, M, C]`` (Triton)."""
    out = base.clone(memory_format=torch.contiguous_format)
    _scatter_into(out, idx, src)
    return out


@scatter_tokens_triton.register_fake
def _(base, idx, src):
    return torch.empty_like(base, memory_format=torch.contiguous_format)


@torch.library.custom_op("jit_kernels::scatter_tokens__triton", mutates_args=("base",))
def scatter_tokens__triton(base: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> None:
    """In place: rows ``idx`` of ``base [B, N, C]`` <- ``src [B, M, C]`` (Triton)."""
    _scatter_into(base, idx, src)


@scatter_tokens__triton.register_fake
def _(base, idx, src):
    return None
