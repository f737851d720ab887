"""Index-value checks of every op, one function per row of the op table.

Each function takes the op's schema arguments (without the trailing ``validate``), assumes
the metadata (types, shapes, devices) already passed, and raises ``IndexError`` /
``ValueError`` for bad index values. They are the single implementation behind:

- the public functions (:mod:`jit_kernels.tokens`, ...), for every backend, before they
  call a kernel with ``validate=False``;
- the Triton launchers called directly as ``torch.ops.jit_kernels.<op>_triton`` (or as the
  CUDA kernel of an op without a CUDA C++ kernel) with ``validate=True``.

They run on every call with ``validate=True`` (no cache); the trusted path
(``validate=False``) skips them.
"""

from __future__ import annotations

from . import _checks as checks


def gather_tokens(x, idx):
    checks.validate_index("gather_tokens", "idx", idx, x.shape[1])


def scatter_tokens(base, idx, src):
    checks.validate_index("scatter_tokens", "idx", idx, base.shape[1], unique=True)


def scatter_tokens_(base, idx, src):
    checks.validate_index("scatter_tokens_", "idx", idx, base.shape[1], unique=True)


def nearest_anchor_map(anchor_idx, height, width):
    checks.validate_index("nearest_anchor_map", "anchor_idx", anchor_idx, height * width, unique=True)


def lift_field(values, anchor_idx, nearest, weights, height, width):
    checks.validate_nearest("lift_field", nearest, anchor_idx, height * width)


def lift_euler_(y, values, anchor_idx, nearest, weights, height, width, dt):
    checks.validate_nearest("lift_euler_", nearest, anchor_idx, height * width)


def token_importance(field, height, width):
    pass  # no index arguments


def select_new_tokens(importance, active_idx, count):
    checks.validate_index("select_new_tokens", "active_idx", active_idx, importance.shape[1], unique=True)


def microflow_update_(y, new_idx, target, weight):
    checks.validate_index("microflow_update_", "new_idx", new_idx, y.shape[1], unique=True)


def microflow_target(y_prev, v_prev, anchor_idx, nearest, weights, new_idx, eps, sigma_prev, sigma, height, width):
    n = height * width
    checks.validate_nearest("microflow_target", nearest, anchor_idx, n)
    checks.validate_index("microflow_target", "new_idx", new_idx, n, unique=True)


def anchor_attention(q, k, v, cos, sin, key_lengths, scale):
    if key_lengths is not None:
        checks.validate_lengths("anchor_attention", "key_lengths", key_lengths, q.shape[1])
