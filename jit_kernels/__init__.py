"""jit_kernels: fused token ops for Just-in-Time (JiT) spatial acceleration of diffusion transformers.

Every op is registered once as ``torch.ops.jit_kernels.<name>`` (one row per op in the
op table :data:`jit_kernels._library.OPS`) with a plain-PyTorch reference
(:mod:`jit_kernels.reference`), CPU C++ and CUDA kernels in the compiled
extension ``jit_kernels._C``, and Triton kernels (:mod:`jit_kernels.triton`).
The public functions below validate their inputs, then dispatch to the
backend chosen by ``backend=`` / :func:`use_backend` / ``JIT_KERNELS_BACKEND``;
:data:`BACKENDS` is the tuple of accepted backend names.

Validation and host syncs: shapes, dtypes and devices are checked on every call; index
values (ranges, duplicates, nearest-map consistency, key lengths) once per index tensor,
by one Python implementation for every backend, remembered by the tensor's identity and
version counter (see :mod:`jit_kernels._checks`). Repeated calls on the same unmodified
indices (a sampler's steps within a stage) therefore do no validation and no host sync;
:func:`validation_passes` counts the checks that ran, :func:`clear_validation_cache`
forgets them (needed only after writing an index tensor behind torch's back, e.g.
through ``.numpy()``).
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
from ._checks import clear_validation_cache, reset_validation_passes, validation_passes
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
    "clear_validation_cache",
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
    "validation_passes",
]
