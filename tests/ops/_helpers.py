"""Helpers shared by the op tests of tests/ops/ (not a test module).

Backends and skip markers, inputs offset away from zero, strided inputs, a fresh Python
subprocess, and the valid schema arguments of every op for calling its kernels directly
(``torch.ops.jit_kernels.<op>``, or its Triton twin).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from functools import partial

import pytest
import torch

import jit_kernels as jk
from jit_kernels import reference as ref
from jit_kernels._library import OPS
from jit_kernels.testing import anchors, compiled_backends, gen, randn, tokens

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ops = torch.ops.jit_kernels

# Every backend present on the machine (``reference``, ``cpp``, ``triton`` through the interpreter).
BACKENDS = ["reference"] + compiled_backends("cpu")
HAS_CPP = "cpp" in jk.available_backends("cpu")
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"compiled extension not loaded: {jk.extension_error()}")

# Where the Triton kernels run: through the interpreter on CPU tensors (TRITON_INTERPRET=1, set by
# tests/conftest.py on a machine without CUDA), compiled on CUDA tensors, or nowhere.
try:
    import triton  # noqa: F401
except ImportError:
    triton = None
    TRITON_INTERPRET = False
    TRITON_DEV = None
else:
    from jit_kernels.triton import common as _triton_common

    TRITON_INTERPRET = _triton_common.INTERPRET
    TRITON_DEV = "cpu" if TRITON_INTERPRET else ("cuda" if torch.cuda.is_available() else None)
needs_triton = pytest.mark.skipif(triton is None, reason="triton is not importable")
needs_runner = pytest.mark.skipif(TRITON_DEV is None, reason="Triton needs a CUDA GPU or TRITON_INTERPRET=1")

# Inputs offset away from zero: on the CPU, and on the device the Triton kernels run on.
offset_tokens = partial(tokens, offset=2.0)
triton_randn = partial(randn, offset=2.0, device=TRITON_DEV)


def interpreter_rows_slow(params: list) -> list:
    """The ``(device, backend)`` params of :func:`jit_kernels.testing.device_backends` with the row of the
    Triton interpreter (``cpu-triton``) marked ``slow``.

    The interpreter runs a kernel program by program in Python: its rows of the parity tests take most
    of their time (seconds per case on a 2-core CPU). The quick loop (``-m "not slow"``) keeps the C++
    and reference rows and the Triton tests of the launchers; the full run has every row.
    """
    return [pytest.param(*p.values, id=p.id, marks=[*p.marks, pytest.mark.slow]) if p.id == "cpu-triton" else p
            for p in params]


def strided_tokens(b, n, c, seed=0):
    """A [B, N, C] view whose channel stride is not 1 (and whose rows are interleaved)."""
    t = torch.randn(b, c, 2 * n, generator=gen(seed)) + 2.0
    return t[:, :, ::2].transpose(1, 2)


def lift_inputs(h=7, w=13, m=20, b=2, c=5, seed=0):
    """``(values, anchor_idx, nearest, weights)`` of a valid lift on an ``h`` x ``w`` grid."""
    n = h * w
    a = anchors(n, m, seed + 1)
    near = ref.nearest_anchor_map_ref(a, h, w)
    wt = jk.gaussian_weights(1.0, 7)
    return offset_tokens(b, m, c, seed=seed), a, near, wt


def python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (Triton interpreted, the checkout importable)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


# ---------------------------------------------------------------- direct kernel calls

MH, MW = 4, 5  # the grid of the default arguments (N = 20)


def kernel_args(op: str) -> dict:
    """Valid schema arguments of ``op`` (without validate), on the CPU."""
    b, c, n = 2, 3, MH * MW
    a = torch.tensor([0, 7, 13])
    near = ref.nearest_anchor_map_ref(a, MH, MW)
    wts = jk.lift_weights(3, n)
    new = torch.tensor([1, 2, 3, 4])  # none of them an anchor
    if op == "gather_tokens":
        return dict(x=tokens(b, n, c), idx=torch.tensor([1, 4, 9]))
    if op in ("scatter_tokens", "scatter_tokens_"):
        return dict(base=tokens(b, n, c), idx=torch.tensor([1, 4, 9]), src=tokens(b, 3, c, seed=1))
    if op == "nearest_anchor_map":
        return dict(anchor_idx=a, height=MH, width=MW)
    if op == "lift_field":
        return dict(values=tokens(b, 3, c, seed=2), anchor_idx=a, nearest=near, weights=wts, height=MH, width=MW)
    if op == "lift_euler_":
        return dict(y=tokens(b, n, c, seed=3), values=tokens(b, 3, c, seed=2), anchor_idx=a, nearest=near,
                    weights=wts, height=MH, width=MW, dt=0.1)
    if op == "token_importance":
        return dict(field=tokens(b, n, c), height=MH, width=MW)
    if op == "select_new_tokens":
        return dict(importance=torch.rand(b, n, generator=gen(4)), active_idx=a, count=5)
    if op == "microflow_update_":
        return dict(y=tokens(b, n, c), new_idx=new, target=tokens(b, 4, c, seed=5), weight=0.5)
    if op == "microflow_target":
        return dict(y_prev=tokens(b, n, c), v_prev=tokens(b, n, c, seed=6), anchor_idx=a, nearest=near, weights=wts,
                    new_idx=new, eps=tokens(b, 4, c, seed=7), sigma_prev=0.8, sigma=0.5, height=MH, width=MW)
    if op == "anchor_attention":
        q, k, v = (torch.randn(b, 5, 2, 4, generator=gen(8 + i)) for i in range(3))
        return dict(q=q, k=k, v=v, cos=torch.rand(5, 4, generator=gen(11)), sin=torch.rand(5, 4, generator=gen(12)),
                    key_lengths=torch.tensor([5, 3]), scale=0.5)
    raise KeyError(op)


def schema_args(op: str, args: dict) -> list:
    """``args`` in the order of the op's schema (without validate)."""
    return [args[a.name] for a in getattr(ops, op).default._schema.arguments if a.name != "validate"]


def direct_kernel(op: str, backend: str):
    """``torch.ops.jit_kernels.<op>``, or its Triton twin for ``backend="triton"``."""
    return getattr(ops, OPS[op].triton_op if backend == "triton" else op)
