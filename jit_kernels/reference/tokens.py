"""Plain-PyTorch references for token gather / scatter.

These are the specification every backend is tested against. Index tensors are
int64, either shared by the batch (``[M]``) or per sample (``[B, M]``).
"""

from __future__ import annotations

import torch

__all__ = ["gather_tokens_ref", "scatter_tokens_ref", "scatter_tokens_ref_"]


def _expand(idx: torch.Tensor, batch: int, channels: int) -> torch.Tensor:
    if idx.dim() == 1:
        idx = idx.unsqueeze(0).expand(batch, -1)
    return idx.unsqueeze(-1).expand(-1, -1, channels)


def gather_tokens_ref(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x [B, N, C]``, ``idx [M] | [B, M]`` -> ``[B, M, C]``."""
    if idx.dim() == 1:
        return x.index_select(1, idx)
    return torch.gather(x, 1, _expand(idx, x.shape[0], x.shape[2]))


def scatter_tokens_ref_(base: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """In place: ``base[b, idx[b, m]] = src[b, m]``; returns ``base``."""
    if idx.dim() == 1:
        return base.index_copy_(1, idx, src.to(base.dtype))
    return base.scatter_(1, _expand(idx, base.shape[0], base.shape[2]), src.to(base.dtype))


def scatter_tokens_ref(base: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Out of place: a copy of ``base [B, N, C]`` with rows ``idx`` replaced by ``src [B, M, C]``."""
    return scatter_tokens_ref_(base.clone(), idx, src)
