"""The embedded default model: a tiny class-conditional FLUX trained on MNIST digits.

Part of the evaluation bench (:mod:`jit_eval`), not of the library: the weights, data
loader, training script and classifier live here.
"""

from .data import load_mnist
from .model import (
    CHECKPOINTS,
    DEFAULT_CONFIG,
    WEIGHTS_DIR,
    LabelConditioner,
    TinyFlux,
    build_tiny_flux,
    image_ids,
    load_tiny_flux,
    pack_images,
    sample_dense,
    save_tiny_flux,
    text_ids,
    unpack_tokens,
)
from .velocity import TinyVelocity, config_sigmas, sample_tiny

__all__ = [
    "CHECKPOINTS",
    "DEFAULT_CONFIG",
    "WEIGHTS_DIR",
    "LabelConditioner",
    "TinyFlux",
    "build_tiny_flux",
    "image_ids",
    "load_mnist",
    "load_tiny_flux",
    "pack_images",
    "sample_dense",
    "save_tiny_flux",
    "text_ids",
    "unpack_tokens",
    "TinyVelocity",
    "config_sigmas",
    "sample_tiny",
]
