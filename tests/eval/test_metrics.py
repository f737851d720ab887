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


def _kid_loop(x, y):
    """Unbiased MMD^2 with the cubic polynomial kernel, written with explicit loops."""
    m, d = x.shape[0], x.shape[1]
    k = lambda u, v: (float(u @ v) / d + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_the_estimator_and_separates_distributions():
    from jit_eval.metrics import kid

    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    y = torch.randn(12, 5, generator=g, dtype=torch.float64) + 0.5
    mean, std = kid(x, y, subsets=1, subset_size=12)  # one subset of everything: the plain estimator
    assert mean == pytest.approx(_kid_loop(x, y), rel=1e-12) and std == 0.0
    same = kid(torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g), subsets=20, subset_size=200)
    far = kid(torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g) + 1.0, subsets=20, subset_size=200)
    assert abs(same[0]) < 3 * same[1] + 1e-3 and far[0] > 10 * (same[1] + abs(same[0]))
    assert kid(x, y, subsets=5, subset_size=6, seed=3) == kid(x, y, subsets=5, subset_size=6, seed=3)
    with pytest.raises(ValueError, match="widths"):
        kid(x, torch.randn(12, 4))


def test_frechet_interval_brackets_the_estimate():
    from jit_eval.metrics import frechet_interval

    g = torch.Generator().manual_seed(1)
    ref = feature_stats(torch.randn(2000, 3, generator=g, dtype=torch.float64))
    f = torch.randn(300, 3, generator=g, dtype=torch.float64) + 0.7
    lo, hi = frechet_interval(f, ref, rounds=100, seed=0)
    point = frechet_distance(feature_stats(f), ref)
    assert lo < point < hi and hi - lo < point  # 300 samples pin it to well within its size
    assert lo == pytest.approx(3 * 0.49, rel=0.5)
    assert frechet_interval(f, ref, rounds=10, seed=2) == frechet_interval(f, ref, rounds=10, seed=2)
    # Few samples in many dimensions: the raw bootstrap sits entirely above the estimate; the
    # re-centred interval still brackets it.
    wide = torch.randn(40, 30, generator=g, dtype=torch.float64)
    ref30 = feature_stats(torch.randn(3000, 30, generator=g, dtype=torch.float64))
    lo, hi = frechet_interval(wide, ref30, rounds=100)
    assert lo < frechet_distance(feature_stats(wide), ref30) < hi


def test_precision_recall_on_known_manifolds():
    from jit_eval.metrics import precision_recall

    grid = torch.stack(torch.meshgrid(torch.arange(10.0), torch.arange(10.0), indexing="ij"), -1).view(-1, 2)
    assert precision_recall(grid, grid[:50], k=3) == (1.0, pytest.approx(0.5, abs=0.15))  # half covered
    assert precision_recall(grid, grid + 100.0, k=3) == (0.0, 0.0)  # disjoint
    p, r = precision_recall(grid, torch.cat([grid[:50], grid[:50] + 100.0]), k=3)
    assert p == pytest.approx(0.5) and r > 0.3


def test_ink_is_mean_intensity():
    from jit_eval.metrics import ink

    img = -torch.ones(2, 1, 4, 4)
    img[0, 0, :2] = 1.0  # half the first image white
    assert ink(img) == pytest.approx(0.25)


def _balanced_mixture(per_class, seed, classes=10, dim=6, spread=3.0):
    """A digit-balanced set: ``per_class`` rows of each of ``classes`` Gaussian clusters (fixed centres)."""
    centres = spread * torch.randn(classes, dim, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    lab = torch.arange(classes).repeat(per_class)
    return centres[lab] + torch.randn(lab.numel(), dim, generator=g, dtype=torch.float64), lab


def test_mmd2_matches_the_loop_and_pair_weights_sum_to_one():
    from jit_eval.metrics import mmd2, pair_weights

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    assert mmd2(x[:9], y) == pytest.approx(_kid_loop(x[:9], y), rel=1e-12)
    lab = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 1, 0, 2])
    for w in (pair_weights(None, 12), pair_weights(lab, 12), pair_weights(lab, 12, origin=torch.tensor(
            [0, 0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9]))):
        assert float(w.sum()) == pytest.approx(1.0) and (w.diagonal() == 0).all()
    # one stratum = the plain i != j estimator
    assert mmd2(x, y, torch.zeros(12, dtype=torch.int64), torch.zeros(9, dtype=torch.int64)) == pytest.approx(mmd2(x, y))
    with pytest.raises(ValueError, match="at least 2 rows"):
        mmd2(x, y, torch.arange(12), None)
    with pytest.raises(ValueError, match="integer"):
        mmd2(x, y, torch.zeros(12), None)


def test_stratified_estimator_centres_on_zero_for_two_balanced_sets():
    """Two disjoint digit-balanced sets from one generator: the stratified estimate averages to 0;
    the i != j estimator (what kid() did) reads low by about 9 / (10 (n - 1)) of the same-class excess."""
    from jit_eval.metrics import mmd2, poly_kernel

    new, old, excess = [], [], []
    for r in range(150):
        a, la = _balanced_mixture(3, 2 * r)
        b, lb = _balanced_mixture(3, 2 * r + 1)
        new.append(mmd2(a, b, la, lb))
        old.append(mmd2(a, b))
        k = poly_kernel(a, b)
        same = la[:, None] == lb[None, :]
        excess.append(float(k[same].mean() - k[~same].mean()))
    new, old = torch.tensor(new), torch.tensor(old)
    se_new, se_old = float(new.std() / len(new) ** 0.5), float(old.std() / len(old) ** 0.5)
    assert abs(float(new.mean())) < 3 * se_new, (float(new.mean()), se_new)
    assert float(old.mean()) < -5 * se_old  # the old estimator fails the same check
    n, delta = 30, sum(excess) / len(excess)
    assert float(old.mean() - new.mean()) == pytest.approx(-2 * 9 * delta / (10 * (n - 1)), rel=0.2)


def test_kid_with_labels_draws_stratified_subsets():
    from jit_eval.metrics import kid, mmd2

    a, la = _balanced_mixture(4, 0)
    b, lb = _balanced_mixture(4, 1)
    full = kid(a, b, subsets=3, subset_size=40, labels_a=la, labels_b=lb)
    assert full == (pytest.approx(mmd2(a, b, la, lb)), pytest.approx(0.0, abs=1e-12))  # every subset is the whole set
    m, s = kid(a, b, subsets=10, subset_size=20, labels_a=la, labels_b=lb)
    assert s > 0 and math.isfinite(m)
    with pytest.raises(ValueError, match="labels_b"):
        kid(a, b, labels_b=lb[:-1])


def test_mmd2_test_interval_and_permutation_null():
    from jit_eval.metrics import mmd2, mmd2_test

    a, la = _balanced_mixture(6, 10)
    b, lb = _balanced_mixture(6, 11)
    ga, gb = torch.arange(6).repeat_interleave(10), torch.arange(6).repeat_interleave(10)  # 6 seed batches of 10
    same = mmd2_test(a, b, ga, gb, la, lb, rounds=100)
    assert same["estimate"] == pytest.approx(mmd2(a, b, la, lb))
    assert same["ci"][0] <= same["estimate"] <= same["ci"][1] and same["p_value"] > 0.05
    assert same["null_q95"] > 0
    far = mmd2_test(a, b + 0.8, ga, gb, la, lb, rounds=100)
    assert far["p_value"] < 0.05 and far["estimate"] > far["null_q95"] and far["ci"][0] > 0
    assert mmd2_test(a, b, ga, gb, la, lb, rounds=20, seed=4) == mmd2_test(a, b, ga, gb, la, lb, rounds=20, seed=4)
    with pytest.raises(ValueError, match="groups"):
        mmd2_test(a, b, None, gb)
    with pytest.raises(ValueError, match="rounds"):
        mmd2_test(a, b, ga, gb, rounds=1)
    with pytest.raises(ValueError, match="both sets"):
        mmd2_test(a, b, ga, gb, la, None)


def test_kid_bias_script_rejects_bad_arguments():
    from benchmarks.kid_bias import run

    with pytest.raises(ValueError, match="even"):
        run(seeds=5)
    with pytest.raises(ValueError, match="splits"):
        run(seeds=4, splits=1)
