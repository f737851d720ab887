"""Benchmark cases of the jit_kernels ops, shared by the runner (bench_ops.py) and pytest-benchmark.

Each case pairs our op with the plain-PyTorch composition a user would write:
``published`` is what the authors' reference pipeline runs every step (an N x M
``torch.cdist`` + argmin + gather, a 2-D Gaussian conv with reflect padding, a
masked compose; ``avg_pool2d`` variance + ``topk``); ``torch`` is the best plain
composition with the per-stage state (the nearest map) cached. ``bytes`` is the
minimal memory traffic of the op, used for the achieved GB/s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

import jit_kernels as jk
from jit_kernels import reference as ref

__all__ = ["Case", "make_cases", "SIZES"]

# (grid side, batch, anchor ratio): FLUX 1024^2 = 64 x 64 tokens, 2048^2 = 128 x 128.
SIZES = [(64, 1, 0.32), (64, 1, 0.60), (64, 4, 0.32), (128, 1, 0.32), (128, 4, 0.32)]
CHANNELS = 64


@dataclass
class Case:
    op: str
    size: str
    dtype: str
    bytes: int
    impls: dict[str, Callable[[], object]] = field(default_factory=dict)


def _torch_lift_cached(values, anchor_idx, nearest, w2, mask, h, w):
    """gather by the cached map + depthwise 2-D conv with reflect padding + where."""
    b, _, c = values.shape
    k = w2.shape[-1]
    filled = values.index_select(1, nearest).view(b, h, w, c).permute(0, 3, 1, 2)
    blurred = F.conv2d(F.pad(filled, (k // 2,) * 4, mode="reflect"), w2, groups=c)
    blurred = blurred.permute(0, 2, 3, 1).reshape(b, h * w, c)
    exact = torch.zeros_like(blurred).index_copy_(1, anchor_idx, values)
    return torch.where(mask[None, :, None], exact, blurred)


def _torch_importance_topk(field, active_idx, count, h, w):
    b, _, c = field.shape
    f = field.view(b, h, w, c).permute(0, 3, 1, 2)
    mean = F.avg_pool2d(f, 3, stride=1, padding=1)
    var = F.avg_pool2d(f * f, 3, stride=1, padding=1) - mean * mean
    score = var.mean(dim=1).reshape(b, -1)
    score[:, active_idx] = float("-inf")
    return torch.topk(score, count, dim=1).indices


def make_cases(device: str = "cpu", dtypes=(torch.float32,), sizes=SIZES, backend: str = "auto") -> list[Case]:
    gen = torch.Generator().manual_seed(0)
    cases = []
    for side, batch, ratio in sizes:
        for dt in dtypes:
            cases += _size_cases(device, dt, side, batch, ratio, backend, gen)
    return cases


def _size_cases(device, dt, side, batch, ratio, backend, gen) -> list[Case]:
    """All cases of one size; a function scope so every lambda binds this size's tensors."""
    h = w = side
    n, c = h * w, CHANNELS
    m = int(n * ratio)
    anchors = torch.randperm(n, generator=gen)[:m].sort().values.to(device)
    nearest = jk.nearest_anchor_map(anchors, h, w)
    weights = jk.lift_weights(m, n, device=device)
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[anchors] = True
    new_count = int(n * 0.62) - m if ratio < 0.62 else (n - m) // 2
    tag = f"{side}x{side} B={batch} C={c} M={m} ({ratio:.2f})"
    dname = str(dt).replace("torch.", "")
    es = torch.tensor([], dtype=dt).element_size()
    x = torch.randn(batch, n, c, generator=gen).to(device=device, dtype=dt)
    vals = torch.randn(batch, m, c, generator=gen).to(device=device, dtype=dt)
    y = x.clone()
    w2 = (weights[:, None] * weights[None, :]).to(dt).expand(c, 1, -1, -1).contiguous()
    free = mask.logical_not().nonzero().squeeze(1)[:new_count]
    eps = torch.randn(batch, new_count, c, generator=gen).to(device=device, dtype=dt)
    grid = torch.stack([torch.arange(n, device=device) // w, torch.arange(n, device=device) % w], 1).float()
    kb = dict(backend=backend, validate=False)  # "ours": the kernels as the sampler calls them (trusted path)
    kc = dict(backend=backend)  # "checked": the public default, index values checked on every call
    lift_bytes = batch * (m + n) * c * es + n * 8
    return [
        Case("gather_tokens", tag, dname, 2 * batch * m * c * es + m * 8, {
            "ours": lambda: jk.gather_tokens(x, anchors, **kb),
            "checked": lambda: jk.gather_tokens(x, anchors, **kc),
            "torch": lambda: x.index_select(1, anchors),
        }),
        Case("scatter_tokens_", tag, dname, 2 * batch * m * c * es + m * 8, {
            "ours": lambda: jk.scatter_tokens_(y, anchors, vals, **kb),
            "checked": lambda: jk.scatter_tokens_(y, anchors, vals, **kc),
            "torch": lambda: y.index_copy_(1, anchors, vals),
        }),
        Case("nearest_anchor_map", tag, "int64", n * 8 + m * 8, {
            "ours": lambda: jk.nearest_anchor_map(anchors, h, w, **kb),
            "checked": lambda: jk.nearest_anchor_map(anchors, h, w, **kc),
            "published": lambda: torch.cdist(grid, grid[anchors]).argmin(1),
        }),
        Case("lift_field", tag, dname, lift_bytes, {
            "ours": lambda: jk.lift_field(vals, anchors, h, w, nearest=nearest, **kb),
            "checked": lambda: jk.lift_field(vals, anchors, h, w, nearest=nearest, **kc),
            "torch": lambda: _torch_lift_cached(vals, anchors, nearest, w2, mask, h, w),
            "published": lambda: ref.lift_field_published(vals, anchors, weights, h, w),
        }),
        Case("lift_euler_", tag, dname, lift_bytes + batch * n * c * es, {
            "ours": lambda: jk.lift_euler_(y, vals, anchors, h, w, -0.01, nearest=nearest, **kb),
            "checked": lambda: jk.lift_euler_(y, vals, anchors, h, w, -0.01, nearest=nearest, **kc),
            "torch": lambda: y.add_(_torch_lift_cached(vals, anchors, nearest, w2, mask, h, w), alpha=-0.01),
        }),
        Case("importance+select", tag, dname, batch * n * c * es + batch * n * 4, {
            "ours": lambda: jk.select_new_tokens(jk.token_importance(x, h, w, backend=backend), anchors, new_count, **kb),
            "checked": lambda: jk.select_new_tokens(jk.token_importance(x, h, w, backend=backend), anchors, new_count, **kc),
            "torch": lambda: _torch_importance_topk(x, anchors, new_count, h, w),
        }),
        Case("microflow_target", tag, dname, 2 * batch * n * c * es + 2 * batch * new_count * c * es, {
            "ours": lambda: jk.microflow_target(x, x, anchors, free, eps, 0.8, 0.7, h, w, nearest=nearest, **kb),
            "checked": lambda: jk.microflow_target(x, x, anchors, free, eps, 0.8, 0.7, h, w, nearest=nearest, **kc),
            "torch": lambda: (0.3 * _torch_lift_cached((x - 0.8 * x).index_select(1, anchors), anchors, nearest, w2,
                                                       mask, h, w).index_select(1, free) + 0.7 * eps),
        }),
    ]
