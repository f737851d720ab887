"""Gaussian blur parameters of the lift operator (docs/method.md section 3).

Every backend receives the same 1-D Gaussian weights tensor built here, so the
kernels never re-derive sigma or the kernel size and all backends blur with
bit-identical weights.
"""

from __future__ import annotations

import math

import torch

__all__ = ["MAX_KERNEL_SIZE", "blur_params", "check_kernel_size", "gaussian_weights", "reflect_index"]

# Largest blur kernel (taps per axis) any op accepts: the window of radius 512, twice the radius a
# 256 x 256 token grid can use. The lift costs K^2 taps per cell on the GPU kernels and the CUDA
# kernel keeps the taps in shared memory, so an unbounded K (say from sigma = 1e9) would ask for
# gigabytes or run for hours; the defaults (sigma <= 10) use K <= 61.
MAX_KERNEL_SIZE = 1025


def check_kernel_size(op: str, kernel_size) -> int:
    """``kernel_size`` a positive odd int (``TypeError`` if not an int) of at most :data:`MAX_KERNEL_SIZE`."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise TypeError(f"{op}: kernel_size must be a positive odd int, got {type(kernel_size).__name__}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{op}: kernel_size must be a positive odd int, got {kernel_size!r}")
    if kernel_size > MAX_KERNEL_SIZE:
        raise ValueError(f"{op}: kernel_size {kernel_size} is larger than the {MAX_KERNEL_SIZE} supported")
    return kernel_size


def _check_positive(op: str, name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{op}: {name} must be a float, got {type(v).__name__}")
    v = float(v)
    if not (v > 0 and math.isfinite(v)):  # NaN fails both
        raise ValueError(f"{op}: {name} must be finite and positive, got {v}")
    return v


def blur_params(num_anchors: int, num_tokens: int, scale: float = 0.4) -> tuple[float, int]:
    """Blur sigma and odd kernel size for an anchor density ``rho = M / N``.

    ``L = rho ** -0.5``, ``sigma = clip(scale * L, 1, 10)``,
    ``kernel_size = 2 * ceil(3 * sigma) + 1``. Outside ``0 < rho < 1`` the
    published pipeline falls back to kernel 3, sigma 1; so do we. ``scale`` must be finite
    and positive (``ValueError``; checked whatever ``rho``).
    """
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    scale = _check_positive("blur_params", "blur scale", scale)
    rho = num_anchors / num_tokens
    if rho <= 0.0 or rho >= 1.0:
        return 1.0, 3
    sigma = min(max(scale * rho ** -0.5, 1.0), 10.0)
    return sigma, 2 * math.ceil(3.0 * sigma) + 1


def gaussian_weights(sigma: float, kernel_size: int, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian taps, fp32 ``[kernel_size]`` (centre at ``kernel_size // 2``).

    ``sigma`` finite and positive, ``kernel_size`` a positive odd int up to :data:`MAX_KERNEL_SIZE`
    (``ValueError``; ``TypeError`` for wrong types). A sigma so small that ``2 sigma^2``
    underflows gives the identity taps (the limit), not NaN.
    """
    op = "gaussian_weights"
    check_kernel_size(op, kernel_size)
    sigma = _check_positive(op, "sigma", sigma)
    x = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
    denom = 2.0 * sigma * sigma
    if denom == 0.0:  # sigma below ~1e-162: 0 / 0 at the centre
        return (x == 0).to(torch.float32).to(device)
    g = torch.exp(-(x * x) / denom)
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
