"""diffusers pipelines with JiT: one module per pipeline family, all built on :mod:`.base`.

- :mod:`.velocity`: :class:`FluxVelocity`, the transformer run on the active tokens;
- :mod:`.base`: :class:`~.base.JiTPipelineMixin` (dispatch, schedule, denoising, report) and
  :func:`enable_jit`;
- :mod:`.flux`: :class:`JiTFluxPipeline` (FLUX.1 text-to-image);
- :mod:`.flux2_klein`: :class:`JiTFlux2KleinPipeline` (FLUX.2-klein);
- :mod:`.attention_processor`: :class:`AnchorAttnProcessor`, the fused rotary + attention
  processor for FLUX transformers.
- :mod:`.cache_dit`: :func:`enable_cache_dit` / :func:`disable_cache_dit` / :func:`use_cache_dit`,
  cache-dit's DBCache on one JiT pipeline, reset at every stage transition.

A new pipeline (Kontext, Fill, ControlNet, Img2Img, ...) is a module here with a class that
sets ``_stock_class``; list its module in ``_MODULES`` so :func:`enable_jit` knows it.
"""

from __future__ import annotations

import importlib
import logging

from .attention_processor import AnchorAttnProcessor, install_anchor_attention, remove_anchor_attention, use_anchor_attention
from .base import enable_jit
from .velocity import FluxVelocity

_MODULES = ("flux", "flux2_klein")
_CLASSES = {"JiTFluxPipeline": "flux", "JiTFlux2KleinPipeline": "flux2_klein",
            # cache-dit integration (the cache-dit package itself is imported on first use)
            "enable_cache_dit": "cache_dit", "disable_cache_dit": "cache_dit", "use_cache_dit": "cache_dit"}


def _quiet_import(name: str):
    """Import a pipeline module without transformers' "requires torchvision; falling back to the PIL
    image processor" notice, which diffusers' pipeline imports trigger on machines without torchvision
    (the fallback is what these pipelines use anyway)."""
    log = logging.getLogger("transformers.utils.import_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    finally:
        log.setLevel(level)


def _load_all() -> None:
    for m in _MODULES:
        _quiet_import(m)


def __getattr__(name):
    if name in _CLASSES:
        return getattr(_quiet_import(_CLASSES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AnchorAttnProcessor",
    "FluxVelocity",
    "JiTFlux2KleinPipeline",
    "JiTFluxPipeline",
    "disable_cache_dit",
    "enable_cache_dit",
    "enable_jit",
    "install_anchor_attention",
    "remove_anchor_attention",
    "use_anchor_attention",
    "use_cache_dit",
]
