"""Triton nearest-anchor map and fused lift.

Launchers: ``launch_nearest_anchor_map``, ``launch_lift_field``, ``launch_lift_euler_``.

The lift (docs/method.md section 3) is one pass per tile of output cells: for every
cell of the tile and every tap ``(dy, dx)`` of the ``K x K`` window, read the
nearest-anchor value of the (reflected) neighbour cell and accumulate
``w[dy] * w[dx] * value`` in fp32. The filled field is never materialised: the
nearest map turns each neighbour into a row of ``values [B, M, C]``, which stays
in L1/L2 because neighbouring cells share anchors. Anchors then take their own
value exactly. The 2-D outer product of the separable taps differs from the
reference's two 1-D passes only by fp32 rounding order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._env import lift_variant
from . import common
from .common import INTERPRET, NUM_WARPS, batch_stride, cast, f32, spans, sub, tile_shape

__all__ = ["launch_nearest_anchor_map", "launch_lift_field", "launch_lift_euler_", "lift_launch_shape"]

# Anchors compared per inner step of the nearest map (the position tile is sized against it).
_ANCHOR_CHUNK_GPU = 64
_ANCHOR_CHUNK_INTERP = 256


# ------------------------------------------------------------------ nearest map


@triton.jit
def _nearest_anchor_map_fwd_kernel(
    anchor_ptr, out_ptr,
    M, N, W,
    sa_b, sa_m, so_b,
    BLOCK_P: tl.constexpr, BLOCK_A: tl.constexpr, WIDE: tl.constexpr,
):
    """out[b, p] = first j minimising |cell p - cell anchor[b, j]|^2 (exact integer distances).

    Grid coordinates and their differences fit int32 (N <= 2^30), and int32 arithmetic is far
    cheaper on GPUs. When every squared distance fits int32 too (``WIDE`` off: (H-1)^2 + (W-1)^2
    < 2^31), the packed key ``d2 * M + j`` (int64) is unique per anchor and orders by distance,
    then by position in the anchor list, so one ``min`` yields both the nearest anchor and the
    first-listed one on ties (the reference's argmin). ``WIDE`` grids (a 1 x 50000 grid, say)
    square in int64, where ``d2 * M`` could overflow: a min over distances, then a min over the
    positions that reach it, per anchor chunk (earlier chunks win ties).
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    pos = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = pos < N
    pr = pos // W
    pc = pos % W
    if WIDE:
        best_d = tl.full([BLOCK_P], 0x7FFFFFFFFFFFFFFF, tl.int64)
        best_j = tl.zeros([BLOCK_P], dtype=tl.int64)
        for a0 in range(0, M, BLOCK_A):
            j = a0 + tl.arange(0, BLOCK_A)
            amask = j < M
            a = tl.load(anchor_ptr + b * sa_b + j * sa_m, mask=amask, other=0).to(tl.int32)
            dr = (pr[:, None] - (a // W)[None, :]).to(tl.int64)
            dc = (pc[:, None] - (a % W)[None, :]).to(tl.int64)
            d2 = tl.where(amask[None, :], dr * dr + dc * dc, 0x7FFFFFFFFFFFFFFF)
            cd = tl.min(d2, axis=1)
            cj = tl.min(tl.where(d2 == cd[:, None], j[None, :].to(tl.int64), 0x7FFFFFFFFFFFFFFF), axis=1)
            take = cd < best_d
            best_j = tl.where(take, cj, best_j)
            best_d = tl.where(take, cd, best_d)
        tl.store(out_ptr + b * so_b + pos, best_j, mask=pmask)
    else:
        best = tl.full([BLOCK_P], 0x7FFFFFFFFFFFFFFF, tl.int64)
        for a0 in range(0, M, BLOCK_A):
            j = a0 + tl.arange(0, BLOCK_A)
            amask = j < M
            a = tl.load(anchor_ptr + b * sa_b + j * sa_m, mask=amask, other=0).to(tl.int32)
            ar = a // W
            ac = a % W
            dr = pr[:, None] - ar[None, :]
            dc = pc[:, None] - ac[None, :]
            d2 = dr * dr + dc * dc
            key = d2.to(tl.int64) * M + j[None, :]  # int64: d2 * M can exceed 2^31
            key = tl.where(amask[None, :], key, 0x7FFFFFFFFFFFFFFF)
            best = tl.minimum(best, tl.min(key, axis=1))
        tl.store(out_ptr + b * so_b + pos, best % M, mask=pmask)


def nearest_is_wide(height: int, width: int) -> bool:
    """Whether some squared cell distance of an ``height x width`` grid exceeds int32 (the kernel's ``WIDE``)."""
    return (height - 1) ** 2 + (width - 1) ** 2 > 2**31 - 1


def nearest_block_shape(n: int, m: int, interpret: bool = INTERPRET) -> tuple[int, int]:
    """``(BLOCK_P, BLOCK_A)``: a positions x anchors tile of int64 keys."""
    block_a = min(triton.next_power_of_2(m), _ANCHOR_CHUNK_INTERP if interpret else _ANCHOR_CHUNK_GPU)
    block_p, _ = tile_shape(n, block_a, interpret=interpret)
    return block_p, block_a


def launch_nearest_anchor_map(anchor_idx: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``anchor_idx`` int64 ``[M] | [B, M]`` -> int64 ``[H*W] | [B, H*W]`` (Triton)."""
    n = height * width
    m = anchor_idx.shape[-1]
    per_sample = anchor_idx.dim() == 2
    b = anchor_idx.shape[0] if per_sample else 1
    out = torch.empty((b, n) if per_sample else (n,), dtype=torch.int64, device=anchor_idx.device)
    if out.numel() == 0:
        return out
    block_p, block_a = nearest_block_shape(n, m)
    wide = nearest_is_wide(height, width)
    for bs in spans(b, common.MAX_GRID_YZ):  # rows past the grid's axis-1 limit: more launches
        av = sub(anchor_idx, 0, bs, b) if per_sample else anchor_idx
        ov = sub(out, 0, bs, b) if per_sample else out
        _nearest_anchor_map_fwd_kernel[(triton.cdiv(n, block_p), bs[1] - bs[0])](
            av, ov, m, n, width,
            batch_stride(av), av.stride(-1), n if per_sample else 0,
            BLOCK_P=block_p, BLOCK_A=block_a, WIDE=wide, num_warps=NUM_WARPS,
        )
    return out


# ------------------------------------------------------------------ lift


@triton.jit
def _reflect(i, n):
    """torch 'reflect' padding extended periodically (jit_kernels.blur.reflect_index).

    The double modulo is non-negative under both C (GPU) and floor (interpreter)
    remainder semantics; ``n == 1`` gives period 1, i.e. always 0.
    """
    period = tl.maximum(2 * (n - 1), 1)
    i = ((i % period) + period) % period
    return tl.where(i >= n, period - i, i)


@triton.jit
def _reflect_phase(i, n):
    """Phase of ``i`` on the reflect wave of period ``2 (n - 1)`` (1 when ``n == 1``): in ``[0, period)``.

    The cell is ``_reflect_cell(phase, n)``. Two remainders, paid once per cell; the taps then
    walk the wave with :func:`_reflect_step` (no remainder per tap).
    """
    period = tl.maximum(2 * (n - 1), 1)
    return ((i % period) + period) % period


@triton.jit
def _reflect_cell(s, n):
    """The grid index at phase ``s`` (``_reflect(i, n)`` for the ``i`` of that phase)."""
    return tl.where(s >= n, tl.maximum(2 * (n - 1), 1) - s, s)


@triton.jit
def _reflect_step(s, n):
    """The phase of ``i + 1`` from the phase ``s`` of ``i``: one add and one wrap."""
    s = s + 1
    return tl.where(s == tl.maximum(2 * (n - 1), 1), 0, s)


@triton.jit
def _anchor_rows(j, mask1, mask2, val_row, sv_r, val_col, vel_row, sl_n, vel_col, sigma_prev,
                 anc_row, sa_m, N, FROM_X0: tl.constexpr):
    """fp32 ``[BLOCK, BLOCK_C]`` values of anchors ``j`` (positions in the anchor list).

    ``val_row`` etc. are per-row base pointers (sample offset already applied) and
    ``*_col`` the channel offsets, hoisted out of the tap loop by the caller.
    ``FROM_X0=False``: rows ``j`` of ``values [B, M, C]``.
    ``FROM_X0=True``: ``x0 = y - sigma_prev * v`` at the anchors' grid cells, built on the
    fly from the full fields ``y, v [B, N, C]`` (no x0 tensor is ever written).
    The caller masks anchor positions ``j`` outside ``[0, M)``; an anchor cell outside ``[0, N)``
    is masked here (it reads zeros, never out of bounds).
    """
    if FROM_X0:
        cell = tl.load(anc_row + j * sa_m, mask=mask1, other=0)
        mask2 = mask2 & ((cell >= 0) & (cell < N))[:, None]
        y = tl.load((val_row + cell * sv_r)[:, None] + val_col, mask=mask2, other=0.0)
        v = tl.load((vel_row + cell * sl_n)[:, None] + vel_col, mask=mask2, other=0.0)
        return f32(y) - sigma_prev * f32(v)
    else:
        x = tl.load((val_row + j * sv_r)[:, None] + val_col, mask=mask2, other=0.0)
        return f32(x)


@triton.jit
def _lift_tile(pos, b, pmask, cols, cmask,
               val_ptr, sv_b, sv_r, sv_c,
               vel_ptr, sl_b, sl_n, sl_c, sigma_prev,
               anchor_ptr, sa_b, sa_m,
               near_ptr, sn_b, sn_n,
               w_ptr, K, H, W, M,
               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, FROM_X0: tl.constexpr,
               STEP_REFLECT: tl.constexpr):
    """The lifted field at cells ``pos`` of samples ``b`` (``[BLOCK_P]`` each), channels ``cols``.

    Returns fp32 ``[BLOCK_P, BLOCK_C]``. Everything that does not depend on the tap
    (sample base pointers, channel offsets, masks) is computed once, outside the
    ``K x K`` loop, which then costs one index load and one row gather per tap.
    ``STEP_REFLECT`` (variant v2): the reflected row and column of each tap come from a phase
    that advances by one per tap (:func:`_reflect_step`); otherwise (v1) :func:`_reflect`
    computes them with two remainders per cell and tap. Both give the same cells.
    Memory safety: a map entry outside ``[0, M)`` (or an anchor cell outside the grid) is masked,
    so no index value reads outside the tensors (the result of such a call is unspecified).
    """
    r = pos // W
    c = pos % W
    half = K // 2
    mask2 = pmask[:, None] & cmask[None, :]
    near_row = near_ptr + b * sn_b
    anc_row = anchor_ptr + b * sa_b
    val_row = val_ptr + b * sv_b
    val_col = (cols * sv_c)[None, :]
    vel_row = vel_ptr + b * sl_b
    vel_col = (cols * sl_c)[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    if STEP_REFLECT:
        sr = _reflect_phase(r - half, H)
        sc0 = _reflect_phase(c - half, W)
        for dy in range(0, K):
            wy = tl.load(w_ptr + dy)
            rr = _reflect_cell(sr, H) * W
            sc = sc0
            for dx in range(0, K):
                wgt = wy * tl.load(w_ptr + dx)
                q = rr + _reflect_cell(sc, W)
                j = tl.load(near_row + q * sn_n, mask=pmask, other=0)
                jm = pmask & (j >= 0) & (j < M)
                acc += wgt * _anchor_rows(j, jm, mask2 & jm[:, None], val_row, sv_r, val_col, vel_row, sl_n,
                                          vel_col, sigma_prev, anc_row, sa_m, H * W, FROM_X0)
                sc = _reflect_step(sc, W)
            sr = _reflect_step(sr, H)
    else:
        for dy in range(0, K):
            wy = tl.load(w_ptr + dy)
            rr = _reflect(r + (dy - half), H) * W
            for dx in range(0, K):
                wgt = wy * tl.load(w_ptr + dx)
                q = rr + _reflect(c + (dx - half), W)
                j = tl.load(near_row + q * sn_n, mask=pmask, other=0)
                jm = pmask & (j >= 0) & (j < M)
                acc += wgt * _anchor_rows(j, jm, mask2 & jm[:, None], val_row, sv_r, val_col, vel_row, sl_n,
                                          vel_col, sigma_prev, anc_row, sa_m, H * W, FROM_X0)
    # Anchors keep their exact value: cell p is an anchor iff anchor[nearest[p]] == p
    # (an anchor's own distance is 0, so its nearest entry points at itself).
    j0 = tl.load(near_row + pos * sn_n, mask=pmask, other=0)
    j0m = pmask & (j0 >= 0) & (j0 < M)
    cell0 = tl.load(anc_row + j0 * sa_m, mask=j0m, other=-1)
    is_anchor = j0m & (cell0 == pos)
    exact = _anchor_rows(j0, is_anchor, is_anchor[:, None] & cmask[None, :], val_row, sv_r, val_col,
                         vel_row, sl_n, vel_col, sigma_prev, anc_row, sa_m, H * W, FROM_X0)
    return tl.where(is_anchor[:, None], exact, acc)


# Both lift kernels flatten (sample, cell) into one row axis of B * N rows: one program
# covers cells of several samples when N is small, and the grid has no batch axis limit.


@triton.jit
def _lift_field_fwd_kernel(
    val_ptr, anchor_ptr, near_ptr, w_ptr, out_ptr,
    N, total, C, K, H, W, M,
    sv_b, sv_m, sv_c,
    sa_b, sa_m,
    sn_b, sn_n,
    so_b, so_n, so_c,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, STEP_REFLECT: tl.constexpr,
):
    """out[b, p, :] = lift(values)[b, p, :] in values' dtype; rows b * N + p < total = B * N."""
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pmask = rows < total
    cmask = cols < C
    # int64 sample index: sample offsets b * stride may exceed 2^31 elements.
    b = (rows // N).to(tl.int64)
    pos = rows % N
    res = _lift_tile(pos, b, pmask, cols, cmask,
                     val_ptr, sv_b, sv_m, sv_c,
                     val_ptr, 0, 0, 0, 0.0,
                     anchor_ptr, sa_b, sa_m, near_ptr, sn_b, sn_n, w_ptr, K, H, W, M,
                     BLOCK_P, BLOCK_C, False, STEP_REFLECT)
    dst = (out_ptr + b * so_b + pos.to(tl.int64) * so_n)[:, None] + (cols * so_c)[None, :]
    tl.store(dst, cast(res, out_ptr.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])


@triton.jit
def _lift_euler_fwd_kernel(
    y_ptr, val_ptr, anchor_ptr, near_ptr, w_ptr,
    N, total, C, K, H, W, M, dt,
    sy_b, sy_n, sy_c,
    sv_b, sv_m, sv_c,
    sa_b, sa_m,
    sn_b, sn_n,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, STEP_REFLECT: tl.constexpr,
):
    """y[b, p, :] += dt * lift(values)[b, p, :] in fp32, rounded once to y's dtype (in place)."""
    rows = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    pmask = rows < total
    cmask = cols < C
    b = (rows // N).to(tl.int64)
    pos = rows % N
    res = _lift_tile(pos, b, pmask, cols, cmask,
                     val_ptr, sv_b, sv_m, sv_c,
                     val_ptr, 0, 0, 0, 0.0,
                     anchor_ptr, sa_b, sa_m, near_ptr, sn_b, sn_n, w_ptr, K, H, W, M,
                     BLOCK_P, BLOCK_C, False, STEP_REFLECT)
    mask = pmask[:, None] & cmask[None, :]
    ptrs = (y_ptr + b * sy_b + pos.to(tl.int64) * sy_n)[:, None] + (cols * sy_c)[None, :]
    y = f32(tl.load(ptrs, mask=mask, other=0.0))
    tl.store(ptrs, cast(y + dt * res, y_ptr.dtype.element_ty), mask=mask)


# The lift tile keeps an fp32 accumulator plus one gathered tile live: half the copy budget.
_LIFT_TILE_GPU = 2048


def flat_launches(b: int, rows: int, c: int, bc: int):
    """(batch span, channel span) of each launch of a (flattened sample x row tiles, channel tiles) grid:
    at most ``MAX_FLAT_ROWS`` flattened rows (int32 row arithmetic) and ``MAX_GRID_YZ`` channel tiles each."""
    return [(bs, cs) for bs in spans(b, common.MAX_FLAT_ROWS // max(rows, 1))
            for cs in spans(c, common.MAX_GRID_YZ * bc)]


# Variant v2 on a GPU: programs wanted per lift launch. Each program is latency bound (K^2
# dependent index loads then row gathers), so the GPU needs many in flight: 1024 is about
# 8 four-warp programs per SM of an H100 / H200 (132 SMs), a quarter to half of what fits.
# At FLUX 1024^2 and B = 1 the v1 shape gives 128 programs (4096 cells / 32 per tile), less
# than one per SM; the DMF target at ~1150 new cells gave 36.
_LIFT_MIN_PROGRAMS = 1024
# The smallest v2 tile (elements): two per thread of a four-warp program.
_LIFT_MIN_TILE = 256


def lift_tile_shape(rows: int, c: int, interpret: bool = INTERPRET) -> tuple[int, int]:
    """``(BLOCK_ROWS, BLOCK_C)`` of the v1 lift launches (fixed tile of ``_LIFT_TILE_GPU`` elements)."""
    return tile_shape(rows, c, tile=None if interpret else _LIFT_TILE_GPU, interpret=interpret)


def lift_launch_shape(rows: int, c: int, variant: str | None = None,
                      interpret: bool = INTERPRET) -> tuple[int, int, bool]:
    """``(BLOCK_ROWS, BLOCK_C, STEP_REFLECT)`` of a lift launch over ``rows`` flattened rows and ``c`` channels.

    ``variant`` (default: :func:`jit_kernels._env.lift_variant`, the ``JIT_KERNELS_LIFT_VARIANT``
    switch): ``"v1"`` is the original launch (:func:`lift_tile_shape`, a remainder per tap);
    ``"v2"`` steps the reflect phase per tap and, on a GPU, halves the row block (then the
    channel block, down to 32) until the launch has ``_LIFT_MIN_PROGRAMS`` programs or the
    tile reaches ``_LIFT_MIN_TILE`` elements. Under the interpreter both use the v1 shape
    (each program costs Python time there).
    """
    variant = variant or lift_variant()
    br, bc = lift_tile_shape(rows, c, interpret=interpret)
    if variant == "v1":
        return br, bc, False
    if not interpret:
        def programs(r, ch):
            return triton.cdiv(rows, r) * triton.cdiv(c, ch)

        while programs(br, bc) < _LIFT_MIN_PROGRAMS and br * bc > _LIFT_MIN_TILE:
            if br > 1:
                br //= 2
            elif bc > 32:
                bc //= 2
            else:
                break
    return br, bc, True


def launch_lift_field(
    values: torch.Tensor, anchor_idx: torch.Tensor, nearest: torch.Tensor, weights: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """``values [B, M, C]``, ``anchor_idx [M] | [B, M]``, ``nearest [N] | [B, N]``, ``weights [K]`` -> ``[B, N, C]`` (Triton)."""
    b, _, c = values.shape
    n = height * width
    out = torch.empty((b, n, c), dtype=values.dtype, device=values.device)
    if out.numel() == 0:
        return out
    w = weights.to(torch.float32).contiguous()
    bp, bc, step = lift_launch_shape(b * n, c)
    for bs, cs in flat_launches(b, n, c, bc):
        nb, cc = bs[1] - bs[0], cs[1] - cs[0]
        vv = sub(sub(values, 0, bs, b), 2, cs, c)
        av = sub(anchor_idx, 0, bs, b) if anchor_idx.dim() == 2 else anchor_idx
        nv = sub(nearest, 0, bs, b) if nearest.dim() == 2 else nearest
        ov = sub(sub(out, 0, bs, b), 2, cs, c)
        _lift_field_fwd_kernel[(triton.cdiv(nb * n, bp), triton.cdiv(cc, bc))](
            vv, av, nv, w, ov,
            n, nb * n, cc, w.numel(), height, width, av.shape[-1],
            *vv.stride(),
            batch_stride(av), av.stride(-1),
            batch_stride(nv), nv.stride(-1),
            *ov.stride(),
            BLOCK_P=bp, BLOCK_C=bc, STEP_REFLECT=step, num_warps=NUM_WARPS,
        )
    return out


def launch_lift_euler_(
    y: torch.Tensor,
    values: torch.Tensor,
    anchor_idx: torch.Tensor,
    nearest: torch.Tensor,
    weights: torch.Tensor,
    height: int,
    width: int,
    dt: float,
) -> None:
    """In place ``y [B, N, C] += dt * lift(values)`` (Triton, one fused pass).

    ``y`` (any strides) must not overlap itself nor the inputs: every cell reads ``values`` rows
    while other programs write ``y`` (checked, with the shapes, by :mod:`jit_kernels._metadata`
    before the launch; see :func:`jit_kernels.triton.guarded`).
    """
    b, n, c = y.shape
    if y.numel() == 0:
        return
    w = weights.to(torch.float32).contiguous()
    bp, bc, step = lift_launch_shape(b * n, c)
    for bs, cs in flat_launches(b, n, c, bc):
        nb, cc = bs[1] - bs[0], cs[1] - cs[0]
        yv = sub(sub(y, 0, bs, b), 2, cs, c)
        vv = sub(sub(values, 0, bs, b), 2, cs, c)
        av = sub(anchor_idx, 0, bs, b) if anchor_idx.dim() == 2 else anchor_idx
        nv = sub(nearest, 0, bs, b) if nearest.dim() == 2 else nearest
        _lift_euler_fwd_kernel[(triton.cdiv(nb * n, bp), triton.cdiv(cc, bc))](
            yv, vv, av, nv, w,
            n, nb * n, cc, w.numel(), height, width, av.shape[-1], float(dt),
            *yv.stride(),
            *vv.stride(),
            batch_stride(av), av.stride(-1),
            batch_stride(nv), nv.stride(-1),
            BLOCK_P=bp, BLOCK_C=bc, STEP_REFLECT=step, num_warps=NUM_WARPS,
        )
