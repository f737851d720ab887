"""Public ops of importance-guided token activation (ITA)."""

from __future__ import annotations

import torch

from . import _checks as checks
from . import _metadata as M
from ._backends import backend_op, resolve
from .reference import select_new_tokens_ref, token_importance_ref

__all__ = ["token_importance", "select_new_tokens"]


def token_importance(field: torch.Tensor, height: int, width: int, *, backend: str | None = None) -> torch.Tensor:
    """Per-token importance: 3x3 local variance (zero padding counted), averaged over channels.

    ``field [B, H*W, C]`` -> fp32 ``[B, H*W]``. ``C = 0`` is refused (``ValueError``: a mean
    over no channels is undefined); ``B = 0`` gives an empty ``[0, H*W]``.
    """
    op = "token_importance"
    M.token_importance(field, height, width)  # the kernel's rule, the one every backend uses
    be = resolve(op, field.device, backend)
    if be == "reference":
        return token_importance_ref(field, height, width)
    return backend_op(op, be)(field, height, width, checks.kernel_validates())


def select_new_tokens(
    importance: torch.Tensor, active_idx: torch.Tensor, count: int, *, backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """The ``count`` highest-scoring inactive tokens of each sample.

    ``importance [B, N]`` (float), ``active_idx`` int64 ``[M]`` or ``[B, M]``
    (unique) -> int64 ``[B, count]``, ordered by score descending, ties to the
    lower token index (NaN ranks first). ``N`` at most 2^30 (``ValueError``); ``B = 0``
    gives an empty ``[0, count]``.

    ``validate=False``: the caller vouches for the index values (see docs/architecture.md,
    "Validation policy"); they are not read on the host (no host sync on CUDA).
    """
    op = "select_new_tokens"
    checks.check_devices(op, importance=importance, active_idx=active_idx)
    be = resolve(op, checks.check_tensor(op, "importance", importance).device, backend)
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"{op}: count must be an int, got {type(count).__name__}")
    M.select_new_tokens(importance, active_idx, count)  # the kernel's rule, the one every backend uses
    n = importance.shape[1]
    if validate:
        checks.validate_index(op, "active_idx", active_idx, n, unique=True)
    if be == "reference":
        return select_new_tokens_ref(importance, active_idx, count)
    return backend_op(op, be)(importance, active_idx, count, checks.kernel_validates(validate))
