"""Gaussian blur parameters of the lift operator (docs/method.md section 3).

Every backend receives the same 1-D Gaussian weights tensor built here, so the
kernels never re-derive sigma or the kernel size and all backends blur with
bit-identical weights.
"""

from __future__ import annotations

import math

import torch

__all__ = ["blur_params", "gaussian_weights", "reflect_index"]


def blur_params(num_anchors: int, num_tokens: int, scale: float = 0.4) -> tuple[float, int]:
    """Blur sigma and odd kernel size for an anchor density ``rho = M / N``.

    ``L = rho ** -0.5``, ``sigma = clip(scale * L, 1, 10)``,
    ``kernel_size = 2 * ceil(3 * sigma) + 1``. Outside ``0 < rho < 1`` the
    published pipeline falls back to kernel 3, sigma 1; so do we.
    """
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    if scale <= 0:
        raise ValueError(f"blur scale must be positive, got {scale}")
    rho = num_anchors / num_tokens
    if rho <= 0.0 or rho >= 1.0:
        return 1.0, 3
    sigma = min(max(scale * rho ** -0.5, 1.0), 10.0)
    return sigma, 2 * math.ceil(3.0 * sigma) + 1


def gaussian_weights(sigma: float, kernel_size: int, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, fp32 ``[kernel_size]`` (centre at ``kernel_size // 2``)."""
    if not (isinstance(kernel_size, int) and kernel_size >= 1 and kernel_size % 2 == 1):
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    x = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
    g = torch.exp(-(x * x) / (2.0 * sigma * sigma))
    return (g / g.sum()).to(torch.float32).to(device)


def reflect_index(i: torch.Tensor, n: int) -> torch.Tensor:
    """Mirror indices into ``[0, n)`` without repeating the edge (torch ``reflect`` padding).

    Extended periodically so a kernel wider than the grid (e.g. a 1 x N grid)
    still has a defined result; inside one period it equals ``F.pad(mode="reflect")``.
    """
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = torch.remainder(i, period)
    return torch.where(i >= n, period - i, i)
