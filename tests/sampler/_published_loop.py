"""An independent transcription of the published JiT loop, written from docs/method.md
sections 2-6 (not from the package or anyone's code), for the reference-preset parity test.

Plain torch, batch 1, one shared active list kept in insertion order, the nearest-anchor
map from a full distance matrix every step (as the published pipeline does), the blend DMF
with the caller's noise tensor. Deliberately naive: clarity over speed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def lattice(h: int, w: int) -> list[int]:
    """Even row and even column, plus the whole border, row-major."""
    return [r * w + c for r in range(h) for c in range(w)
            if (r % 2 == 0 and c % 2 == 0) or r in (0, h - 1) or c in (0, w - 1)]


def _blur_taps(m: int, n: int) -> tuple[torch.Tensor, int]:
    rho = m / n
    if rho <= 0 or rho >= 1:
        sigma, k = 1.0, 3
    else:
        sigma = min(max(0.4 * rho ** -0.5, 1.0), 10.0)
        k = 2 * math.ceil(3 * sigma) + 1
    x = torch.arange(k, dtype=torch.float64) - k // 2
    g = torch.exp(-x * x / (2 * sigma * sigma))
    return (g / g.sum()).float(), k


def lift(vals: torch.Tensor, anchors: list[int], h: int, w: int) -> torch.Tensor:
    """``vals [M, C]`` at ``anchors`` (a list, in order) -> ``[H*W, C]``: nearest fill (ties to the
    earliest list entry), separable Gaussian blur with reflect padding, anchors exact."""
    n = h * w
    a = torch.tensor(anchors)
    cells = torch.arange(n)
    pos = torch.stack([cells // w, cells % w], 1).double()
    d = torch.cdist(pos, pos[a])  # [N, M]
    nearest = d.argmin(dim=1)  # the first minimum: the earliest entry of the list
    filled = vals[nearest]  # [N, C]
    taps, k = _blur_taps(len(anchors), n)
    c = vals.shape[1]
    img = filled.T.reshape(1, c, h, w)
    r = k // 2
    img = F.pad(img, (r, r, 0, 0), mode="reflect")
    img = F.conv2d(img, taps.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    img = F.pad(img, (0, 0, r, r), mode="reflect")
    img = F.conv2d(img, taps.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    out = img.reshape(c, n).T.clone()
    out[a] = vals
    return out


def importance(field: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """3x3 local variance (zero padding counted), channel mean, min-max normalised and divided by
    its sum as the reference does: ``[N, C] -> [N]``."""
    v = field.T.reshape(1, -1, h, w)
    mean = F.avg_pool2d(v, 3, stride=1, padding=1, count_include_pad=True)
    sq = F.avg_pool2d(v * v, 3, stride=1, padding=1, count_include_pad=True)
    s = (sq - mean * mean).mean(1).flatten()
    s = (s - s.min()) / (s.max() - s.min() + 1e-12)
    return s / s.sum()


def published_loop(velocity, y0: torch.Tensor, h: int, w: int, sigmas, total_steps: int, stage_ratios,
                   token_ratios, init_anchors: list[int], eps: torch.Tensor, relax_steps: int = 3) -> torch.Tensor:
    """``y0 [N, C]`` at sigmas[0] -> the latent at sigmas[-1]. ``velocity(x [M, C], idx list, sigma)``."""
    n = h * w
    ends = [int(total_steps * r) for r in stage_ratios]
    budgets = [int(n * r) for r in token_ratios]
    stage_of = [next(k for k, e in enumerate(ends) if i < e) for i in range(total_steps)]
    active = list(init_anchors)
    assert len(active) == budgets[0]
    y = y0.clone().float()
    y_prev = v_prev = None
    for i in range(total_steps):
        k = stage_of[i]
        if i > 0 and k != stage_of[i - 1]:
            count = budgets[k] - len(active)
            if budgets[k] == n:
                taken = set(active)
                new = [t for t in range(n) if t not in taken]  # the rest, row-major
            else:
                score = importance(v_prev, h, w)
                score[torch.tensor(active)] = -float("inf")
                new = score.topk(count).indices.tolist()  # descending importance
            x0 = y_prev - sigmas[i - 1] * v_prev
            phi = lift(x0[torch.tensor(active)], active, h, w)[torch.tensor(new)]
            target = (1 - sigmas[i]) * phi + sigmas[i] * eps[torch.tensor(new)]
            wgt = 1.0 / relax_steps
            y[torch.tensor(new)] = (1 - wgt) * y[torch.tensor(new)] + wgt * target
            active = active + new
        idx = torch.tensor(active)
        v = velocity(y[idx], active, sigmas[i]).float()
        v_full = lift(v, active, h, w) if len(active) < n else torch.zeros_like(y).index_copy(0, idx, v)
        y_prev, v_prev = y.clone(), v_full
        y = y + (sigmas[i + 1] - sigmas[i]) * v_full
    return y
