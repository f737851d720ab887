"""Plain-PyTorch references for the nearest-anchor map and the lift (docs/method.md section 3).

Grid convention: token ``n`` sits at ``(row, col) = (n // W, n % W)`` on an
``H x W`` grid. Anchor sets are int64 ``[M]`` (shared) or ``[B, M]`` (per sample),
unique, in ``[0, H * W)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..blur import reflect_index
from .tokens import gather_tokens_ref, scatter_tokens_ref_

__all__ = [
    "nearest_anchor_map_ref",
    "lift_field_ref",
    "lift_euler_ref_",
    "gaussian_blur_ref",
    "lift_field_published",
]

# Positions per chunk of the exact distance matrix: bounds memory at 128 x 128 grids.
_CHUNK = 1024


def _nearest_one(anchor_idx: torch.Tensor, height: int, width: int) -> torch.Tensor:
    n = height * width
    pos = torch.arange(n, device=anchor_idx.device)
    pr, pc = pos // width, pos % width
    ar, ac = anchor_idx // width, anchor_idx % width
    out = torch.empty(n, dtype=torch.int64, device=anchor_idx.device)
    for s in range(0, n, _CHUNK):
        dr = pr[s:s + _CHUNK, None] - ar[None, :]
        dc = pc[s:s + _CHUNK, None] - ac[None, :]
        # Integer squared distances are exact; argmin returns the first minimum,
        # i.e. the anchor that comes first in anchor_idx.
        out[s:s + _CHUNK] = torch.argmin(dr * dr + dc * dc, dim=1)
    return out


def nearest_anchor_map_ref(anchor_idx: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``anchor_idx [M] | [B, M]`` -> position in ``anchor_idx`` of each grid cell's nearest anchor, ``[N] | [B, N]``."""
    if anchor_idx.dim() == 1:
        return _nearest_one(anchor_idx, height, width)
    if anchor_idx.shape[0] == 0:  # no samples (torch.stack needs at least one)
        return anchor_idx.new_empty((0, height * width))
    return torch.stack([_nearest_one(a, height, width) for a in anchor_idx])


def gaussian_blur_ref(field: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Separable blur with (periodically extended) reflect padding.

    ``field [B, C, H, W]`` fp32, ``weights [K]`` -> ``[B, C, H, W]``.
    """
    b, c, h, w = field.shape
    k = weights.numel()
    r = k // 2
    dev = field.device
    rows = reflect_index(torch.arange(-r, h + r, device=dev), h)
    cols = reflect_index(torch.arange(-r, w + r, device=dev), w)
    wk = weights.to(device=dev, dtype=field.dtype)
    # Plain multiply-adds, tap by tap (not conv2d: on CUDA, cuDNN may run an fp32 convolution in
    # TF32, ~1e-3 off, and the reference must be the exact fp32 answer on every device).
    x = field.index_select(3, cols)  # [B, C, H, W + 2r]
    x = _taps(x, wk, 3, w)
    x = x.index_select(2, rows)  # [B, C, H + 2r, W]
    return _taps(x, wk, 2, h)


def _taps(x: torch.Tensor, wk: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``sum_t wk[t] * x.narrow(dim, t, size)``, summed in tap order."""
    out = x.narrow(dim, 0, size) * wk[0]
    for t in range(1, wk.numel()):
        out = out + x.narrow(dim, t, size) * wk[t]
    return out


def lift_field_ref(
    values: torch.Tensor,
    anchor_idx: torch.Tensor,
    nearest: torch.Tensor,
    weights: torch.Tensor,
    height: int,
    width: int,
) -> torch.Tensor:
    """Lift anchor values to the full grid.

    ``values [B, M, C]``, ``anchor_idx [M] | [B, M]``, ``nearest [N] | [B, N]``
    (from :func:`nearest_anchor_map_ref`), ``weights [K]`` -> ``[B, N, C]`` in
    ``values.dtype``; computed in fp32. Nearest fill, blur, anchors exact.
    """
    b, _, c = values.shape
    v32 = values.float()
    filled = gather_tokens_ref(v32, nearest)  # [B, N, C]
    field = filled.view(b, height, width, c).permute(0, 3, 1, 2)
    blurred = gaussian_blur_ref(field, weights).permute(0, 2, 3, 1).reshape(b, height * width, c)
    return scatter_tokens_ref_(blurred.contiguous(), anchor_idx, v32).to(values.dtype)


def lift_euler_ref_(
    y: torch.Tensor,
    values: torch.Tensor,
    anchor_idx: torch.Tensor,
    nearest: torch.Tensor,
    weights: torch.Tensor,
    height: int,
    width: int,
    dt: float,
) -> torch.Tensor:
    """In place ``y [B, N, C] += dt * lift(values)`` (fp32 arithmetic, rounded once); returns ``y``."""
    v = lift_field_ref(values.float(), anchor_idx, nearest, weights, height, width)
    return y.copy_((y.float() + dt * v).to(y.dtype))


def lift_field_published(
    values: torch.Tensor, anchor_idx: torch.Tensor, weights: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """The composition the published pipeline runs every step (batch 1 semantics, shared anchors).

    ``torch.cdist`` over all N x M pairs + argmin + gather, a 2-D depthwise
    Gaussian conv with reflect padding, and a masked compose. Kept only as the
    benchmark baseline; it raises on grids narrower than the blur radius, as
    the original does.
    """
    b, m, c = values.shape
    n = height * width
    dev = values.device
    pos = torch.arange(n, device=dev)
    grid = torch.stack([pos // width, pos % width], dim=1).float()
    nearest = torch.cdist(grid, grid[anchor_idx]).argmin(dim=1)
    filled = values[:, nearest, :].permute(0, 2, 1).reshape(b, c, height, width)
    k = weights.numel()
    w2 = (weights[:, None] * weights[None, :]).to(values.dtype)
    padded = F.pad(filled, (k // 2,) * 4, mode="reflect")
    blurred = F.conv2d(padded, w2.expand(c, 1, k, k).contiguous(), groups=c)
    blurred = blurred.reshape(b, c, n).permute(0, 2, 1)
    mask = torch.zeros(n, dtype=torch.bool, device=dev)
    mask[anchor_idx] = True
    full = torch.zeros(b, n, c, dtype=values.dtype, device=dev)
    full[:, anchor_idx, :] = values
    return torch.where(mask[None, :, None], full, blurred)
