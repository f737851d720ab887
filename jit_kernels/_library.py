"""The ``jit_kernels`` operator library: every schema, once, and every fake kernel.

The schemas live in Python rather than in ``csrc/`` because the package must
work without its compiled extension (reference and Triton paths): the C++
side only adds ``TORCH_LIBRARY_IMPL`` kernels for the CPU and CUDA keys. The
compiled extension is loaded after this module has defined the schemas.

Conventions shared by all ops: token tensors are ``[B, N, C]`` (fp32, fp16 or
bf16, arithmetic in fp32); index tensors are int64 ``[M]`` (shared by the
batch) or ``[B, M]`` (per sample); grids are row-major ``H x W`` with
``N = H * W``; ``weights`` is the fp32 ``[K]`` Gaussian of :mod:`jit_kernels.blur`.
"""

from __future__ import annotations

import torch

__all__ = ["SCHEMAS", "ATTENTION_SCHEMAS", "NAMESPACE"]

NAMESPACE = "jit_kernels"

SCHEMAS: dict[str, str] = {
    "gather_tokens": "(Tensor x, Tensor idx) -> Tensor",
    "scatter_tokens": "(Tensor base, Tensor idx, Tensor src) -> Tensor",
    "scatter_tokens_": "(Tensor(a!) base, Tensor idx, Tensor src) -> ()",
    "nearest_anchor_map": "(Tensor anchor_idx, int height, int width) -> Tensor",
    "lift_field": "(Tensor values, Tensor anchor_idx, Tensor nearest, Tensor weights, int height, int width) -> Tensor",
    "lift_euler_": (
        "(Tensor(a!) y, Tensor values, Tensor anchor_idx, Tensor nearest, Tensor weights, "
        "int height, int width, float dt) -> ()"
    ),
    "token_importance": "(Tensor field, int height, int width) -> Tensor",
    "select_new_tokens": "(Tensor importance, Tensor active_idx, int count) -> Tensor",
    "microflow_update_": "(Tensor(a!) y, Tensor new_idx, Tensor target, float weight) -> ()",
    "microflow_target": (
        "(Tensor y_prev, Tensor v_prev, Tensor anchor_idx, Tensor nearest, Tensor weights, "
        "Tensor new_idx, Tensor eps, float sigma_prev, float sigma, int height, int width) -> Tensor"
    ),
}

# Attention ops: kept apart from SCHEMAS because the token-op test suites enumerate
# SCHEMAS (samples, Triton twins, CUDA routing) and pin that set; tests/test_attention.py
# covers these the same way.
ATTENTION_SCHEMAS: dict[str, str] = {
    # q, k, v [B, L, H, D]; cos, sin [L, D] (FluxPosEmbed, interleaved pairs); key_lengths int64 [B]
    # or None; scale: the softmax scale (the public wrapper resolves the 1/sqrt(D) default).
    "anchor_attention": "(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor? key_lengths, float scale) -> Tensor",
}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in {**SCHEMAS, **ATTENTION_SCHEMAS}.items():
    _lib.define(_name + _schema, tags=(torch.Tag.pt2_compliant_tag,))


@torch.library.register_fake(f"{NAMESPACE}::gather_tokens")
def _(x, idx):
    return x.new_empty((x.shape[0], idx.shape[-1], x.shape[2]))


@torch.library.register_fake(f"{NAMESPACE}::scatter_tokens")
def _(base, idx, src):
    return torch.empty_like(base)


@torch.library.register_fake(f"{NAMESPACE}::scatter_tokens_")
def _(base, idx, src):
    return None


@torch.library.register_fake(f"{NAMESPACE}::nearest_anchor_map")
def _(anchor_idx, height, width):
    shape = (height * width,) if anchor_idx.dim() == 1 else (anchor_idx.shape[0], height * width)
    return anchor_idx.new_empty(shape, dtype=torch.int64)


@torch.library.register_fake(f"{NAMESPACE}::lift_field")
def _(values, anchor_idx, nearest, weights, height, width):
    return values.new_empty((values.shape[0], height * width, values.shape[2]))


@torch.library.register_fake(f"{NAMESPACE}::lift_euler_")
def _(y, values, anchor_idx, nearest, weights, height, width, dt):
    return None


@torch.library.register_fake(f"{NAMESPACE}::token_importance")
def _(field, height, width):
    return field.new_empty((field.shape[0], height * width), dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::select_new_tokens")
def _(importance, active_idx, count):
    return importance.new_empty((importance.shape[0], count), dtype=torch.int64)


@torch.library.register_fake(f"{NAMESPACE}::microflow_update_")
def _(y, new_idx, target, weight):
    return None


@torch.library.register_fake(f"{NAMESPACE}::microflow_target")
def _(y_prev, v_prev, anchor_idx, nearest, weights, new_idx, eps, sigma_prev, sigma, height, width):
    return y_prev.new_empty((y_prev.shape[0], new_idx.shape[-1], y_prev.shape[2]))


@torch.library.register_fake(f"{NAMESPACE}::anchor_attention")
def _(q, k, v, cos, sin, key_lengths, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
