"""Metadata checks of every op's kernel arguments, one function per row of the op table.

Each function takes the op's schema arguments (without the trailing ``validate``) and raises,
before any work, what the C++ kernels of the same op raise with ``TORCH_CHECK`` for the same
arguments (``csrc/checks.h``, ``csrc/cpu/<family>.cpp``): the same conditions, with the
exception type their macro maps to (``TORCH_CHECK_TYPE`` -> ``TypeError``,
``TORCH_CHECK_VALUE`` -> ``ValueError``) and a message starting like theirs. Checked: tensor
ranks, shapes, dtypes, devices, grid sizes, scalar bounds, and the memory of in-place targets
(no internal overlap, nothing shared with an input).

They are what :func:`jit_kernels.triton.guarded` runs on every call of a Triton launcher
(``torch.ops.jit_kernels.<op>_triton``, and ``torch.ops.jit_kernels.<op>`` on CUDA for the ops
Triton serves there), so a direct call of a Triton kernel refuses the shapes a C++ kernel
refuses instead of reading or writing out of bounds. Index *values* are checked afterwards,
only with ``validate=True`` (:mod:`jit_kernels._values`).

None of them reads a tensor's values (sizes, strides, dtypes, devices and data pointers only),
so they cost no host sync on CUDA. The public functions (:mod:`jit_kernels.tokens`, ...) check
their own, wider arguments first with :mod:`jit_kernels._checks`; these run again inside the
kernel, as the C++ checks do.
"""

from __future__ import annotations

import math

import torch

from . import _checks as checks

__all__ = [
    "gather_tokens", "scatter_tokens", "scatter_tokens_", "nearest_anchor_map", "lift_field", "lift_euler_",
    "token_importance", "select_new_tokens", "microflow_update_", "microflow_target", "anchor_attention",
]


# ---------------------------------------------------------------- helpers (csrc/checks.h)


def _same_device(op: str, a: torch.Tensor, an: str, b: torch.Tensor, bn: str) -> None:
    """check_same_device: ``ValueError`` when ``a`` and ``b`` are on different devices."""
    if a.device != b.device:
        raise ValueError(f"{op}: {an} ({a.device}) and {bn} ({b.device}) must be on one device")


def _index(op: str, name: str, idx, batch: int) -> None:
    """check_index_meta: int64 ``[M]`` or ``[batch, M]``."""
    checks.check_index(op, name, idx, batch, 0)  # values=False: no value is read


def _weights(op: str, w) -> None:
    """check_weights: fp32, odd-length ``[K]``."""
    checks.check_tensor(op, "weights", w)
    if w.dtype != torch.float32:
        raise TypeError(f"{op}: weights must be float32, got {w.dtype}")
    if w.dim() != 1 or w.shape[0] % 2 != 1:
        raise ValueError(f"{op}: weights must be an odd-length [K] tensor, got {list(w.shape)}")


def _rows(op: str, name: str, t: torch.Tensor, b: int, r: int, c: int, letters: str = "R") -> None:
    """``t`` (a checked token tensor) is ``[b, r, c]``."""
    if tuple(t.shape) != (b, r, c):
        raise ValueError(f"{op}: {name} must be [B, {letters}, C] = [{b}, {r}, {c}], got {list(t.shape)}")


# ---------------------------------------------------------------- tokens (csrc/cpu/tokens.cpp)


def gather_tokens(x, idx):
    op = "gather_tokens"
    checks.check_tokens(op, "x", x)
    _index(op, "idx", idx, x.shape[0])
    _same_device(op, x, "x", idx, "idx")


def _scatter(op, base, idx, src):
    """check_scatter_meta."""
    checks.check_tokens(op, "base", base)
    checks.check_tokens(op, "src", src)
    _index(op, "idx", idx, base.shape[0])
    _same_device(op, base, "base", idx, "idx")
    _same_device(op, base, "base", src, "src")
    _rows(op, "src", src, base.shape[0], idx.shape[-1], base.shape[2], "M")


def scatter_tokens(base, idx, src):
    _scatter("scatter_tokens", base, idx, src)


def scatter_tokens_(base, idx, src):
    op = "scatter_tokens_"
    _scatter(op, base, idx, src)
    checks.check_inplace(op, "base", base, idx=idx, src=src)  # check_scatter_target


# ---------------------------------------------------------------- lift (csrc/cpu/lift.cpp)


def nearest_anchor_map(anchor_idx, height, width):
    op = "nearest_anchor_map"
    checks.check_grid(op, height, width)
    checks.check_tensor(op, "anchor_idx", anchor_idx)
    _index(op, "anchor_idx", anchor_idx, anchor_idx.shape[0] if anchor_idx.dim() == 2 else 1)
    if anchor_idx.shape[-1] == 0:
        raise ValueError(f"{op}: anchor_idx is empty; at least one anchor is required")


def _lift(op, values, anchor_idx, nearest, weights, height, width):
    """check_lift_meta."""
    checks.check_tokens(op, "values", values)
    checks.check_grid(op, height, width)
    b, m, n = values.shape[0], values.shape[1], height * width
    _index(op, "anchor_idx", anchor_idx, b)
    _index(op, "nearest", nearest, b)
    _weights(op, weights)
    _same_device(op, values, "values", anchor_idx, "anchor_idx")
    _same_device(op, values, "values", nearest, "nearest")
    _same_device(op, values, "values", weights, "weights")
    if m == 0:
        raise ValueError(f"{op}: anchor_idx is empty; at least one anchor is required")
    if anchor_idx.shape[-1] != m:
        raise ValueError(f"{op}: values has {m} rows but anchor_idx has {anchor_idx.shape[-1]} anchors")
    checks.check_nearest(op, nearest, b, n, anchor_idx.shape[-1], anchor_idx.dim() == 2)


def lift_field(values, anchor_idx, nearest, weights, height, width):
    _lift("lift_field", values, anchor_idx, nearest, weights, height, width)


def lift_euler_(y, values, anchor_idx, nearest, weights, height, width, dt):
    op = "lift_euler_"
    checks.check_tokens(op, "y", y)
    _lift(op, values, anchor_idx, nearest, weights, height, width)
    _same_device(op, y, "y", values, "values")
    # check_euler_target: y [B, H*W, C] like values, any strides, no overlap with itself nor the inputs.
    b, _, c = values.shape
    n = height * width
    if tuple(y.shape) != (b, n, c):
        raise ValueError(f"{op}: y must be [B, H*W, C] = [{b}, {n}, {c}], got {list(y.shape)}")
    checks.check_inplace(op, "y", y, values=values, anchor_idx=anchor_idx, nearest=nearest)


# ---------------------------------------------------------------- importance (csrc/cpu/importance.cpp)


def token_importance(field, height, width):
    op = "token_importance"
    checks.check_tokens(op, "field", field)
    if field.shape[2] == 0:
        raise ValueError(f"{op}: field has no channels (C = 0): the channel mean of the local variance is undefined")
    checks.check_grid(op, height, width, field.shape[1])


def select_new_tokens(importance, active_idx, count):
    op = "select_new_tokens"
    checks.check_tensor(op, "importance", importance)
    if importance.dim() != 2 or not importance.is_floating_point():
        raise ValueError(f"{op}: importance must be a float [B, N] tensor, got {importance.dtype} "
                         f"{list(importance.shape)}")
    b, n = importance.shape
    checks.check_num_tokens(op, "importance", n)
    _index(op, "active_idx", active_idx, b)
    _same_device(op, importance, "importance", active_idx, "active_idx")
    m = active_idx.shape[-1]
    if not 0 <= count <= n - m:
        raise ValueError(f"{op}: count must be in [0, {n - m}] (inactive tokens), got {count}")


# ---------------------------------------------------------------- microflow (csrc/cpu/microflow.cpp)


def microflow_update_(y, new_idx, target, weight):
    op = "microflow_update_"
    checks.check_tokens(op, "y", y)
    checks.check_tokens(op, "target", target)
    _index(op, "new_idx", new_idx, y.shape[0])
    _same_device(op, y, "y", new_idx, "new_idx")
    _same_device(op, y, "y", target, "target")
    if not 0.0 < weight <= 1.0:  # NaN fails too
        raise ValueError(f"{op}: weight must be in (0, 1], got {weight}")
    b, _, c = y.shape
    _rows(op, "target", target, b, new_idx.shape[-1], c)
    checks.check_inplace(op, "y", y, new_idx=new_idx, target=target)


def microflow_target(y_prev, v_prev, anchor_idx, nearest, weights, new_idx, eps, sigma_prev, sigma, height, width):
    op = "microflow_target"
    checks.check_tokens(op, "y_prev", y_prev)
    checks.check_tokens(op, "v_prev", v_prev)
    checks.check_tokens(op, "eps", eps)
    if v_prev.shape != y_prev.shape:
        raise ValueError(f"{op}: v_prev {list(v_prev.shape)} must match y_prev {list(y_prev.shape)}")
    b, n, c = y_prev.shape
    checks.check_grid(op, height, width, n)
    _index(op, "anchor_idx", anchor_idx, b)
    _index(op, "nearest", nearest, b)
    _index(op, "new_idx", new_idx, b)
    _weights(op, weights)
    for name, t in (("v_prev", v_prev), ("anchor_idx", anchor_idx), ("nearest", nearest), ("new_idx", new_idx),
                    ("eps", eps), ("weights", weights)):
        _same_device(op, y_prev, "y_prev", t, name)
    if anchor_idx.shape[-1] == 0:
        raise ValueError(f"{op}: anchor_idx is empty; at least one anchor is required")
    checks.check_nearest(op, nearest, b, n, anchor_idx.shape[-1], anchor_idx.dim() == 2)
    _rows(op, "eps", eps, b, new_idx.shape[-1], c)
    if not 0.0 <= sigma <= sigma_prev <= 1.0:  # NaN fails too
        raise ValueError(f"{op}: need 0 <= sigma <= sigma_prev <= 1, got sigma={sigma}, sigma_prev={sigma_prev}")


# ---------------------------------------------------------------- attention (csrc/cpu/attention.cpp)


def anchor_attention(q, k, v, cos, sin, key_lengths, scale):
    op = "anchor_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        checks.check_heads(op, name, t)
        if t.shape != q.shape:
            raise ValueError(f"{op}: {name} {list(t.shape)} must match q {list(q.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} is {t.dtype} but q is {q.dtype}; q, k and v must share one dtype")
        _same_device(op, q, "q", t, name)
    b, n, _, d = q.shape
    if d % 2:
        raise ValueError(f"{op}: the head dim D must be even (rotary works on channel pairs), got D = {d}")
    for name, t in (("cos", cos), ("sin", sin)):
        checks.check_tensor(op, name, t)
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
        if tuple(t.shape) not in ((n, d), (b, n, d)):
            raise ValueError(f"{op}: {name} must be [L, D] = [{n}, {d}] or [B, L, D] = [{b}, {n}, {d}], "
                             f"got {list(t.shape)}")
        _same_device(op, q, "q", t, name)
    if cos.dim() != sin.dim():
        raise ValueError(f"{op}: cos and sin must both be [L, D] or both [B, L, D], got {list(cos.shape)} and "
                         f"{list(sin.shape)}")
    if not (math.isfinite(scale) and scale > 0.0):
        raise ValueError(f"{op}: scale must be finite and > 0, got {scale}")
    if key_lengths is not None:
        checks.check_tensor(op, "key_lengths", key_lengths)
        if key_lengths.dtype != torch.int64:
            raise TypeError(f"{op}: key_lengths must be int64, got {key_lengths.dtype}")
        if tuple(key_lengths.shape) != (b,):
            raise ValueError(f"{op}: key_lengths must be [B] = [{b}], got {list(key_lengths.shape)}")
        _same_device(op, q, "q", key_lengths, "key_lengths")
