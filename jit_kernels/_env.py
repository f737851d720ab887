"""Environment switches read by the package, each in one place.

Kept free of imports (beyond ``os``) so that every module, including
:mod:`jit_kernels.triton.aot` before it re-executes itself, can use it.
"""

from __future__ import annotations

import os

__all__ = ["TRITON_INTERPRET", "triton_interpret", "ATTN_VARIANT", "ATTN_VARIANTS", "attention_variant",
           "LIFT_VARIANT", "LIFT_VARIANTS", "lift_variant"]

# Triton's own switch: kernels defined while it is set run in the Triton interpreter (on CPU tensors).
TRITON_INTERPRET = "TRITON_INTERPRET"


def triton_interpret() -> bool:
    """Whether ``TRITON_INTERPRET`` is set (to anything but ``""`` or ``"0"``) right now.

    Triton reads it when a ``@triton.jit`` function is defined, so the kernels of
    :mod:`jit_kernels.triton` follow its value at their import
    (:data:`jit_kernels.triton.common.INTERPRET`).
    """
    return os.environ.get(TRITON_INTERPRET, "0") not in ("", "0")


# Which Triton kernel serves ``anchor_attention``: ``v2`` (default) rotates q and k once in a small
# kernel and runs a software-pipelined flash-attention loop on the rotated copies; ``v1`` rotates
# the k tiles in registers inside the attention loop. v1 stays selectable until a GPU A/B decides (docs/architecture.md).
ATTN_VARIANT = "JIT_KERNELS_ATTN_VARIANT"
ATTN_VARIANTS = ("v1", "v2")


def attention_variant() -> str:
    """``$JIT_KERNELS_ATTN_VARIANT`` (``v1`` or ``v2``; unset or ``""``: ``v2``), read now.

    :mod:`jit_kernels.triton.attention` reads it once, at import. Any other value raises
    ``ValueError`` there (a typo must not silently time the wrong kernel).
    """
    value = os.environ.get(ATTN_VARIANT, "").strip().lower() or "v2"
    if value not in ATTN_VARIANTS:
        raise ValueError(f"{ATTN_VARIANT}={os.environ.get(ATTN_VARIANT)!r}: expected one of {', '.join(ATTN_VARIANTS)}")
    return value
# A/B switch of the lift kernels (Triton and CUDA), read by their launchers at every call so a
# benchmark can time both in one process: "v2" (default) or "v1", the kernels before the
# launch-shape and index-math changes (benchmarks/README.md, "Kernel variants").
LIFT_VARIANT = "JIT_KERNELS_LIFT_VARIANT"
LIFT_VARIANTS = ("v2", "v1")


def lift_variant() -> str:
    """The lift kernel variant selected by ``JIT_KERNELS_LIFT_VARIANT`` (unset or empty: ``"v2"``).

    Raises ``ValueError`` for any other value (before a kernel is launched).
    """
    v = os.environ.get(LIFT_VARIANT, "") or "v2"
    if v not in LIFT_VARIANTS:
        raise ValueError(f"{LIFT_VARIANT}={v!r}: expected one of {LIFT_VARIANTS}")
    return v
