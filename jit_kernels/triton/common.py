"""Helpers shared by every Triton module of the package: interpreter mode, launch shapes, exact casts.

Layout conventions of the kernels: token tensors ``[B, N, C]`` are addressed through
their strides (no ``.contiguous()`` copies); index tensors are int64 ``[M]`` (shared,
batch stride 0) or ``[B, M]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._env import triton_interpret

__all__ = ["INTERPRET", "NUM_WARPS", "MAX_GRID_YZ", "MAX_FLAT_ROWS", "tile_shape", "batch_stride", "spans",
           "sub", "f32", "cast"]

# The interpreter is chosen when @triton.jit runs, so this is read once, at import time.
INTERPRET = triton_interpret()


def _triton_version() -> tuple[int, int]:
    try:
        major, minor = triton.__version__.split(".")[:2]
        return int(major), int(minor)
    except (AttributeError, ValueError):
        return (0, 0)


def _mend_interpreter_index() -> bool:
    """Let Triton <= 3.6's interpreter index with a runtime scalar under numpy >= 2.4.

    Those interpreters hold a scalar kernel argument as a one-element array and convert it
    with ``int(array)`` when a kernel loops ``range(0, M, BLOCK)`` over it; numpy 2.4 turned
    that conversion of a 1-d array into a ``TypeError``, so every such kernel failed under
    the interpreter (Triton 3.7 takes the element first). Only the interpreter's patch of
    ``tl.tensor.__index__`` is wrapped, only on those versions; compiled kernels are
    untouched. Returns whether the wrapper was installed.
    """
    if _triton_version() >= (3, 7):
        return False
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_jit_kernels_mended", False):
        return False

    def _patch_lang_tensor(tensor, scope, _orig=patch):
        _orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    _patch_lang_tensor._jit_kernels_mended = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True


if INTERPRET:
    _mend_interpreter_index()

# Elements per tile. On a GPU ~4K fp32 elements over 4 warps keeps 32 live values per
# thread (no spills, enough loads in flight). Under the interpreter every program
# instance costs ~0.6 ms of Python overhead, so tiles are made as large as numpy likes.
_TILE_GPU = 4096
_TILE_INTERP = 1 << 16
_MAX_BLOCK_C_GPU = 128
_MAX_BLOCK_C_INTERP = 1024
NUM_WARPS = 4


def tile_shape(rows: int, cols: int, *, tile: int | None = None, interpret: bool = INTERPRET) -> tuple[int, int]:
    """``(BLOCK_ROWS, BLOCK_C)``: powers of two, BLOCK_C covers C up to a cap, rows fill the tile budget."""
    budget = tile if tile is not None else (_TILE_INTERP if interpret else _TILE_GPU)
    cap = _MAX_BLOCK_C_INTERP if interpret else _MAX_BLOCK_C_GPU
    block_c = min(triton.next_power_of_2(max(cols, 1)), cap)
    block_r = max(1, min(budget // block_c, triton.next_power_of_2(max(rows, 1))))
    return block_r, block_c


# Launch limits. CUDA grids hold at most 65535 programs along axes 1 and 2 (the batch, B * H in
# attention, channel tiles); and the kernels index a flattened (sample, row) axis, a row axis or a
# cell axis with int32 arithmetic (program id * block + lane), so one launch covers at most 2^30 such
# rows (the grid ops bound H * W by the same number). Launchers whose sizes exceed either split the
# work into several launches over views of the tensors (``spans`` / ``sub``); in the common case
# there is one span and no view is made. Read at call time: tests shrink them to exercise the splits.
MAX_GRID_YZ = 65535
MAX_FLAT_ROWS = 1 << 30


def spans(total: int, step: int) -> list[tuple[int, int]]:
    """``(start, stop)`` pieces of at most ``step`` covering ``range(total)`` (one piece when it fits)."""
    step = max(int(step), 1)
    if total <= step:
        return [(0, total)]
    return [(s, min(s + step, total)) for s in range(0, total, step)]


def sub(t, dim: int, span: tuple[int, int], total: int):
    """``t`` narrowed to ``span`` along ``dim`` (``t`` itself when the span is the whole ``total``)."""
    lo, hi = span
    return t if (lo, hi) == (0, total) else t.narrow(dim, lo, hi - lo)


def batch_stride(idx: torch.Tensor) -> int:
    """Batch stride of an index tensor: 0 for a shared ``[M]`` index (every sample reads the same row)."""
    return idx.stride(0) if idx.dim() == 2 else 0


# The interpreter converts fp32 -> bf16 by truncation and casts between bf16 and fp16 as
# integers, while GPUs round to nearest even like torch. Under the interpreter the kernels
# therefore convert through fp32 and round to bf16 with integer ops: both modes give torch's bits.
_SOFT_BF16 = tl.constexpr(INTERPRET)


@triton.jit
def f32(x):
    """``x.to(tl.float32)``; under the interpreter bf16 is widened by a bit shift (its own
    conversion mangles bf16 subnormals)."""
    if _SOFT_BF16 and x.dtype == tl.bfloat16:
        bits = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def cast(x, dtype: tl.constexpr):
    """``x.to(dtype)``, exact (round to nearest even) for bf16 also under the interpreter."""
    if _SOFT_BF16 and x.dtype != dtype and (dtype == tl.bfloat16 or x.dtype == tl.bfloat16):
        f = f32(x)  # exact from fp16 and bf16
        if dtype == tl.bfloat16:
            bits = f.to(tl.uint32, bitcast=True)
            rounded = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
            # NaN payloads could carry into the sign bit: use the canonical quiet NaN.
            rounded = tl.where(f != f, 0x7FC0, rounded)
            return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return f.to(dtype)
    else:
        return x.to(dtype)
