"""Environment switches read by the package, each in one place.

Kept free of imports (beyond ``os``) so that every module, including
:mod:`jit_kernels.triton.aot` before it re-executes itself, can use it.
"""

from __future__ import annotations

import os

__all__ = ["TRITON_INTERPRET", "triton_interpret"]

# Triton's own switch: kernels defined while it is set run in the Triton interpreter (on CPU tensors).
TRITON_INTERPRET = "TRITON_INTERPRET"


def triton_interpret() -> bool:
    """Whether ``TRITON_INTERPRET`` is set (to anything but ``""`` or ``"0"``) right now.

    Triton reads it when a ``@triton.jit`` function is defined, so the kernels of
    :mod:`jit_kernels.triton` follow its value at their import
    (:data:`jit_kernels.triton.common.INTERPRET`).
    """
    return os.environ.get(TRITON_INTERPRET, "0") not in ("", "0")
