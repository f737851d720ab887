"""Triton deterministic micro-flow (docs/method.md section 5): ``launch_microflow_update_``, ``launch_microflow_target``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import NUM_WARPS, batch_stride, cast, f32, sub, tile_shape
from .lift import _lift_tile, flat_launches, lift_launch_shape
from .tokens import _index_view, _row_launches

__all__ = ["launch_microflow_update_", "launch_microflow_target"]


# ------------------------------------------------------------------ update


@triton.jit
def _microflow_update_fwd_kernel(
    y_ptr, idx_ptr, t_ptr,
    R, C, N, w, one_minus_w,
    sy_b, sy_n, sy_c,
    si_b, si_r,
    st_b, st_r, st_c,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, COPY: tl.constexpr,
):
    """y[b, idx[b, r]] <- (1 - w) y[b, idx[b, r]] + w target[b, r]  (gather, blend, scatter in one pass).

    COPY (w == 1) stores the target cast to y's dtype without arithmetic, so
    "assign" is exact; it also skips reading y.
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pid_c = tl.program_id(2)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < R
    mask = rmask[:, None] & (cols < C)[None, :]
    cell = tl.load(idx_ptr + b * si_b + rows * si_r, mask=rmask, other=0)
    mask = mask & ((cell >= 0) & (cell < N))[:, None]  # a row index outside [0, N) is skipped
    t = tl.load(t_ptr + b * st_b + rows[:, None].to(tl.int64) * st_r + cols[None, :] * st_c, mask=mask, other=0.0)
    ptrs = y_ptr + b * sy_b + cell[:, None] * sy_n + cols[None, :] * sy_c
    if COPY:
        new = cast(t, y_ptr.dtype.element_ty)
    else:
        cur = f32(tl.load(ptrs, mask=mask, other=0.0))
        new = cast(one_minus_w * cur + w * f32(t), y_ptr.dtype.element_ty)
    tl.store(ptrs, new, mask=mask)


def launch_microflow_update_(y: torch.Tensor, new_idx: torch.Tensor, target: torch.Tensor, weight: float) -> None:
    """In place ``y[R] <- (1 - w) y[R] + w target``; ``y [B, N, C]``, ``new_idx [R] | [B, R]``, ``target [B, R, C]``.

    ``y`` (any strides) must not overlap itself nor ``new_idx``/``target`` (checked, with the shapes,
    by :mod:`jit_kernels._metadata` before the launch; see :func:`jit_kernels.triton.guarded`).
    """
    b, _, c = y.shape
    r = new_idx.shape[-1]
    if b * r * c == 0:
        return
    br, bc = tile_shape(r, c)
    for bs, rs, cs in _row_launches(b, r, c, bc):  # one launch unless a grid limit is exceeded
        yv = sub(sub(y, 0, bs, b), 2, cs, c)
        iv = _index_view(new_idx, bs, b, rs, r)
        tv = sub(sub(sub(target, 0, bs, b), 1, rs, r), 2, cs, c)
        rr, cc = rs[1] - rs[0], cs[1] - cs[0]
        # 1 - w is formed in double here, like the reference's Python-scalar arithmetic.
        _microflow_update_fwd_kernel[(triton.cdiv(rr, br), bs[1] - bs[0], triton.cdiv(cc, bc))](
            yv, iv, tv, rr, cc, yv.shape[1], float(weight), 1.0 - float(weight),
            *yv.stride(), batch_stride(iv), iv.stride(-1), *tv.stride(),
            BLOCK_R=br, BLOCK_C=bc, COPY=bool(weight == 1.0), num_warps=NUM_WARPS,
        )


# ------------------------------------------------------------------ target


@triton.jit
def _microflow_target_fwd_kernel(
    y_ptr, v_ptr, anchor_ptr, near_ptr, w_ptr, new_ptr, eps_ptr, out_ptr,
    R, total, C, K, H, W, M,
    sigma_prev, sigma, one_minus_sigma,
    sy_b, sy_n, sy_c,
    sv_b, sv_n, sv_c,
    sa_b, sa_m,
    sn_b, sn_n,
    sr_b, sr_r,
    se_b, se_r, se_c,
    so_b, so_r, so_c,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, STEP_REFLECT: tl.constexpr,
):
    """out[b, r] = (1 - sigma) * Lift_old(x0)[b, new[b, r]] + sigma * eps[b, r]; rows b * R + r < total.

    x0 = y - sigma_prev * v is formed on the fly for the window's anchor rows only,
    and the lift is evaluated only at the R new cells (a few hundred), never on the
    full grid. A new cell that is an old anchor takes its exact x0 (lift's compose rule).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < total
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    b = (rows // R).to(tl.int64)
    r = (rows % R).to(tl.int64)
    # Cells are < N < 2^31: int32 grid arithmetic, like the full-grid lift.
    pos = tl.load(new_ptr + b * sr_b + r * sr_r, mask=rmask, other=0)
    ok = rmask & (pos >= 0) & (pos < H * W)  # a cell outside the grid is never read (its row gets sigma * eps)
    pos = tl.where(ok, pos, 0).to(tl.int32)
    phi = _lift_tile(pos, b, ok, cols, cmask,
                     y_ptr, sy_b, sy_n, sy_c,
                     v_ptr, sv_b, sv_n, sv_c, sigma_prev,
                     anchor_ptr, sa_b, sa_m, near_ptr, sn_b, sn_n, w_ptr, K, H, W, M,
                     BLOCK_R, BLOCK_C, True, STEP_REFLECT)
    e = tl.load((eps_ptr + b * se_b + r * se_r)[:, None] + (cols * se_c)[None, :], mask=mask, other=0.0)
    res = one_minus_sigma * phi + sigma * f32(e)
    dst = (out_ptr + b * so_b + r * so_r)[:, None] + (cols * so_c)[None, :]
    tl.store(dst, cast(res, out_ptr.dtype.element_ty), mask=mask)


def launch_microflow_target(
    y_prev: torch.Tensor,
    v_prev: torch.Tensor,
    anchor_idx: torch.Tensor,
    nearest: torch.Tensor,
    weights: torch.Tensor,
    new_idx: torch.Tensor,
    eps: torch.Tensor,
    sigma_prev: float,
    sigma: float,
    height: int,
    width: int,
) -> torch.Tensor:
    """DMF target ``[B, R, C]`` in ``y_prev.dtype`` from ``y_prev, v_prev [B, N, C]`` and the OLD anchors (Triton)."""
    b, _, c = y_prev.shape
    r = new_idx.shape[-1]
    out = torch.empty((b, r, c), dtype=y_prev.dtype, device=y_prev.device)
    if out.numel() == 0:
        return out
    w = weights.to(torch.float32).contiguous()
    br, bc, step = lift_launch_shape(b * r, c)  # the lift's launch variant (JIT_KERNELS_LIFT_VARIANT)
    for bs, cs in flat_launches(b, r, c, bc):  # one launch unless a grid limit is exceeded
        nb, cc = bs[1] - bs[0], cs[1] - cs[0]
        yv, vv = sub(sub(y_prev, 0, bs, b), 2, cs, c), sub(sub(v_prev, 0, bs, b), 2, cs, c)
        av = sub(anchor_idx, 0, bs, b) if anchor_idx.dim() == 2 else anchor_idx
        nv = sub(nearest, 0, bs, b) if nearest.dim() == 2 else nearest
        rv = sub(new_idx, 0, bs, b) if new_idx.dim() == 2 else new_idx
        ev, ov = sub(sub(eps, 0, bs, b), 2, cs, c), sub(sub(out, 0, bs, b), 2, cs, c)
        _microflow_target_fwd_kernel[(triton.cdiv(nb * r, br), triton.cdiv(cc, bc))](
            yv, vv, av, nv, w, rv, ev, ov,
            r, nb * r, cc, w.numel(), height, width, av.shape[-1],
            float(sigma_prev), float(sigma), 1.0 - float(sigma),
            *yv.stride(), *vv.stride(),
            batch_stride(av), av.stride(-1),
            batch_stride(nv), nv.stride(-1),
            batch_stride(rv), rv.stride(-1),
            *ev.stride(), *ov.stride(),
            BLOCK_R=br, BLOCK_C=bc, STEP_REFLECT=step, num_warps=NUM_WARPS,
        )
    return out
