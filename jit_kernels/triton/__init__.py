"""Triton kernels of the jit_kernels ops.

Importing this package registers ``torch.ops.jit_kernels.<op>_triton`` for every op
of :data:`jit_kernels._library.SCHEMAS` (``torch.library.custom_op`` wrappers around
the Triton launchers; that form passes ``opcheck`` and ``torch.compile``, also under
``TRITON_INTERPRET=1`` on CPU). They run on CUDA tensors, or on CPU tensors through
the Triton interpreter when ``TRITON_INTERPRET=1`` was set before this import.

Ops that get no CUDA C++ kernel from the compiled extension (see :data:`CUDA_ROUTABLE`)
are also registered here as the CUDA kernel of the main op, so
``torch.ops.jit_kernels.<op>`` on CUDA tensors runs the Triton launcher. An op that
already has a CUDA kernel when this module is imported is left alone.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import attention, importance, lift, microflow, tokens  # noqa: F401  (importing registers the ops)
from .attention import anchor_attention_launch, anchor_attention_triton
from .importance import (
    select_new_tokens_launch,
    select_new_tokens_triton,
    token_importance_launch,
    token_importance_triton,
)
from .lift import lift_euler__triton, lift_field_triton, nearest_anchor_map_triton
from .microflow import (
    microflow_target_launch,
    microflow_target_triton,
    microflow_update__launch,
    microflow_update__triton,
)
from .tokens import gather_tokens_triton, scatter_tokens__triton, scatter_tokens_triton

__all__ = [
    "anchor_attention_triton",
    "ATTENTION_CUDA_ROUTABLE",
    "ATTENTION_ROUTED_TO_TRITON",
    "gather_tokens_triton",
    "scatter_tokens_triton",
    "scatter_tokens__triton",
    "nearest_anchor_map_triton",
    "lift_field_triton",
    "lift_euler__triton",
    "token_importance_triton",
    "select_new_tokens_triton",
    "microflow_update__triton",
    "microflow_target_triton",
    "CUDA_ROUTABLE",
    "ROUTED_TO_TRITON",
]

# Ops the CUDA extension does not implement in C++; their CUDA kernel is the Triton launcher.
# (The plain launchers behind the custom ops: registering those, rather than the custom
# ops, avoids a second trip through the dispatcher.)
CUDA_ROUTABLE: dict[str, Callable] = {
    "token_importance": token_importance_launch,
    "select_new_tokens": select_new_tokens_launch,
    "microflow_update_": microflow_update__launch,
    "microflow_target": microflow_target_launch,
}

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

# anchor_attention has no CUDA C++ kernel: Triton is its CUDA implementation (see the docstring
# of jit_kernels.triton.attention). Kept apart from CUDA_ROUTABLE, which lists the token ops.
ATTENTION_CUDA_ROUTABLE: dict[str, Callable] = {"anchor_attention": anchor_attention_launch}
ATTENTION_ROUTED_TO_TRITON: tuple[str, ...] = route_to_cuda(ATTENTION_CUDA_ROUTABLE)
