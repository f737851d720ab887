"""Backend discovery and selection.

Backends:
- ``cpp``: the compiled extension's CPU kernels (``torch.ops.jit_kernels.<op>`` on CPU tensors);
- ``cuda``: the compiled extension's CUDA kernels (same ops on CUDA tensors; ops without a
  CUDA C++ kernel route to Triton through the CUDA dispatch key);
- ``triton``: Triton kernels (``torch.ops.jit_kernels.<op>_triton``), on CUDA tensors, or on
  CPU tensors under ``TRITON_INTERPRET=1``;
- ``reference``: the plain-PyTorch references (any device).

Selection: the ``backend=`` argument of each public function, else :func:`set_backend` /
:func:`use_backend`, else the ``JIT_KERNELS_BACKEND`` environment variable (read once, when
``jit_kernels`` is imported: it sits on every op's hot path), else ``auto``.
``auto`` never fails: it picks the fastest available backend for the tensors' device. An
explicit request that cannot be met raises :class:`BackendUnavailableError`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading

import torch

from ._env import triton_interpret
from ._library import OPS  # the ops must be defined before the extension registers kernels

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "get_backend",
    "set_backend",
    "use_backend",
    "extension_error",
]

log = logging.getLogger("jit_kernels")

# The public tuple of backend names: "auto" plus the concrete backends.
BACKENDS = ("auto", "cuda", "triton", "cpp", "reference")


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs on this machine."""


def _load_extension():
    try:
        return importlib.import_module("jit_kernels._C"), None
    except Exception as exc:  # ImportError, undefined symbols from a torch mismatch, ...
        log.info("jit_kernels._C not loaded (%s); using Triton/reference kernels", exc)
        return None, exc


_C, _C_ERROR = _load_extension()


def _load_triton():
    try:
        import triton  # noqa: F401
    except Exception as exc:
        log.info("triton not importable (%s)", exc)
        return None
    try:
        return importlib.import_module("jit_kernels.triton")
    except Exception as exc:  # a broken kernel module must not break the package
        log.warning("jit_kernels.triton failed to import: %s", exc)
        return None


_TRITON = _load_triton()


def extension_error() -> Exception | None:
    """Why ``jit_kernels._C`` did not load (``None`` when it did)."""
    return _C_ERROR


def _has_triton_op(op: str) -> bool:
    try:
        getattr(torch.ops.jit_kernels, OPS[op].triton_op)
        return True
    except (AttributeError, RuntimeError):
        return False


def _has_kernel(op: str, key: str) -> bool:
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"jit_kernels::{op}", key)


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: every backend usable on this machine)."""
    devs = [torch.device(device)] if device is not None else [torch.device("cpu")]
    if device is None and torch.cuda.is_available():
        devs.append(torch.device("cuda"))
    out = []
    for name in ("cuda", "triton", "cpp", "reference"):
        if any(_usable(name, d) for d in devs):
            out.append(name)
    return out


def _usable(name: str, device: torch.device, op: str = "gather_tokens") -> bool:
    if name == "reference":
        return True
    if name == "cpp":
        return device.type == "cpu" and _has_kernel(op, "CPU")
    if name == "cuda":
        return device.type == "cuda" and _has_kernel(op, "CUDA")
    if name == "triton":
        if _TRITON is None or not _has_triton_op(op):
            return False
        return device.type == "cuda" or (device.type == "cpu" and triton_interpret())
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


_state = threading.local()
_ENV_BACKEND = os.environ.get("JIT_KERNELS_BACKEND", "auto") or "auto"


def get_backend() -> str:
    """The backend in force for calls that pass no ``backend=``."""
    b = getattr(_state, "backend", None)
    return _ENV_BACKEND if b is None else b


def set_backend(name: str | None) -> None:
    """Set this thread's default backend (``None`` restores the environment/``auto``)."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    _state.backend = name


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager form of :func:`set_backend`."""
    prev = getattr(_state, "backend", None)
    set_backend(name)
    try:
        yield
    finally:
        _state.backend = prev


_RESOLVED: dict[tuple[str, str, str], str] = {}


def resolve(op: str, device: torch.device, backend: str | None) -> str:
    """Pick the concrete backend for ``op`` on ``device`` (cached: this sits on every op's hot path)."""
    name = backend if backend is not None else get_backend()
    key = (op, device.type, name)
    hit = _RESOLVED.get(key)
    if hit is None:
        hit = _RESOLVED[key] = _resolve(op, device, name)
    return hit


def _resolve(op: str, device: torch.device, name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    if name == "auto":
        order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpp", "reference")
        for cand in order:
            if _usable(cand, device, op):
                return cand
        return "reference"
    if not _usable(name, device, op):
        why = {
            "cpp": f"the compiled extension is not loaded ({_C_ERROR})" if _C is None else "needs CPU tensors",
            "cuda": "needs CUDA tensors and the extension built with CUDA",
            "triton": "needs triton and CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before import)",
        }[name]
        raise BackendUnavailableError(
            f"jit_kernels.{op}: backend {name!r} cannot run on {device.type} tensors here: {why}. "
            f"Available for {device.type}: {available_backends(device)}"
        )
    return name


_OPS: dict[tuple[str, str], object] = {}


def backend_op(op: str, backend: str):
    """The ``OpOverload`` implementing ``op`` on a concrete (non-reference) backend (cached)."""
    key = (op, "triton" if backend == "triton" else "native")
    fn = _OPS.get(key)
    if fn is None:
        name = OPS[op].triton_op if backend == "triton" else op
        fn = _OPS[key] = getattr(torch.ops.jit_kernels, name).default
    return fn


_CPU = torch.device("cpu")
_CPP_KERNEL: dict[tuple[str, str], object] = {}


def cpp_kernel(op: str, backend: str | None, *tensors):
    """The C++ CPU kernel of ``op`` when a public call goes straight to it, else ``None``: every argument a
    plain CPU tensor and ``op`` resolving to ``cpp``. That kernel checks the metadata and the index values
    itself (``TORCH_CHECK``, the same exception types as the Python rule), so the public function skips the
    Python rule instead of running both (docs/architecture.md, "Call route"). Kept lean: it sits on every
    CPU call."""
    for t in tensors:
        if type(t) is not torch.Tensor or not t.is_cpu:
            return None
    key = (op, get_backend() if backend is None else backend)
    try:
        return _CPP_KERNEL[key]
    except KeyError:
        fn = _CPP_KERNEL[key] = backend_op(op, "cpp") if resolve(op, _CPU, key[1]) == "cpp" else None
        return fn
