"""Fidelity metrics used by the demo and the quality suite (docs/evaluation.md section 2).

All images are float tensors ``[B, C, H, W]`` with a known data range (the tiny
model works in ``[-1, 1]``, range 2). Everything runs in float64 on the CPU so
the numbers do not depend on the sampler's dtype or backend.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "frechet_distance", "feature_stats", "kid", "mmd2", "mmd2_test", "poly_kernel",
           "pair_weights",
           "frechet_interval", "precision_recall", "ink"]


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


def poly_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KID's cubic polynomial kernel ``k(x, y) = (x . y / D + 1)^3`` (Binkowski et al. 2018), ``[n_x, n_y]``."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def _check_labels(name: str, labels, n: int) -> torch.Tensor | None:
    if labels is None:
        return None
    lab = torch.as_tensor(labels)
    if lab.shape != (n,) or lab.is_floating_point() or lab.is_complex():
        raise ValueError(f"{name} must be an integer [{n}] tensor (one stratum per row), got "
                         f"{lab.dtype} {tuple(lab.shape)}")
    if lab.numel() and int(lab.unique(return_counts=True)[1].min()) < 2:
        raise ValueError(f"{name}: every stratum needs at least 2 rows for the within-set term")
    return lab.cpu()


def pair_weights(labels: torch.Tensor | None, n: int, origin: torch.Tensor | None = None) -> torch.Tensor:
    """``[n, n]`` weights of the within-set term ``sum_ij W_ij k(x_i, x_j)`` of the unbiased MMD^2.

    Without ``labels`` (i.i.d. rows): ``1 / (n (n - 1))`` off the diagonal. With ``labels``
    (a *stratified* set: ``n_c`` i.i.d. rows of each stratum ``c``, e.g. a digit-balanced batch),
    the set is a sample of the mixture with weights ``n_c / n``, whose ``E k(x, x')`` pairs two
    *independent* draws: a pair of strata ``c != c'`` weighs ``1 / n^2`` and a pair inside stratum
    ``c`` weighs ``n_c / ((n_c - 1) n^2)``, so a stratum's own pairs get the share ``n_c / n`` they
    have under independent draws instead of ``(n_c - 1) / (n - 1)`` (leaving out only ``i == j``
    on a balanced set of 10 strata misses the same-stratum excess by ``9 / (10 (n - 1))``).
    ``origin`` (bootstrap resamples) marks copies of one row: their pairs count as ``i == j`` and
    the stratum's share goes to its other pairs.
    """
    strata = torch.zeros(n, dtype=torch.int64) if labels is None else labels
    same = strata[:, None] == strata[None, :]
    valid = origin[:, None] != origin[None, :] if origin is not None else ~torch.eye(n, dtype=torch.bool)
    _, inverse, counts = strata.unique(return_inverse=True, return_counts=True)
    pairs = torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, inverse, (same & valid).sum(1).double())
    if bool((pairs == 0).any()):
        raise ValueError("every stratum needs two distinct rows for the within-set term")
    share = counts.double() ** 2 / (n * n)  # the stratum's own pairs under independent draws: (n_c / n)^2
    w = torch.where(same, (share / pairs)[inverse][:, None].expand(n, n), torch.full((), 1.0 / (n * n),
                                                                                      dtype=torch.float64))
    return torch.where(valid, w, torch.zeros((), dtype=torch.float64))


def mmd2(features_a: torch.Tensor, features_b: torch.Tensor, labels_a=None, labels_b=None) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel between two *independent* sample sets.

    The cross term averages ``k(a_i, b_j)`` over all pairs; the within-set terms use
    :func:`pair_weights`: ``i != j`` for i.i.d. rows, or, with ``labels_a`` / ``labels_b``
    (strata, e.g. the digit of a digit-balanced batch), the stratified weights that keep the
    estimate unbiased for a set drawn ``n_c`` rows per stratum. The two sets must not share
    inputs (e.g. sampler noise): a shared seed correlates the cross pairs and biases it down.
    """
    a, b = _features("features_a", features_a), _features("features_b", features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} and {b.shape[1]}")
    la, lb = _check_labels("labels_a", labels_a, a.shape[0]), _check_labels("labels_b", labels_b, b.shape[0])
    return _mmd2_gram(poly_kernel(a, a), poly_kernel(b, b), poly_kernel(a, b), la, lb)


def _mmd2_gram(k_aa, k_bb, k_ab, la=None, lb=None, origin_a=None, origin_b=None) -> float:
    return float((pair_weights(la, k_aa.shape[0], origin_a) * k_aa).sum()
                 + (pair_weights(lb, k_bb.shape[0], origin_b) * k_bb).sum() - 2 * k_ab.mean())


def _group_rows(groups: torch.Tensor) -> list[torch.Tensor]:
    return [torch.nonzero(groups == v)[:, 0] for v in groups.unique()]


def _resample_groups(n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` of ``n`` groups with replacement, redrawn until at least two differ (a resample of
    one group repeated has no within-set pairs)."""
    while True:
        pick = torch.randint(0, n, (n,), generator=g)
        if pick.unique().numel() >= 2:
            return pick


def mmd2_test(features_a: torch.Tensor, features_b: torch.Tensor, groups_a, groups_b, labels_a=None, labels_b=None,
              rounds: int = 200, level: float = 0.95, seed: int = 0) -> dict:
    """:func:`mmd2` between two independent sets, with the sampling noise of whole groups of rows.

    ``groups_a`` / ``groups_b`` ``[n]`` name each row's group (the seed batch it came from: the
    unit that was drawn at random). Returns ``estimate``; ``ci``: the central ``level`` interval
    of ``rounds`` bootstrap estimates, each resampling the groups of both sets with replacement
    (copies of one row are left out of the within-set pairs; a resample of a single group is
    redrawn); ``p_value`` and ``null_q95``: the
    permutation test of "one distribution", which re-deals the pooled groups into sets of the
    original sizes ``rounds`` times (``p = (1 + #{null >= estimate}) / (1 + rounds)``; ``null_q95``
    is the null's 95th percentile, the size of a difference that noise alone reaches).
    Labels (strata) travel with their rows; each group should hold whole strata (a seed batch
    of every digit) so that resampled sets stay stratified.
    """
    a, b = _features("features_a", features_a), _features("features_b", features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} and {b.shape[1]}")
    la, lb = _check_labels("labels_a", labels_a, a.shape[0]), _check_labels("labels_b", labels_b, b.shape[0])
    ga, gb = groups_a, groups_b
    if ga is None or gb is None:
        raise ValueError("groups_a and groups_b are required (the seed batch of each row)")
    ga, gb = torch.as_tensor(ga).cpu(), torch.as_tensor(gb).cpu()
    for name, v, n in (("groups_a", ga, a.shape[0]), ("groups_b", gb, b.shape[0])):
        if v.shape != (n,) or v.is_floating_point():
            raise ValueError(f"{name} must be an integer [{n}] tensor, got {v.dtype} {tuple(v.shape)}")
        if v.unique().numel() < 2:
            raise ValueError(f"{name}: need at least 2 groups to resample")
    if rounds < 2 or not 0.0 < level < 1.0:
        raise ValueError(f"need rounds >= 2 and level in (0, 1), got {rounds}, {level}")
    if (la is None) != (lb is None):
        raise ValueError("give labels for both sets or for neither (the permutation pools their rows)")
    f = torch.cat([a, b])
    lab = None if la is None else torch.cat([la, lb])
    k = poly_kernel(f, f)
    units = _group_rows(ga) + [r + a.shape[0] for r in _group_rows(gb)]
    n_a = len(_group_rows(ga))

    def est(ia, ib, oa=None, ob=None):
        return _mmd2_gram(k[ia][:, ia], k[ib][:, ib], k[ia][:, ib], None if lab is None else lab[ia],
                          None if lab is None else lab[ib], oa, ob)

    ia0, ib0 = torch.cat(units[:n_a]), torch.cat(units[n_a:])
    estimate = est(ia0, ib0)
    g = torch.Generator().manual_seed(seed)
    boot, null = [], []
    for _ in range(rounds):
        pa, pb = (lo + _resample_groups(n, g) for lo, n in ((0, n_a), (n_a, len(units) - n_a)))
        ia, ib = torch.cat([units[i] for i in pa]), torch.cat([units[i] for i in pb])
        boot.append(est(ia, ib, ia, ib))  # a row's index is its origin
        perm = torch.randperm(len(units), generator=g)
        null.append(est(torch.cat([units[i] for i in perm[:n_a]]), torch.cat([units[i] for i in perm[n_a:]])))
    boot_t, null_t = torch.tensor(boot, dtype=torch.float64), torch.tensor(null, dtype=torch.float64)
    lo, hi = torch.quantile(boot_t, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return dict(estimate=estimate, ci=(float(lo), float(hi)),
                p_value=(1 + int((null_t >= estimate).sum())) / (1 + rounds),
                null_q95=float(torch.quantile(null_t, 0.95)), rounds=rounds)


def _stratified_pick(labels: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """Rows of a random subset of about ``size`` rows with every stratum's share kept (at least 2 each)."""
    n = labels.shape[0]
    out = []
    for c in labels.unique():
        rows = torch.nonzero(labels == c)[:, 0]
        k = min(rows.numel(), max(2, round(size * rows.numel() / n)))
        out.append(rows[torch.randperm(rows.numel(), generator=g)[:k]])
    return torch.cat(out)


def kid(features_a: torch.Tensor, features_b: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0, labels_a=None, labels_b=None) -> tuple[float, float]:
    """Kernel Inception Distance in a feature space: ``(mean, std)`` over random subsets.

    Each subset draws ``m = min(subset_size, n_a, n_b)`` rows of each set without replacement
    and takes :func:`mmd2` (cubic polynomial kernel, Binkowski et al. 2018): near 0 (and
    possibly negative) for two independent samples of one distribution. Sets built stratum by
    stratum (digit-balanced batches) need their ``labels_a`` / ``labels_b``: the subsets are
    then drawn per stratum, keeping each stratum's share, and scored with the stratified
    weights; without them such sets read low (by about ``9 / (10 (m - 1))`` of the
    same-stratum kernel excess for 10 balanced strata). Draws come from a generator seeded
    with ``seed``.
    """
    a, b = _features("features_a", features_a), _features("features_b", features_b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} and {b.shape[1]}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"need subsets >= 1 and subset_size >= 2, got {subsets}, {subset_size}")
    la, lb = _check_labels("labels_a", labels_a, a.shape[0]), _check_labels("labels_b", labels_b, b.shape[0])
    m = min(subset_size, a.shape[0], b.shape[0])
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        ia = torch.randperm(a.shape[0], generator=g)[:m] if la is None else _stratified_pick(la, m, g)
        ib = torch.randperm(b.shape[0], generator=g)[:m] if lb is None else _stratified_pick(lb, m, g)
        vals.append(mmd2(a[ia], b[ib], None if la is None else la[ia], None if lb is None else lb[ib]))
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

