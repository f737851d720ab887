"""Plain-PyTorch reference of ``anchor_attention``: diffusers' FLUX attention math in fp32.

Import it from ``jit_kernels.reference.attention`` (tests and benchmarks do).

diffusers' ``FluxAttnProcessor`` rotates q and k with ``apply_rotary_emb(x, (cos, sin),
sequence_dim=1)`` (``use_real=True, use_real_unbind_dim=-1``: channels form interleaved
pairs ``(x[2i], x[2i+1])``) and then calls ``scaled_dot_product_attention``. For each
channel pair and per-channel tables ``cos, sin [L, D]``::

    out[2i]     = x[2i]     * cos[2i]     - x[2i + 1] * sin[2i]
    out[2i + 1] = x[2i + 1] * cos[2i + 1] + x[2i]     * sin[2i + 1]

The reference does the same in fp32 end to end (diffusers rounds the rotated q, k to the
input dtype before SDPA; the kernels keep them in fp32), masks keys at positions
``>= key_lengths[b]`` and writes zeros to the padded query rows ``>= key_lengths[b]``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["anchor_attention_ref", "rotary_ref"]


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb(x, (cos, sin), sequence_dim=1)`` in fp32.

    ``x [B, L, H, D]``, ``cos, sin [L, D]`` (or ``[B, L, D]`` per sample) -> ``[B, L, H, D]`` fp32.
    """
    x = x.float()
    xr, xi = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2).unbind(-1)  # explicit size: x may be empty
    rotated = torch.stack([-xi, xr], dim=-1).flatten(3)
    cos, sin = cos.float(), sin.float()
    cos, sin = (cos[:, :, None, :], sin[:, :, None, :]) if cos.dim() == 3 else (cos[None, :, None], sin[None, :, None])
    return x * cos + rotated * sin


def anchor_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_lengths: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Rotary on q and k, then softmax attention; ``[B, L, H, D]`` in ``q.dtype``.

    ``q, k, v [B, L, H, D]``, ``cos, sin [L, D]`` or ``[B, L, D]``, ``key_lengths`` int ``[B]`` or ``None``
    (every key valid). Keys at positions ``>= key_lengths[b]`` are ignored; query rows at
    those positions are zero. ``scale`` defaults to ``1 / sqrt(D)``.
    """
    b, n, h, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    qr = rotary_ref(q, cos, sin).permute(0, 2, 1, 3)  # [B, H, L, D]
    kr = rotary_ref(k, cos, sin).permute(0, 2, 1, 3)
    vf = v.float().permute(0, 2, 1, 3)
    scores = torch.matmul(qr, kr.transpose(-1, -2)) * scale  # [B, H, L, L]
    if key_lengths is not None:
        pos = torch.arange(n, device=q.device)
        valid = pos[None, :] < key_lengths.to(q.device).long()[:, None]  # [B, L]
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        vf = vf.masked_fill(~valid[:, None, :, None], 0.0)  # padding may hold anything (0 * nan = nan)
    out = torch.matmul(torch.softmax(scores, dim=-1), vf).permute(0, 2, 1, 3)  # [B, L, H, D]
    if key_lengths is not None:
        out = out.masked_fill(~valid[:, :, None, None], 0.0)
    return out.to(q.dtype).contiguous()
