"""Public ops of the lift: the nearest-anchor map and the interpolation of a full field from anchors."""

from __future__ import annotations

import math

import torch

from . import _checks as checks
from . import _values as V
from ._backends import backend_op, resolve
from .blur import MAX_KERNEL_SIZE, blur_params, check_kernel_size, gaussian_weights
from .reference import lift_euler_ref_, lift_field_ref, nearest_anchor_map_ref

__all__ = ["nearest_anchor_map", "lift_field", "lift_euler_", "lift_weights"]


def nearest_anchor_map(anchor_idx: torch.Tensor, height: int, width: int, *, backend: str | None = None,
                       validate: bool = True) -> torch.Tensor:
    """For each grid cell, the position in ``anchor_idx`` of its Euclidean-nearest anchor.

    ``anchor_idx`` int64 ``[M]`` (or ``[B, M]`` per sample), unique, non-empty,
    values in ``[0, H*W)`` -> int64 ``[H*W]`` (or ``[B, H*W]``). Distances are
    measured in (row, col) token coordinates; ties go to the anchor that comes
    first in ``anchor_idx``. Depends only on the anchor set: compute it once
    per stage and pass it to :func:`lift_field` as ``nearest=``.

    ``height`` and ``width`` are ints >= 1 (``TypeError`` / ``ValueError``) and the grid holds
    at most 2^30 cells (``ValueError``; the same bound for every op that takes a grid). Per-sample
    anchors of an empty batch (``[0, M]``) give an empty ``[0, H*W]``.

    ``validate=False``: the caller vouches for the index values (see docs/architecture.md,
    "Validation policy"); they are not read on the host (no host sync on CUDA).
    """
    op = "nearest_anchor_map"
    checks.check_grid(op, height, width)
    if not isinstance(anchor_idx, torch.Tensor):
        raise TypeError(f"{op}: anchor_idx must be a torch.Tensor, got {type(anchor_idx).__name__}")
    be = resolve(op, anchor_idx.device, backend)
    checks.check_index(op, "anchor_idx", anchor_idx, anchor_idx.shape[0] if anchor_idx.dim() == 2 else 1,
                  height * width, nonempty=True)
    if validate:
        V.nearest_anchor_map(anchor_idx, height, width)
    if be == "reference":
        return nearest_anchor_map_ref(anchor_idx, height, width)
    return backend_op(op, be)(anchor_idx, height, width, checks.kernel_validates(validate))


_WEIGHTS: dict[tuple[float, int, torch.device], torch.Tensor] = {}


def _weights_cached(sigma: float, kernel_size: int, device: torch.device) -> torch.Tensor:
    # The sampler asks for the same taps every step; building them costs more than the
    # lift of a small grid. Under torch.compile the taps are traced (they become constants).
    if torch.compiler.is_compiling():
        return gaussian_weights(sigma, kernel_size, device)
    key = (sigma, kernel_size, device)
    w = _WEIGHTS.get(key)
    if w is None:
        w = _WEIGHTS[key] = gaussian_weights(sigma, kernel_size, device)
    return w


def lift_weights(
    num_anchors: int,
    num_tokens: int,
    *,
    sigma: float | None = None,
    kernel_size: int | None = None,
    blur_scale: float = 0.4,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The fp32 ``[K]`` Gaussian taps the lift uses for ``M`` anchors among ``N`` tokens.

    Defaults follow docs/method.md section 3 (``sigma = clip(blur_scale / sqrt(M/N), 1, 10)``,
    ``K = 2 ceil(3 sigma) + 1``); an explicit ``sigma`` without ``kernel_size`` gets the
    matching ``K``. Cached per (sigma, K, device): do not modify the returned tensor.

    Bounds (``ValueError``; ``TypeError`` for a non-number or a non-int ``kernel_size``):
    ``blur_scale`` and ``sigma`` finite and positive; ``kernel_size`` a positive odd int of at
    most :data:`jit_kernels.blur.MAX_KERNEL_SIZE` (1025, the window of radius 512: twice the
    radius a 256 x 256 grid can use), also when it is derived from ``sigma`` (``sigma`` up to
    about 170): a huge ``sigma`` or ``K`` is refused rather than allocated or looped over.
    """
    return _lift_weights("lift_weights", num_anchors, num_tokens, sigma, kernel_size, blur_scale, device)


def _lift_weights(op, num_anchors, num_tokens, sigma, kernel_size, blur_scale, device) -> torch.Tensor:
    """:func:`lift_weights`, its errors named after ``op`` (the lift op that asked)."""
    blur_scale = checks.check_float(op, "blur_scale", blur_scale)
    if blur_scale <= 0:
        raise ValueError(f"{op}: blur_scale must be positive, got {blur_scale}")
    if kernel_size is not None:
        kernel_size = check_kernel_size(op, kernel_size)
    if sigma is None:
        s, k = blur_params(num_anchors, num_tokens, blur_scale)
        sigma = s
        kernel_size = k if kernel_size is None else kernel_size
    else:
        sigma = checks.check_float(op, "sigma", sigma)
        if sigma <= 0:
            raise ValueError(f"{op}: sigma must be positive, got {sigma}")
        if kernel_size is None:
            kernel_size = 2 * math.ceil(3.0 * sigma) + 1
            if kernel_size > MAX_KERNEL_SIZE:
                raise ValueError(f"{op}: sigma = {sigma} asks for a {kernel_size}-tap blur (2 ceil(3 sigma) + 1), "
                                 f"more than the {MAX_KERNEL_SIZE} supported; pass a smaller sigma or an explicit "
                                 "kernel_size")
    return _weights_cached(float(sigma), int(kernel_size), torch.device(device))


def lift_inputs(op, lead, anchor_idx, height, width, nearest, sigma, kernel_size, blur_scale, backend,
                *, rows=None, validate=True):
    """The anchors' nearest map and blur taps of an op that lifts a field from anchors (lift_field,
    lift_euler_, microflow_target), with their checks.

    ``lead`` is the already checked ``[B, ., C]`` token tensor that fixes the batch and the device; ``rows``, when given, is the number of anchor value
    rows (``values.shape[1]``) that must match ``anchor_idx``. Computes the nearest map if
    absent (:func:`nearest_anchor_map` then checks the anchors itself) and the blur taps;
    returns ``(nearest, weights)``. Devices and the grid (``check_grid``) are the caller's to
    check first.
    """
    n = height * width
    b = lead.shape[0]
    checks.check_index(op, "anchor_idx", anchor_idx, b, n, nonempty=True)
    m = anchor_idx.shape[-1]
    if rows is not None and rows != m:
        raise ValueError(f"{op}: values has {rows} rows but anchor_idx has {m} anchors")
    if nearest is None:
        nearest = nearest_anchor_map(anchor_idx, height, width, backend=backend, validate=validate)
    else:
        checks.check_nearest(op, nearest, b, n, m, anchor_idx.dim() == 2)
        if validate:
            checks.validate_nearest(op, nearest, anchor_idx, n)
    w = _lift_weights(op, m, n, sigma, kernel_size, blur_scale, lead.device)
    return nearest, w


def lift_field(
    values: torch.Tensor,
    anchor_idx: torch.Tensor,
    height: int,
    width: int,
    *,
    nearest: torch.Tensor | None = None,
    sigma: float | None = None,
    kernel_size: int | None = None,
    blur_scale: float = 0.4,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Interpolate a full ``H x W`` field from its anchors (docs/method.md section 3).

    ``values [B, M, C]`` at ``anchor_idx`` (int64 ``[M]`` or ``[B, M]``) -> ``[B, H*W, C]``:
    every cell takes its nearest anchor's value, the filled field is blurred by a
    separable Gaussian with reflect padding, and anchors keep their exact values.
    Pass ``nearest`` (from :func:`nearest_anchor_map`) to skip recomputing the map.
    An empty batch or ``C = 0`` gives an empty result (at least one anchor is required);
    bounds of the blur arguments: :func:`lift_weights`; of the grid: :func:`nearest_anchor_map`.

    ``validate=False``: the caller vouches for the index values (see docs/architecture.md,
    "Validation policy"); they are not read on the host (no host sync on CUDA).
    """
    op = "lift_field"
    checks.check_devices(op, values=values, anchor_idx=anchor_idx, nearest=nearest)
    checks.check_tokens(op, "values", values)
    be = resolve(op, values.device, backend)
    checks.check_grid(op, height, width)
    nearest, w = lift_inputs(op, values, anchor_idx, height, width, nearest, sigma, kernel_size, blur_scale, backend,
                             rows=values.shape[1], validate=validate)
    if be == "reference":
        return lift_field_ref(values, anchor_idx, nearest, w, height, width)
    return backend_op(op, be)(values, anchor_idx, nearest, w, height, width, checks.kernel_validates(validate))


def lift_euler_(
    y: torch.Tensor,
    values: torch.Tensor,
    anchor_idx: torch.Tensor,
    height: int,
    width: int,
    dt: float,
    *,
    nearest: torch.Tensor | None = None,
    sigma: float | None = None,
    kernel_size: int | None = None,
    blur_scale: float = 0.4,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Fused lift + Euler step, in place: ``y [B, H*W, C] += dt * lift_field(values, ...)``; returns ``y``.

    The lifted field is never materialised; arithmetic is fp32 and ``y`` is rounded once.
    ``y`` may be strided (every backend gives the result of the contiguous case) but must not
    overlap itself (an ``expand``-ed tensor), and no input (``values``, ``anchor_idx``,
    ``nearest``) may share an address range with it: ``ValueError`` on every backend; pass copies.

    ``validate=False``: the caller vouches for the index values (see docs/architecture.md,
    "Validation policy"); they are not read on the host (no host sync on CUDA).
    """
    op = "lift_euler_"
    checks.check_devices(op, y=y, values=values, anchor_idx=anchor_idx, nearest=nearest)
    checks.check_tokens(op, "y", y)
    be = resolve(op, y.device, backend)
    checks.check_tokens(op, "values", values)
    checks.check_grid(op, height, width)
    if y.shape != (values.shape[0], height * width, values.shape[2]):
        raise ValueError(f"{op}: y must be [B, H*W, C] = {(values.shape[0], height * width, values.shape[2])}, got {tuple(y.shape)}")
    # Metadata, so before the value checks and the nearest map of lift_inputs.
    checks.check_inplace(op, "y", y, values=values, anchor_idx=anchor_idx, nearest=nearest)
    nearest, w = lift_inputs(op, values, anchor_idx, height, width, nearest, sigma, kernel_size, blur_scale, backend,
                             rows=values.shape[1], validate=validate)
    dt = checks.check_float(op, "dt", dt)
    if be == "reference":
        return lift_euler_ref_(y, values, anchor_idx, nearest, w, height, width, dt)
    backend_op(op, be)(y, values, anchor_idx, nearest, w, height, width, dt, checks.kernel_validates(validate))
    return y
