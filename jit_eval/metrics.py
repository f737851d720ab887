"""Fidelity metrics used by the demo and the quality suite (docs/evaluation.md section 2).

All images are float tensors ``[B, C, H, W]`` with a known data range (the tiny
model works in ``[-1, 1]``, range 2). Everything runs in float64 on the CPU so
the numbers do not depend on the sampler's dtype or backend.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "frechet_distance", "feature_stats", "kid", "frechet_interval", "precision_recall",
           "ink"]


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


def _features(name: str, f: torch.Tensor, min_rows: int = 2) -> torch.Tensor:
    if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] < min_rows or not f.is_floating_point():
        got = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
        raise ValueError(f"{name} must be a float [n >= {min_rows}, D] tensor, got {got}")
    return f.double().cpu()


def kid(features_a: torch.Tensor, features_b: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance in a feature space: ``(mean, std)`` over random subsets.

    Each subset draws ``m = min(subset_size, n_a, n_b)`` rows of each set without replacement
    and takes the unbiased estimate of MMD^2 with the polynomial kernel
    ``k(x, y) = (x . y / D + 1)^3`` (Binkowski et al. 2018): the within-set means leave out the
    diagonal. Unbiased, so it is near 0 (and may be negative) for two samples of one
    distribution. Draws come from a generator seeded with ``seed``.
    """
    a, b = _features("features_a", features_a), _features("features_b", features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} and {b.shape[1]}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"need subsets >= 1 and subset_size >= 2, got {subsets}, {subset_size}")
    d = a.shape[1]
    m = min(subset_size, a.shape[0], b.shape[0])
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        x = a[torch.randperm(a.shape[0], generator=g)[:m]]
        y = b[torch.randperm(b.shape[0], generator=g)[:m]]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        vals.append(float(within - 2 * kxy.mean()))
    t = torch.tensor(vals, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if subsets > 1 else 0.0


def frechet_interval(features: torch.Tensor, reference_stats: tuple[torch.Tensor, torch.Tensor], rounds: int = 200,
                     level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval ``(lo, hi)`` of the Frechet distance of ``features [n, D]`` to a fixed
    reference: ``rounds`` resamples of the rows with replacement, the central ``level`` share of
    their distances, re-centred on the estimate by the bootstrap's own bias.

    Resampling duplicates rows, which lowers the rank of the covariance and pushes every
    resampled FD up (at 50 samples in 128 dimensions the whole bootstrap distribution lies
    above the estimate); subtracting ``mean(bootstrap) - estimate`` from both percentiles
    corrects that first-order bias, so the interval brackets the estimate.
    """
    f = _features("features", features)
    if rounds < 2 or not 0.0 < level < 1.0:
        raise ValueError(f"need rounds >= 2 and level in (0, 1), got {rounds}, {level}")
    g = torch.Generator().manual_seed(seed)
    n = f.shape[0]
    vals = torch.tensor([frechet_distance(feature_stats(f[torch.randint(0, n, (n,), generator=g)]), reference_stats)
                         for _ in range(rounds)], dtype=torch.float64)
    lo, hi = torch.quantile(vals, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    bias = float(vals.mean()) - frechet_distance(feature_stats(f), reference_stats)
    return float(lo) - bias, float(hi) - bias


def _radii(f: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of every row to its k-th nearest other row."""
    dist = torch.cdist(f, f)
    return dist.kthvalue(k + 1, dim=1).values  # +1: the row itself is at distance 0


def precision_recall(real: torch.Tensor, generated: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-nearest-neighbour manifolds.

    Each sample spans a ball reaching its k-th nearest neighbour in its own set. Precision:
    share of generated samples inside at least one real ball (are they realistic?). Recall:
    share of real samples inside at least one generated ball (is the data covered?).
    """
    r, g = _features("real", real, k + 1), _features("generated", generated, k + 1)
    if r.shape[1] != g.shape[1]:
        raise ValueError(f"feature widths differ: {r.shape[1]} and {g.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    rr, rg = _radii(r, k), _radii(g, k)
    cross = torch.cdist(g, r)  # [n_g, n_r]
    precision = (cross <= rr[None, :]).any(1).double().mean()
    recall = (cross.T <= rg[None, :]).any(1).double().mean()
    return float(precision), float(recall)


def ink(images: torch.Tensor, data_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """Mean pixel intensity of ``images`` mapped to [0, 1] (digits: white strokes on black)."""
    lo, hi = data_range
    return float(((images.double() - lo) / (hi - lo)).clamp(0, 1).mean())

