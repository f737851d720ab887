"""Fidelity metrics used by the demo and the quality suite (docs/evaluation.md section 2).

All images are float tensors ``[B, C, H, W]`` with a known data range (the tiny
model works in ``[-1, 1]``, range 2). Everything runs in float64 on the CPU so
the numbers do not depend on the sampler's dtype or backend.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "frechet_distance", "feature_stats"]


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"images must be two [B, C, H, W] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB, ``[B]``; identical images give ``inf``."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gauss_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, window: int = 7, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004, Gaussian window, K1 = 0.01, K2 = 0.03), ``[B]``.

    A 7-tap window (instead of the usual 11) suits the 32 x 32 digits; the
    statistics are computed over valid positions only (no padding).
    """
    _check_pair(a, b)
    a, b = a.double(), b.double()
    c = a.shape[1]
    w = _gauss_window(window, sigma).expand(c, 1, window, window)
    mu_a, mu_b = F.conv2d(a, w, groups=c), F.conv2d(b, w, groups=c)
    saa = F.conv2d(a * a, w, groups=c) - mu_a**2
    sbb = F.conv2d(b * b, w, groups=c) - mu_b**2
    sab = F.conv2d(a * b, w, groups=c) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return s.flatten(1).mean(1)


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and covariance ``[D, D]`` (unbiased) of ``features [n, D]``, float64."""
    f = features.double()
    if f.dim() != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [n >= 2, D], got {tuple(f.shape)}")
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(stats_a: tuple[torch.Tensor, torch.Tensor], stats_b: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Frechet distance between two Gaussians ``(mu, cov)``:
    ``|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)``."""
    mu_a, s_a = stats_a
    mu_b, s_b = stats_b
    ra = _sqrtm_psd(s_a)
    cross = _sqrtm_psd(ra @ s_b @ ra)
    val = (mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * cross.trace()
    return float(val.clamp_min(0.0)) if math.isfinite(float(val)) else float("nan")
