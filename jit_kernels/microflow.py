"""Public ops of the deterministic micro-flow (DMF) at a stage transition."""

from __future__ import annotations

import torch

from . import _checks as checks
from ._backends import backend_op, resolve
from .lift import lift_inputs
from .reference import microflow_target_ref, microflow_update_ref_

__all__ = ["microflow_update", "microflow_update_", "microflow_target", "MICROFLOW_MODES"]

MICROFLOW_MODES = ("assign", "blend")


def microflow_update(
    y: torch.Tensor,
    new_idx: torch.Tensor,
    target: torch.Tensor,
    mode: str = "assign",
    weight: float | None = None,
    *,
    inplace: bool | None = None,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Out of place: a copy of ``y`` with the new tokens moved toward their target (see
    :func:`microflow_update_`, which updates ``y`` itself). ``y`` is never changed.

    The package's in-place rule is PyTorch's: an op that writes into an argument ends in
    ``_`` (``scatter_tokens_``, ``lift_euler_``, ``microflow_update_``) and returns it; every
    other op returns a new tensor. ``inplace=True`` is the 0.1 spelling of
    :func:`microflow_update_`; it still works and warns.
    """
    if inplace is not None:
        import warnings

        warnings.warn("microflow_update(inplace=...) is deprecated: call microflow_update_ (in place) or "
                      "microflow_update (a new tensor)", DeprecationWarning, stacklevel=2)
        if inplace:
            return microflow_update_(y, new_idx, target, mode, weight, backend=backend, validate=validate)
    return _microflow_update(y, new_idx, target, mode, weight, False, backend, validate)


def microflow_update_(
    y: torch.Tensor,
    new_idx: torch.Tensor,
    target: torch.Tensor,
    mode: str = "assign",
    weight: float | None = None,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Move the newly activated tokens of ``y`` toward their micro-flow target, in place.

    ``y [B, N, C]``, ``new_idx`` int64 ``[R]`` or ``[B, R]`` (unique),
    ``target [B, R, C]``. ``mode="assign"``: ``y[R] = target`` exactly (the
    paper's Algorithm 1). ``mode="blend"``: ``y[R] = (1 - w) y[R] + w target``
    with ``weight=w`` in ``(0, 1]`` (the published pipeline uses ``w = 1/3``;
    a sequence ``1/n, 1/(n-1), ..., 1`` is the ``substeps`` discretisation).
    Returns ``y``. ``y`` may be strided (every backend gives the result of the contiguous
    case) but must not overlap itself (an ``expand``-ed tensor), and ``new_idx`` and
    ``target`` must not share an address range with it: ``ValueError`` on every backend; pass copies.

    ``validate=False``: the caller vouches for the index values (see docs/architecture.md,
    "Validation policy"); they are not read on the host (no host sync on CUDA).
    """
    return _microflow_update(y, new_idx, target, mode, weight, True, backend, validate)


def _microflow_update(y, new_idx, target, mode, weight, inplace: bool, backend, validate: bool):
    op = "microflow_update_" if inplace else "microflow_update"
    checks.check_devices(op, y=y, new_idx=new_idx, target=target)
    if mode not in MICROFLOW_MODES:
        raise ValueError(f"{op}: unknown mode {mode!r}; expected one of {MICROFLOW_MODES}")
    if mode == "assign":
        if weight not in (None, 1, 1.0):
            raise ValueError(f"{op}: mode 'assign' takes no weight (it is 1), got {weight}")
        weight = 1.0
    else:
        if weight is None:
            raise ValueError(f"{op}: mode 'blend' needs a weight in (0, 1]")
        weight = checks.check_float(op, "weight", weight)
        if not 0.0 < weight <= 1.0:
            raise ValueError(f"{op}: weight must be in (0, 1], got {weight}")
    checks.check_tokens(op, "y", y)
    be = resolve("microflow_update_", y.device, backend)
    checks.check_tokens(op, "target", target, channels=y.shape[2])
    checks.check_index(op, "new_idx", new_idx, y.shape[0], y.shape[1])
    if target.shape[:2] != (y.shape[0], new_idx.shape[-1]):
        raise ValueError(f"{op}: target must be [B, R, C] = [{y.shape[0]}, {new_idx.shape[-1]}, C], got {tuple(target.shape)}")
    if inplace:  # metadata, so before the value checks
        checks.check_inplace(op, "y", y, new_idx=new_idx, target=target)
    if validate:
        checks.validate_index(op, "new_idx", new_idx, y.shape[1], unique=True)
    out = y if inplace else y.clone()
    if be == "reference":
        return microflow_update_ref_(out, new_idx, target, weight)
    backend_op("microflow_update_", be)(out, new_idx, target, weight, checks.kernel_validates(validate))
    return out


def microflow_target(
    y_prev: torch.Tensor,
    v_prev: torch.Tensor,
    anchor_idx: torch.Tensor,
    new_idx: torch.Tensor,
    eps: torch.Tensor,
    sigma_prev: float,
    sigma: float,
    height: int,
    width: int,
    *,
    nearest: torch.Tensor | None = None,
    blur_sigma: float | None = None,
    kernel_size: int | None = None,
    blur_scale: float = 0.4,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """The DMF target of the new tokens, fused: ``(1 - sigma) * Lift_old(x0_hat)[R] + sigma * eps``.

    ``x0_hat = y_prev - sigma_prev * v_prev`` is the clean estimate of the
    previous step (``y_prev, v_prev [B, N, C]``, full fields), lifted over the
    OLD anchors ``anchor_idx`` (``[M]`` or ``[B, M]``, with their ``nearest``
    map) and read at the new tokens ``new_idx`` (``[R]`` or ``[B, R]``);
    ``eps [B, R, C]`` is the noise of those tokens. Returns ``[B, R, C]`` in
    ``y_prev.dtype``. The blur uses the old anchor density unless given (bounds of the blur
    arguments: :func:`jit_kernels.lift_weights`). An empty batch, no new tokens or ``C = 0``
    give an empty result.

    ``validate=False``: the caller vouches for the index values (see docs/architecture.md,
    "Validation policy"); they are not read on the host (no host sync on CUDA).
    """
    op = "microflow_target"
    checks.check_devices(op, y_prev=y_prev, v_prev=v_prev, anchor_idx=anchor_idx, new_idx=new_idx, eps=eps, nearest=nearest)
    checks.check_tokens(op, "y_prev", y_prev)
    checks.check_tokens(op, "v_prev", v_prev)
    if v_prev.shape != y_prev.shape:
        raise ValueError(f"{op}: v_prev {tuple(v_prev.shape)} must match y_prev {tuple(y_prev.shape)}")
    b, n, c = y_prev.shape
    be = resolve(op, y_prev.device, backend)
    checks.check_grid(op, height, width, n)
    sigma_prev = checks.check_float(op, "sigma_prev", sigma_prev)
    sigma = checks.check_float(op, "sigma", sigma)
    if not 0.0 <= sigma <= sigma_prev <= 1.0:
        raise ValueError(f"{op}: need 0 <= sigma <= sigma_prev <= 1, got sigma={sigma}, sigma_prev={sigma_prev}")
    checks.check_index(op, "new_idx", new_idx, b, n)
    checks.check_tokens(op, "eps", eps, channels=c)
    if eps.shape[:2] != (b, new_idx.shape[-1]):
        raise ValueError(f"{op}: eps must be [B, R, C] = [{b}, {new_idx.shape[-1]}, {c}], got {tuple(eps.shape)}")
    # The anchor values are x0_hat rows, formed inside the kernel: no values tensor to match.
    nearest, w = lift_inputs(op, y_prev, anchor_idx, height, width, nearest, blur_sigma, kernel_size, blur_scale,
                             backend, validate=validate)
    if validate:
        checks.validate_index(op, "new_idx", new_idx, n, unique=True)
    if be == "reference":
        return microflow_target_ref(y_prev, v_prev, anchor_idx, nearest, w, new_idx, eps, sigma_prev, sigma, height, width)
    return backend_op(op, be)(y_prev, v_prev, anchor_idx, nearest, w, new_idx, eps, sigma_prev, sigma, height, width,
                              checks.kernel_validates(validate))
