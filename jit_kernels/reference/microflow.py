"""Plain-PyTorch references for the deterministic micro-flow (docs/method.md section 5)."""

from __future__ import annotations

import torch

from .lift import lift_field_ref
from .tokens import gather_tokens_ref, scatter_tokens_ref_

__all__ = ["microflow_update_ref_", "microflow_target_ref"]


def microflow_update_ref_(y: torch.Tensor, new_idx: torch.Tensor, target: torch.Tensor, weight: float) -> torch.Tensor:
    """In place ``y[R] <- (1 - w) * y[R] + w * target``; ``w == 1`` copies ``target`` exactly.

    ``y [B, N, C]``, ``new_idx [R] | [B, R]``, ``target [B, R, C]``; returns ``y``.
    """
    if weight == 1.0:
        new = target
    else:
        cur = gather_tokens_ref(y, new_idx).float()
        new = (1.0 - weight) * cur + weight * target.float()
    return scatter_tokens_ref_(y, new_idx, new.to(y.dtype))


def microflow_target_ref(
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
    """DMF target ``(1 - sigma) * Lift_old(x0_hat)[R] + sigma * eps`` with ``x0_hat = y_prev - sigma_prev * v_prev``.

    ``y_prev, v_prev [B, N, C]`` (full fields of the previous step),
    ``anchor_idx [M] | [B, M]`` the OLD anchors with their ``nearest`` map,
    ``new_idx [R] | [B, R]``, ``eps [B, R, C]`` -> ``[B, R, C]`` in ``y_prev.dtype``.
    """
    x0 = y_prev.float() - sigma_prev * v_prev.float()
    phi = lift_field_ref(gather_tokens_ref(x0, anchor_idx), anchor_idx, nearest, weights, height, width)
    phi_r = gather_tokens_ref(phi, new_idx)
    return ((1.0 - sigma) * phi_r + sigma * eps.float()).to(y_prev.dtype)
