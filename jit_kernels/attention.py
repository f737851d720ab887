"""Public op: ``anchor_attention``, rotary + softmax attention over the text and anchor tokens in one kernel.

In every JiT step the transformer attends over the text tokens plus the active anchor
tokens, which sit at scattered grid positions: only their rotary tables (``cos, sin``
rows gathered by position) say where. diffusers' stock FLUX processor writes rotated
copies of q and k and then calls SDPA (with per-sample anchor sets: padding plus a mask).
This op applies the rotation inside the attention kernel and takes per-sample key
lengths instead of a mask.

On CUDA the op runs one of two Triton kernels, chosen by ``$JIT_KERNELS_ATTN_VARIANT``
(read once; ``v2`` by default: q and k rotated once, then a pipelined flash loop; ``v1``: the
rotation inside the attention loop). See :mod:`jit_kernels.triton.attention`.
"""

from __future__ import annotations

import math

import torch

from . import _checks as checks
from ._backends import backend_op, resolve
from .reference.attention import anchor_attention_ref

__all__ = ["anchor_attention"]


def anchor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_lengths: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Rotary-embedded softmax attention: ``softmax(scale * rot(q) rot(k)^T) v``.

    Args:
        q, k, v: ``[B, L, H, D]`` (fp32, fp16 or bf16, one dtype) for the joint sequence
            (text tokens first, then the anchors), as diffusers' FLUX attention holds them.
        cos, sin: ``[L, D]`` rotary tables of those ``L`` tokens as ``FluxPosEmbed`` returns
            them (interleaved channel pairs, ``use_real_unbind_dim=-1``), or ``[B, L, D]``
            when every sample has its own token positions (per-sample anchor sets). Any
            float dtype; the rotation is done in fp32.
        key_lengths: optional int32/int64 ``[B]`` with values in ``[1, L]``: in sample ``b``
            only the first ``key_lengths[b]`` tokens are real; later keys are ignored and
            the output rows of those padded positions are zero.
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: ``auto | cuda | triton | cpp | reference`` (see :mod:`jit_kernels`).
        validate: ``False`` when the caller vouches for ``key_lengths`` (docs/architecture.md,
            "Validation policy"): they are not read on the host (no host sync on CUDA).

    Returns ``[B, L, H, D]`` contiguous in ``q.dtype`` (empty when ``B``, ``L``, ``H`` or ``D``
    is 0); the arithmetic is fp32 (online softmax). Equals diffusers' ``FluxAttnProcessor`` math (rotary + SDPA) within the
    attention tolerances, per valid row exactly what a batch of one unpadded sample gives.
    """
    op = "anchor_attention"
    checks.check_devices(op, q=q, k=k, v=v, cos=cos, sin=sin, key_lengths=key_lengths)
    checks.check_heads(op, "q", q)
    for name, t in (("k", k), ("v", v)):
        checks.check_heads(op, name, t)
        if t.shape != q.shape:
            raise ValueError(f"{op}: {name} {tuple(t.shape)} must match q {tuple(q.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} is {t.dtype} but q is {q.dtype}; q, k and v must share one dtype")
    b, n, _, d = q.shape
    if d % 2:
        raise ValueError(f"{op}: the head dim D must be even (rotary works on channel pairs), got D = {d}")
    checks.check_rotary_table(op, "cos", cos, b, n, d)
    checks.check_rotary_table(op, "sin", sin, b, n, d)
    if cos.dim() != sin.dim():
        raise ValueError(f"{op}: cos and sin must both be [L, D] or both [B, L, D], got {tuple(cos.shape)} "
                         f"and {tuple(sin.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d else 1.0
    else:
        scale = checks.check_float(op, "scale", scale)
        if scale <= 0.0:
            raise ValueError(f"{op}: scale must be > 0, got {scale}")
    be = resolve(op, q.device, backend)
    if key_lengths is not None:
        checks.check_lengths(op, "key_lengths", key_lengths, b, n)
        if validate:
            checks.validate_lengths(op, "key_lengths", key_lengths, n)
        key_lengths = key_lengths.to(torch.int64)
    if be == "reference":
        return anchor_attention_ref(q, k, v, cos, sin, key_lengths, scale)
    return backend_op(op, be)(q, k, v, cos, sin, key_lengths, scale, checks.kernel_validates(validate))
