"""jit_kernels: fused token ops for Just-in-Time (JiT) spatial acceleration of diffusion transformers.

Every op is registered once as ``torch.ops.jit_kernels.<name>`` (one row per op in the
op table :data:`jit_kernels._library.OPS`) with a plain-PyTorch reference
(:mod:`jit_kernels.reference`), CPU C++ and CUDA kernels in the compiled
extension ``jit_kernels._C``, and Triton kernels (:mod:`jit_kernels.triton`).
The public functions below validate their inputs, then dispatch to the
backend chosen by ``backend=`` / :func:`use_backend` / ``JIT_KERNELS_BACKEND``;
:data:`BACKENDS` is the tuple of accepted backend names.

Validation (docs/architecture.md, "Validation policy"): every public call checks shapes,
dtypes, devices and index values (ranges, duplicates, nearest-map consistency, key lengths),
by one Python implementation for every backend; a value check is a host sync on CUDA. A
caller that built its indices itself passes ``validate=False`` (the sampler does, so its
steps make no host sync); the kernels never read or write outside their tensors whatever
the index values. :func:`validation_passes` counts the value checks that ran.
"""

from ._backends import (
    BACKENDS,
    BackendUnavailableError,
    available_backends,
    extension_error,
    get_backend,
    set_backend,
    use_backend,
)
from ._checks import reset_validation_passes, validate_index, validation_passes
from .attention import anchor_attention
from .blur import blur_params, gaussian_weights
from .importance import select_new_tokens, token_importance
from .lift import lift_euler_, lift_field, lift_weights, nearest_anchor_map
from .microflow import MICROFLOW_MODES, microflow_target, microflow_update, microflow_update_
from .tokens import gather_tokens, scatter_tokens, scatter_tokens_

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "MICROFLOW_MODES",
    "anchor_attention",
    "available_backends",
    "blur_params",
    "extension_error",
    "gather_tokens",
    "gaussian_weights",
    "get_backend",
    "lift_euler_",
    "lift_field",
    "lift_weights",
    "microflow_target",
    "microflow_update",
    "microflow_update_",
    "nearest_anchor_map",
    "reset_validation_passes",
    "scatter_tokens",
    "scatter_tokens_",
    "select_new_tokens",
    "set_backend",
    "token_importance",
    "use_backend",
    "validate_index",
    "validation_passes",
]
