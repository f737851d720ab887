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
    cases = []
    gen = torch.Generator().manual_seed(0)
    for side, batch, ratio in sizes:
        h = w = side
        n, c = h * w, CHANNELS
        m = int(n * ratio)
        anchors = torch.randperm(n, generator=gen)[:m].sort().values.to(device)
        nearest = jk.nearest_anchor_map(anchors, h, w)
        weights = jk.lift_weights(m, n, device=device)
        mask = torch.zeros(n, dtype=torch.bool, device=device)
        mask[anchors] = True
        new_count = int(n * 0.62) - m if ratio < 0.62 else (n - m) // 2
        for dt in dtypes:
            tag = f"{side}x{side} B={batch} C={c} M={m} ({ratio:.2f})"
            dname = str(dt).replace("torch.", "")
            es = torch.tensor([], dtype=dt).element_size()
            x = torch.randn(batch, n, c, generator=gen).to(device=device, dtype=dt)
            vals = torch.randn(batch, m, c, generator=gen).to(device=device, dtype=dt)
            y = x.clone()
            w2 = (weights[:, None] * weights[None, :]).to(dt).expand(c, 1, -1, -1).contiguous()
            kb = dict(backend=backend)

            cases.append(Case("gather_tokens", tag, dname, 2 * batch * m * c * es + m * 8, {
                "ours": lambda x=x, a=anchors: jk.gather_tokens(x, a, **kb),
                "torch": lambda x=x, a=anchors: x.index_select(1, a),
            }))
            cases.append(Case("scatter_tokens_", tag, dname, 2 * batch * m * c * es + m * 8, {
                "ours": lambda y=y, a=anchors, v=vals: jk.scatter_tokens_(y, a, v, **kb),
                "torch": lambda y=y, a=anchors, v=vals: y.index_copy_(1, a, v),
            }))
            cases.append(Case("nearest_anchor_map", tag, "int64", n * 8 + m * 8, {
                "ours": lambda a=anchors: jk.nearest_anchor_map(a, h, w, **kb),
                "published": lambda a=anchors: torch.cdist(
                    torch.stack([torch.arange(n, device=device) // w, torch.arange(n, device=device) % w], 1).float(),
                    torch.stack([a // w, a % w], 1).float()).argmin(1),
            }))
            lift_bytes = batch * (m + n) * c * es + n * 8
            cases.append(Case("lift_field", tag, dname, lift_bytes, {
                "ours": lambda v=vals, a=anchors: jk.lift_field(v, a, h, w, nearest=nearest, **kb),
                "torch": lambda v=vals, a=anchors, w2=w2: _torch_lift_cached(v, a, nearest, w2, mask, h, w),
                "published": lambda v=vals, a=anchors: ref.lift_field_published(v, a, weights, h, w),
            }))
            cases.append(Case("lift_euler_", tag, dname, lift_bytes + batch * n * c * es, {
                "ours": lambda v=vals, a=anchors, y=y: jk.lift_euler_(y, v, a, h, w, -0.01, nearest=nearest, **kb),
                "torch": lambda v=vals, a=anchors, y=y, w2=w2: y.add_(
                    _torch_lift_cached(v, a, nearest, w2, mask, h, w), alpha=-0.01),
            }))
            cases.append(Case("importance+select", tag, dname, batch * n * c * es + batch * n * 4, {
                "ours": lambda x=x, a=anchors: jk.select_new_tokens(
                    jk.token_importance(x, h, w, **kb), a, new_count, **kb),
                "torch": lambda x=x, a=anchors: _torch_importance_topk(x, a, new_count, h, w),
            }))
            free = mask.logical_not().nonzero().squeeze(1)[:new_count]
            eps = torch.randn(batch, new_count, c, generator=gen).to(device=device, dtype=dt)
            cases.append(Case("microflow_target", tag, dname, 2 * batch * n * c * es + 2 * batch * new_count * c * es, {
                "ours": lambda x=x, a=anchors, r=free, e=eps: jk.microflow_target(
                    x, x, a, r, e, 0.8, 0.7, h, w, nearest=nearest, **kb),
                "torch": lambda x=x, a=anchors, r=free, e=eps, w2=w2: (
                    0.3 * _torch_lift_cached((x - 0.8 * x).index_select(1, a), a, nearest, w2, mask, h, w)
                    .index_select(1, r) + 0.7 * e),
            }))
    return cases
