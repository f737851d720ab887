"""Input validation shared by every public op: clear errors before any work.

Shape, dtype and device checks always run. Value checks (index ranges,
duplicates) read index tensors, so they are skipped while ``torch.compile``
traces; the compiled C++ kernels repeat them with ``TORCH_CHECK``.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def check_tokens(op: str, name: str, t, channels: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{op}: {name} must be [B, N, C], got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    if channels is not None and t.shape[2] != channels:
        raise ValueError(f"{op}: {name} has {t.shape[2]} channels, expected {channels}")


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devs = {n: t.device for n, t in tensors.items()}
    first = next(iter(devs.values()))
    if any(d != first for d in devs.values()):
        raise ValueError(f"{op}: all tensors must be on one device, got {', '.join(f'{n}={d}' for n, d in devs.items())}")


def check_index(
    op: str, name: str, idx, batch: int, upper: int, *, unique: bool = False, nonempty: bool = False, values: bool = True
) -> None:
    """``idx`` int64 ``[M]`` or ``[batch, M]``; with ``values``, also in ``[0, upper)`` (and unique)."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(idx).__name__}")
    if idx.dtype != torch.int64:
        raise TypeError(f"{op}: {name} must be int64, got {idx.dtype}")
    if idx.dim() not in (1, 2):
        raise ValueError(f"{op}: {name} must be [M] (shared) or [B, M] (per sample), got shape {tuple(idx.shape)}")
    if idx.dim() == 2 and idx.shape[0] != batch:
        raise ValueError(f"{op}: {name} is per sample with batch {idx.shape[0]}, but the tokens have batch {batch}")
    if nonempty and idx.shape[-1] == 0:
        raise ValueError(f"{op}: {name} is empty; at least one anchor is required")
    if not values or _tracing() or idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= upper:
        raise IndexError(f"{op}: {name} has values in [{lo}, {hi}], outside [0, {upper})")
    if unique and idx.shape[-1] > 1:
        s = idx.sort(dim=-1).values
        if bool((s[..., 1:] == s[..., :-1]).any()):
            raise ValueError(f"{op}: {name} contains duplicate indices")


def check_grid(op: str, height, width, num_tokens: int | None = None) -> None:
    for n, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{op}: {n} must be an int, got {type(v).__name__}")
        if v < 1:
            raise ValueError(f"{op}: {n} must be >= 1, got {v}")
    if num_tokens is not None and height * width != num_tokens:
        raise ValueError(f"{op}: grid {height} x {width} = {height * width} does not match N = {num_tokens} tokens")


def check_nearest(
    op: str, nearest, batch: int, num_tokens: int, num_anchors: int, anchors_per_sample: bool, values: bool = True
) -> None:
    check_index(op, "nearest", nearest, batch, num_anchors, values=values)
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
