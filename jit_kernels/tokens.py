"""Public token gather / scatter ops."""

from __future__ import annotations

import torch

from . import _checks as checks
from . import _metadata as M
from . import _values as V
from ._backends import backend_op, cpp_kernel, resolve
from .reference import gather_tokens_ref, scatter_tokens_ref, scatter_tokens_ref_

__all__ = ["gather_tokens", "scatter_tokens", "scatter_tokens_"]


def gather_tokens(x: torch.Tensor, idx: torch.Tensor, *, backend: str | None = None,
                  validate: bool = True) -> torch.Tensor:
    """Rows ``idx`` of each sample: ``x [B, N, C]``, ``idx`` int64 ``[M]`` (shared) or ``[B, M]`` -> ``[B, M, C]``.

    Empty ``B``, ``M`` or ``C`` give an empty result. Every tensor on one device (``ValueError``).

    ``validate=False``: the caller vouches for the index values (see docs/architecture.md,
    "Validation policy"); they are not read on the host (no host sync on CUDA).
    """
    op = "gather_tokens"
    kernel = cpp_kernel(op, backend, x, idx)
    if kernel is not None:
        return kernel(x, idx, validate)
    checks.check_devices(op, x=x, idx=idx)
    be = resolve(op, checks.check_tensor(op, "x", x).device, backend)
    M.gather_tokens(x, idx)  # the kernel's metadata rule (shapes, dtypes), the one every backend uses
    if validate:
        V.gather_tokens(x, idx)
    if be == "reference":
        return gather_tokens_ref(x, idx)
    return backend_op(op, be)(x, idx, checks.kernel_validates(validate))


def _check_scatter(op: str, base, idx, src, backend, validate) -> str:
    checks.check_devices(op, base=base, idx=idx, src=src)
    be = resolve(op, checks.check_tensor(op, "base", base).device, backend)
    # The kernel's metadata rule (shapes, dtypes; for scatter_tokens_ the in-place target's memory).
    (M.scatter_tokens_ if op == "scatter_tokens_" else M.scatter_tokens)(base, idx, src)
    if validate:
        V.scatter_tokens(base, idx, src)
    return be


def scatter_tokens(base: torch.Tensor, idx: torch.Tensor, src: torch.Tensor, *, backend: str | None = None,
                   validate: bool = True) -> torch.Tensor:
    """A copy of ``base [B, N, C]`` with rows ``idx`` (``[M]`` or ``[B, M]``, unique) replaced by ``src [B, M, C]``.

    ``src`` is cast to ``base.dtype``. ``base`` is not modified.

    ``validate=False``: the caller vouches for the index values (see docs/architecture.md,
    "Validation policy"); they are not read on the host (no host sync on CUDA).
    """
    op = "scatter_tokens"
    kernel = cpp_kernel(op, backend, base, idx, src)
    if kernel is not None:
        return kernel(base, idx, src, validate)
    be = _check_scatter(op, base, idx, src, backend, validate)
    if be == "reference":
        return scatter_tokens_ref(base, idx, src)
    return backend_op(op, be)(base, idx, src, checks.kernel_validates(validate))


def scatter_tokens_(base: torch.Tensor, idx: torch.Tensor, src: torch.Tensor, *, backend: str | None = None,
                    validate: bool = True) -> torch.Tensor:
    """In-place :func:`scatter_tokens`: writes ``src`` into rows ``idx`` of ``base`` and returns ``base``.

    ``base`` may be strided but must not overlap itself (an ``expand``-ed tensor), and ``src`` and
    ``idx`` must not share an address range with it (``ValueError``, on every backend): pass copies.

    ``validate=False``: the caller vouches for the index values (see docs/architecture.md,
    "Validation policy"); they are not read on the host (no host sync on CUDA).
    """
    op = "scatter_tokens_"
    kernel = cpp_kernel(op, backend, base, idx, src)
    if kernel is not None:
        kernel(base, idx, src, validate)
        return base
    be = _check_scatter(op, base, idx, src, backend, validate)
    if be == "reference":
        return scatter_tokens_ref_(base, idx, src)
    backend_op(op, be)(base, idx, src, checks.kernel_validates(validate))
    return base
