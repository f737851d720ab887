"""Input validation shared by every public op: clear errors before any work.

One policy for every op family (tokens, lift, importance, microflow, attention) and every
backend and device:

- *metadata* (argument types, tensor ranks, shapes, dtypes, devices, scalar arguments) is
  checked by the public function before dispatch, on every call;
- index *values* (ranges, duplicates, the consistency of a nearest-anchor map with its
  anchors, attention key lengths) are checked on every call too, in Python, by the
  functions of :mod:`jit_kernels._values`, for every backend alike: so every backend
  reports an invalid call with the same exception type. (The token ops on the ``cpp``
  backend call their C++ kernel at once, which runs the same checks itself: docs/architecture.md,
  "Call route".) On CUDA a value check
  costs one host sync. There is no cache: an index written behind torch's back (``.data``,
  ``.numpy()``, DLPack) is checked like any other.
- A caller that built its indices itself and vouches for them (the sampler) passes
  ``validate=False`` to the public function: metadata is still checked, values are not (no
  host sync). The kernels stay memory safe whatever the values (docs/architecture.md,
  "Validation policy"): the C++ CPU kernels check every index where they read it
  (``IndexError``), the CUDA and Triton kernels mask an out-of-range index (and the CUDA C++
  kernels trip a device-side assert); duplicates or an inconsistent nearest map then give an
  unspecified result inside the output, never a write outside it.
- The public function then calls the backend's kernel with ``validate=False``. Called
  directly (``torch.ops.jit_kernels.<op>``), the kernels validate values themselves
  (``validate=True``, the schema default): the C++ kernels with ``TORCH_CHECK_INDEX`` /
  ``TORCH_CHECK_VALUE``, the Triton launchers with the same Python checks. With ``validate=False``
  the C++ CPU kernels still check every index's range (memory safety is not optional). Every kernel also
  checks its arguments' metadata itself, whatever ``validate`` says: the C++ kernels with
  ``TORCH_CHECK``, the Triton launchers with the same conditions in Python
  (:mod:`jit_kernels._metadata`).
- While ``torch.compile`` traces, no Python value check runs (it would read the
  tensors); the kernels are called with ``validate=True`` instead.

Also metadata, checked first on every backend (see the section "devices, memory overlap,
size bounds" below): every tensor on one device (before anything reads a value or picks a
kernel), grids of at most 2^30 cells, and in-place targets that neither overlap themselves
(``expand``-ed tensors) nor share an address range with any input of the op.

Exception types: ``TypeError`` for a wrong type or dtype, ``ValueError`` for a wrong
shape, device, value or overlap, ``IndexError`` for an index out of range.
"""

from __future__ import annotations

from collections import Counter

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_validates(validate: bool = True) -> bool:
    """The ``validate`` argument a public function passes to a kernel: ``True`` only while
    ``torch.compile`` traces a call with ``validate=True`` (then no Python value check has run);
    ``False`` on the trusted path (``validate=False``)."""
    return validate and torch.compiler.is_compiling()


def check_tensor(op: str, name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def check_tokens(op: str, name: str, t, channels: int | None = None) -> None:
    check_tensor(op, name, t)
    if t.dim() != 3:
        raise ValueError(f"{op}: {name} must be [B, N, C], got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if channels is not None and t.shape[2] != channels:
        raise ValueError(f"{op}: {name} has {t.shape[2]} channels, expected {channels}")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    it = iter(tensors.values())
    first = next(it).device
    for t in it:
        if t.device != first:
            break
    else:
        return
    devs = {n: t.device for n, t in tensors.items()}
    raise ValueError(f"{op}: all tensors must be on one device, got {', '.join(f'{n}={d}' for n, d in devs.items())}")


def check_index(
    op: str, name: str, idx, batch: int, upper: int, *, unique: bool = False, nonempty: bool = False, values: bool = False
) -> None:
    """Metadata of an index: ``idx`` int64 ``[M]`` or ``[batch, M]``, non-empty if asked.

    With ``values`` (default off: the ops check values through :func:`validate_index`),
    also the values: in ``[0, upper)`` (and unique).
    """
    check_tensor(op, name, idx)
    if idx.dtype != torch.int64:
        raise TypeError(f"{op}: {name} must be int64, got {idx.dtype}")
    if idx.dim() not in (1, 2):
        raise ValueError(f"{op}: {name} must be [M] (shared) or [B, M] (per sample), got shape {tuple(idx.shape)}")
    if idx.dim() == 2 and idx.shape[0] != batch:
        raise ValueError(f"{op}: {name} is per sample with batch {idx.shape[0]}, but the tokens have batch {batch}")
    if nonempty and idx.shape[-1] == 0:
        raise ValueError(f"{op}: {name} is empty; at least one anchor is required")
    if values:
        validate_index(op, name, idx, upper, unique=unique)


def check_grid(op: str, height, width, num_tokens: int | None = None) -> None:
    for n, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{op}: {n} must be an int, got {type(v).__name__}")
        if v < 1:
            raise ValueError(f"{op}: {n} must be >= 1, got {v}")
    if height * width > MAX_GRID_TOKENS:  # Python ints: the product cannot overflow here
        raise ValueError(f"{op}: grid {height} x {width} is too large: at most 2^30 = {MAX_GRID_TOKENS} cells "
                         "are supported")
    if num_tokens is not None and height * width != num_tokens:
        raise ValueError(f"{op}: grid {height} x {width} = {height * width} does not match N = {num_tokens} tokens")


def check_nearest(op: str, nearest, batch: int, num_tokens: int, num_anchors: int, anchors_per_sample: bool) -> None:
    """Metadata of a nearest-anchor map (its values: :func:`validate_nearest`)."""
    check_index(op, "nearest", nearest, batch, num_anchors)
    if nearest.shape[-1] != num_tokens:
        raise ValueError(f"{op}: nearest has {nearest.shape[-1]} entries, expected N = {num_tokens}")
    if (nearest.dim() == 2) != anchors_per_sample:
        raise ValueError(f"{op}: nearest must be per sample exactly when anchor_idx is ([B, N] with [B, M])")


def check_float(op: str, name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{op}: {name} must be a float, got {type(v).__name__}")
    v = float(v)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{op}: {name} must be finite, got {v}")
    return v


# ---------------------------------------------------------------- attention


def check_heads(op: str, name: str, t) -> None:
    """``t`` a float ``[B, L, H, D]`` tensor (q, k or v)."""
    check_tensor(op, name, t)
    if t.dim() != 4:
        raise ValueError(f"{op}: {name} must be [B, L, H, D], got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_rotary_table(op: str, name: str, t, b: int, n: int, d: int) -> None:
    """``t`` a floating ``[L, D]`` or ``[B, L, D]`` rotary table."""
    check_tensor(op, name, t)
    if t.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
    if tuple(t.shape) not in ((n, d), (b, n, d)):
        raise ValueError(f"{op}: {name} must be [L, D] = [{n}, {d}] or [B, L, D] = [{b}, {n}, {d}], "
                         f"got shape {tuple(t.shape)}")


_LENGTH_DTYPES = (torch.int32, torch.int64)


def check_lengths(op: str, name: str, lengths, b: int, n: int) -> None:
    """Metadata of attention key lengths: int32/int64 ``[b]`` (values: :func:`validate_lengths`)."""
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(lengths).__name__}")
    if lengths.dtype not in _LENGTH_DTYPES:
        raise TypeError(f"{op}: {name} must be int32 or int64, got {lengths.dtype}")
    if tuple(lengths.shape) != (b,):
        raise ValueError(f"{op}: {name} must be [B] = [{b}], got shape {tuple(lengths.shape)}")


# ---------------------------------------------------------------- index values, checked on every call
#
# No cache: each public call with validate=True reads the values (one host transfer on CUDA).
# validation_passes counts those reads, so a test can prove that a caller's trusted path (the
# sampler's steps) runs none: on CUDA each would be a host sync.

_passes: Counter = Counter()


def validation_passes() -> dict[str, int]:
    """Value checks run so far, per op (each is a host sync on CUDA; the trusted path runs none)."""
    return dict(_passes)


def reset_validation_passes() -> None:
    _passes.clear()


def _stats(*values: torch.Tensor) -> list:
    """Several 0-dim values as Python ints: one host transfer on a device, plain reads on the CPU."""
    if values[0].device.type == "cpu":
        return list(map(int, values))
    return torch.stack([v.to(torch.int64) for v in values]).tolist()


def validate_index(op: str, name: str, idx: torch.Tensor, upper: int, *, unique: bool = False) -> None:
    """Values of a (metadata-checked) index: in ``[0, upper)``, unique per row with ``unique``."""
    if torch.compiler.is_compiling() or idx.numel() == 0:
        return
    _passes[op] += 1
    dup = unique and idx.shape[-1] > 1
    parts = list(torch.aminmax(idx))
    if dup:
        s = idx.sort(dim=-1).values
        parts.append((s[..., 1:] == s[..., :-1]).any())
    st = _stats(*parts)
    lo, hi = st[0], st[1]
    if lo < 0 or hi >= upper:
        raise IndexError(f"{op}: {name} has values in [{lo}, {hi}], outside [0, {upper})")
    if dup and st[2]:
        raise ValueError(f"{op}: {name} contains duplicate indices")


def validate_nearest(op: str, nearest: torch.Tensor, anchor_idx: torch.Tensor, num_tokens: int) -> None:
    """A nearest map and its anchors (metadata checked, non-empty): anchors in ``[0, N)``, map values in
    ``[0, M)``, and every anchor its own nearest anchor (``nearest[anchor_idx[j]] == j``), which also
    makes the anchors unique. Any map with these properties is accepted (the lift fills each cell
    from the anchor the map names); :func:`nearest_anchor_map` returns the Euclidean one.
    """
    if torch.compiler.is_compiling() or anchor_idx.numel() == 0:
        return
    _passes[op] += 1
    m = anchor_idx.shape[-1]
    safe = anchor_idx.clamp(0, num_tokens - 1)
    own = nearest.gather(-1, safe) if nearest.dim() == 2 else nearest[safe]
    expect = torch.arange(m, device=anchor_idx.device)
    st = _stats(anchor_idx.min(), anchor_idx.max(), nearest.min(), nearest.max(), (own != expect).any())
    if st[0] < 0 or st[1] >= num_tokens:
        raise IndexError(f"{op}: anchor_idx has values in [{st[0]}, {st[1]}], outside [0, {num_tokens})")
    if st[2] < 0 or st[3] >= m:
        raise IndexError(f"{op}: nearest has values in [{st[2]}, {st[3]}], outside [0, {m}) (M = {m} anchors)")
    if st[4]:
        raise ValueError(f"{op}: nearest is not a nearest-anchor map of anchor_idx: some anchor is not its own "
                         "nearest anchor (nearest[anchor_idx[j]] != j; duplicate anchors cause this too); "
                         "compute it with jit_kernels.nearest_anchor_map")


def validate_lengths(op: str, name: str, lengths: torch.Tensor, n: int) -> None:
    """Key lengths (metadata checked): values in ``[1, n]``."""
    if torch.compiler.is_compiling() or lengths.numel() == 0:
        return
    _passes[op] += 1
    lo, hi = _stats(lengths.min(), lengths.max())
    if lo < 1 or hi > n:
        raise IndexError(f"{op}: {name} has values in [{lo}, {hi}], outside [1, {n}]")


# ---------------------------------------------------------------- devices, memory overlap, size bounds
#
# Metadata checks that read no tensor values,
# so they run on every backend (and while torch.compile traces) before anything else.

# Largest grid (H * W cells) and token count of the grid ops. The Triton kernels address cells
# with int32 arithmetic, tiles included (a tile's last lanes may run up to 2^16 past the end), so
# 2^30 leaves them headroom; csrc/checks.h enforces the same bound for direct calls of the kernels.
MAX_GRID_TOKENS = 1 << 30


def check_devices(op: str, /, **tensors) -> None:
    """The tensors among ``tensors`` on one device (``None`` and non-tensors are skipped: their types
    are checked afterwards). Called first, before any check that reads values or picks a kernel, so a
    mixed call (a CPU tensor with a meta or CUDA one) is refused the same way on every backend."""
    first = None
    for t in tensors.values():  # the common case (one device) without building anything
        if isinstance(t, torch.Tensor):
            if first is None:
                first = t.device
            elif t.device != first:
                check_same_device(op, **{n: t for n, t in tensors.items() if isinstance(t, torch.Tensor)})


def check_num_tokens(op: str, name: str, n: int) -> None:
    """A token count of a grid op (``select_new_tokens``' ``N``) within :data:`MAX_GRID_TOKENS`."""
    if n > MAX_GRID_TOKENS:
        raise ValueError(f"{op}: {name} has {n} tokens; at most 2^30 = {MAX_GRID_TOKENS} are supported")


def has_internal_overlap(t: torch.Tensor) -> bool:
    """Whether ``t`` may have two elements at one memory location (from sizes and strides only).

    ATen's test answers for dense layouts and a stride 0 (``expand``). For the layouts it calls too
    hard (strided views), dims sorted by stride, each stride beyond the span of the smaller ones,
    prove there is none (every slice of a dense tensor passes); a layout that proof cannot clear is
    treated as overlapping (refused; ``.contiguous()`` gives a target that passes).
    """
    quick = torch._debug_has_internal_overlap(t)  # 0: no, 1: yes, 2: too hard for ATen
    if quick != 2:
        return quick == 1
    span = 0
    for st, sz in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if st <= span:
            return True
        span += (sz - 1) * st
    return False


def _extent(t: torch.Tensor) -> int:
    """Bytes from the first element of ``t`` (numel > 0, non-negative strides) to the end of its last."""
    if t.is_contiguous():
        return t.numel() * t.element_size()
    return (sum((s - 1) * st for s, st in zip(t.shape, t.stride())) + 1) * t.element_size()


def check_inplace(op: str, out_name: str, out: torch.Tensor, /, **inputs) -> None:
    """``out``, the tensor an op writes in place: no internal overlap (an ``expand``-ed tensor would be
    written through aliases, so the result would depend on the order of the writes), and no address
    range shared with any of ``inputs`` (non-tensors skipped: their types are checked elsewhere), which
    the op reads while it writes ``out``. As ATen's in-place ops, two views of one buffer whose ranges
    intersect are refused even if their elements interleave without touching (pass a copy)."""
    if not out.is_contiguous() and has_internal_overlap(out):
        raise ValueError(f"{op}: {out_name} has internally overlapping memory (several elements share one "
                         f"memory location, e.g. an expand()-ed tensor) and cannot be written in place; "
                         f"pass {out_name}.clone()")
    if out.numel() == 0 or out.is_meta:
        return
    o0 = out.data_ptr()
    o1 = o0 + _extent(out)
    for name, t in inputs.items():  # ATen's rule for in-place ops: intersecting address ranges overlap
        if not isinstance(t, torch.Tensor) or t.numel() == 0 or t.device != out.device:
            continue
        t0 = t.data_ptr()
        if t0 < o1 and o0 < t0 + _extent(t):
            raise ValueError(f"{op}: {name} overlaps the memory of {out_name}, which the op writes in place; "
                             f"pass a copy ({name}.clone())")
