"""Fidelity metrics: closed-form cases."""

import math

import pytest
import torch

from jit_eval.metrics import feature_stats, frechet_distance, psnr, ssim


def test_psnr_known_value_and_identity():
    a = torch.zeros(2, 1, 8, 8)
    b = a + 0.1  # mse 0.01, range 2 -> 10 log10(4 / 0.01)
    torch.testing.assert_close(psnr(a, b), torch.full((2,), 10 * math.log10(400.0), dtype=torch.float64))
    assert torch.isinf(psnr(a, a)).all()


def test_ssim_bounds_and_symmetry():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 32, 32, generator=g) * 2 - 1
    b = (a + 0.3 * torch.randn(3, 1, 32, 32, generator=g)).clamp(-1, 1)
    torch.testing.assert_close(ssim(a, a), torch.ones(3, dtype=torch.float64))
    s = ssim(a, b)
    assert (s < 0.9).all() and (s > -1).all()
    torch.testing.assert_close(s, ssim(b, a))


def test_frechet_distance_closed_form():
    # Diagonal Gaussians: |mu_a - mu_b|^2 + sum (sd_a - sd_b)^2.
    mu_a, mu_b = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    s_a, s_b = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64)), torch.diag(torch.tensor([1.0, 9.0], dtype=torch.float64))
    assert frechet_distance((mu_a, s_a), (mu_b, s_b)) == pytest.approx(1.0 + 1.0 + 4.0)
    f = torch.randn(500, 6, generator=torch.Generator().manual_seed(1))
    st = feature_stats(f)
    assert frechet_distance(st, st) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(st, feature_stats(f + 1.0)) == pytest.approx(6.0, rel=1e-6)


def test_metric_shape_errors():
    with pytest.raises(ValueError, match="one shape"):
        psnr(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="n >= 2"):
        feature_stats(torch.zeros(1, 3))
