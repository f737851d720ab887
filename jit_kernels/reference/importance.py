"""Plain-PyTorch references for importance-guided token activation (docs/method.md section 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["token_importance_ref", "select_new_tokens_ref", "token_topk_published"]


def token_importance_ref(field: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """3x3 local variance ``E[v^2] - E[v]^2`` (zero padding counted), mean over channels.

    ``field [B, N, C]`` -> fp32 ``[B, N]``. Not clamped at zero, like the original.
    """
    b, _, c = field.shape
    f = field.float().view(b, height, width, c).permute(0, 3, 1, 2)
    mean = F.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=True)
    sq = F.avg_pool2d(f * f, 3, stride=1, padding=1, count_include_pad=True)
    return (sq - mean * mean).mean(dim=1).reshape(b, height * width)


def select_new_tokens_ref(importance: torch.Tensor, active_idx: torch.Tensor, count: int) -> torch.Tensor:
    """Top-``count`` inactive tokens per sample, int64 ``[B, count]``.

    ``importance [B, N]``, ``active_idx [M] | [B, M]``. Order: score descending,
    ties to the lower token index; NaN ranks above every number (torch.sort).
    """
    b, n = importance.shape
    if b == 0:  # no samples (torch.stack needs at least one)
        return torch.empty((0, count), dtype=torch.int64, device=importance.device)
    if active_idx.dim() == 1:
        active_idx = active_idx.unsqueeze(0).expand(b, -1)
    out = []
    for s in range(b):
        inactive = torch.ones(n, dtype=torch.bool, device=importance.device)
        inactive[active_idx[s]] = False
        cand = inactive.nonzero().squeeze(1)  # ascending token index
        scores = importance[s].float()[cand]
        order = torch.sort(scores, descending=True, stable=True).indices[:count]
        out.append(cand[order])
    return torch.stack(out)


def token_topk_published(field: torch.Tensor, active_idx: torch.Tensor, count: int, height: int, width: int):
    """What the published pipeline does at a transition (batch 1, shared set): benchmark baseline.

    ``avg_pool2d`` variance in the field's dtype, channel mean, mask the active
    set with -inf, ``torch.topk``.
    """
    b, _, c = field.shape
    f = field.view(b, height, width, c).permute(0, 3, 1, 2)
    mean = F.avg_pool2d(f, 3, stride=1, padding=1)
    var = F.avg_pool2d(f * f, 3, stride=1, padding=1) - mean * mean
    score = var.mean(dim=1).reshape(b, -1)[0]
    score[active_idx] = float("-inf")
    return torch.topk(score, count).indices
