"""Triton kernels of the jit_kernels ops.

Importing this package registers, for every row of the op table
:data:`jit_kernels._library.OPS`, the Triton twin ``torch.ops.jit_kernels.<op>_triton``:
a ``torch.library.custom_op`` around the plain launcher ``launch_<op>`` of
``jit_kernels/triton/<family>.py``, with the op's schema and fake (that form passes
``opcheck`` and ``torch.compile``, also under ``TRITON_INTERPRET=1`` on CPU). The twins run
on CUDA tensors, or on CPU tensors through the Triton interpreter when
``TRITON_INTERPRET=1`` was set before this import.

Rows with ``cuda_via_triton`` (ops without a CUDA C++ kernel, :data:`CUDA_ROUTABLE`) also
get their launcher registered as the CUDA kernel of the main op, so
``torch.ops.jit_kernels.<op>`` on CUDA tensors runs Triton. An op that already has a CUDA
kernel when this module is imported is left alone.

Launcher naming rule: the launcher of op ``<op>`` is ``launch_<op>`` (e.g.
``launch_lift_euler_``), a plain function taking the op's schema arguments except the
trailing ``validate``. What is registered is :data:`KERNELS`: each launcher wrapped by
:func:`guarded`, which

- always checks the arguments' metadata (:mod:`jit_kernels._metadata`: ranks, shapes,
  dtypes, devices, in-place targets; the conditions and exception types of the op's C++
  ``TORCH_CHECK`` calls; no tensor value is read, so no host sync), and that the tensors are on
  a device Triton runs on here (CUDA; CPU only under the interpreter);
- runs the op's index-value checks when ``validate`` is true (the same Python checks the
  public functions run, :mod:`jit_kernels._values`);
- launches under a device guard of the tensors' device, so a tensor on ``cuda:1`` launches
  on ``cuda:1`` and its current stream whatever device is current.

So a direct call refuses what the C++ kernel of the same op refuses, before any work.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
from typing import Callable

import torch

from .._library import OPS
from .common import INTERPRET

__all__ = ["LAUNCHERS", "KERNELS", "guarded", "TRITON_OPS", "CUDA_ROUTABLE", "ROUTED_TO_TRITON", "route_to_cuda"]

# op name -> plain launcher (launch_<op> of jit_kernels.triton.<family>)
LAUNCHERS: dict[str, Callable] = {
    op.name: getattr(importlib.import_module(f"{__name__}.{op.family}"), op.launcher) for op in OPS.values()
}


def _device_of(*args) -> torch.device | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def _guard(device):
    """Make ``device`` current for a launch (Triton launches on the current device's current stream)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _check_runnable(op: str, device: torch.device | None) -> None:
    """Triton runs on CUDA tensors, and on CPU tensors only through its interpreter (``ValueError``, as the
    CUDA C++ kernels' ``check_cuda``)."""
    if device is not None and device.type != "cuda" and not INTERPRET:
        raise ValueError(f"{op}: the Triton kernels need CUDA tensors (CPU tensors only with TRITON_INTERPRET=1 "
                         f"set before import), got {device}")


def guarded(name: str, launcher: Callable) -> Callable:
    """``launcher`` with the schema's trailing ``validate`` argument, checks and a device guard.

    Generated with the launcher's exact parameter names (the custom-op machinery binds
    arguments by name), plus ``validate=True``. Runs the op's metadata checks always, then
    its value checks when ``validate`` is true, then the launcher under a device guard.
    """
    params = list(inspect.signature(launcher).parameters)
    arglist = ", ".join(params)
    src = (f"def {name}({arglist}, validate=True):\n"
           f"    _metadata({arglist})\n"
           f"    device = _device_of({arglist})\n"
           f"    _check_runnable({name!r}, device)\n"
           f"    if validate:\n"
           f"        _values({arglist})\n"
           f"    with _guard(device):\n"
           f"        return _launch({arglist})\n")
    scope = {"_metadata": OPS[name].metadata, "_values": OPS[name].values, "_check_runnable": _check_runnable,
             "_guard": _guard, "_device_of": _device_of, "_launch": launcher}
    exec(compile(src, f"<jit_kernels.triton.guarded {name}>", "exec"), scope)
    fn = scope[name]
    fn.__doc__ = launcher.__doc__
    fn.__wrapped_launcher__ = launcher
    return fn


# op name -> what is registered: the launcher with metadata and value checks and a device guard
KERNELS: dict[str, Callable] = {name: guarded(name, fn) for name, fn in LAUNCHERS.items()}


def _register_twin(name: str):
    op = OPS[name]
    twin = torch.library.custom_op(f"jit_kernels::{op.triton_op}", KERNELS[name], mutates_args=op.mutates,
                                   schema=op.schema)
    twin.register_fake(op.fake)
    return twin


# op name -> its Triton twin (the custom op behind torch.ops.jit_kernels.<op>_triton)
TRITON_OPS: dict = {name: _register_twin(name) for name in OPS}

# Ops the CUDA extension does not implement in C++; their CUDA kernel is the Triton launcher.
# (The guarded launchers behind the custom ops: registering those, rather than the custom
# ops, avoids a second trip through the dispatcher.)
CUDA_ROUTABLE: dict[str, Callable] = {name: KERNELS[name] for name, op in OPS.items() if op.cuda_via_triton}

_CUDA_LIB = torch.library.Library("jit_kernels", "IMPL")


def _has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"jit_kernels::{op}", "CUDA")


def route_to_cuda(
    ops: dict[str, Callable],
    has_kernel: Callable[[str], bool] = _has_cuda_kernel,
    register: Callable[[str, Callable], None] = lambda op, fn: _CUDA_LIB.impl(op, fn, "CUDA"),
) -> tuple[str, ...]:
    """Register each launcher in ``ops`` as the CUDA kernel of its main op unless one exists; returns the ops routed."""
    routed = []
    for op, fn in ops.items():
        if has_kernel(op):
            continue
        register(op, fn)
        routed.append(op)
    return tuple(routed)


ROUTED_TO_TRITON: tuple[str, ...] = route_to_cuda(CUDA_ROUTABLE)
