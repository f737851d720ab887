"""diffusers pipelines with JiT: one module per pipeline family, all built on :mod:`.base`.

- :mod:`.velocity`: :class:`FluxVelocity`, the transformer run on the active tokens;
- :mod:`.base`: :class:`~.base.JiTPipelineMixin` (dispatch, schedule, denoising, report) and
  :func:`enable_jit`;
- :mod:`.flux1_common`: :class:`~.flux1_common.Flux1JiTMixin`, what the FLUX.1 pipelines share
  (prompt encoding with true CFG, and the call tail from the prepared latents to the output:
  IP-adapter embeddings, the velocity run, the decode, the report);
- :mod:`.flux`: :class:`JiTFluxPipeline` (FLUX.1 text-to-image);
- :mod:`.flux2_klein`: :class:`JiTFlux2KleinPipeline` (FLUX.2-klein, reference images too);
- :mod:`.flux_kontext`: :class:`JiTFluxKontextPipeline` (FLUX.1 Kontext, a reference image);
- :mod:`.flux2_klein_kv`: :class:`JiTFlux2KleinKVPipeline` (FLUX.2-klein with KV-cached
  reference images);
- :mod:`.flux_img2img`: :class:`JiTFluxImg2ImgPipeline`, :class:`JiTFluxInpaintPipeline` (FLUX.1
  image-to-image and inpainting, ``strength``);
- :mod:`.flux_fill`: :class:`JiTFluxFillPipeline` (FLUX.1 Fill);
- :mod:`.flux_controlnet`: :class:`JiTFluxControlNetPipeline` (FLUX.1 ControlNet, the ControlNet
  run on the active tokens too);
- :mod:`.qwen_image`: :class:`JiTQwenImagePipeline` (Qwen-Image) and its :class:`QwenImageVelocity`;
- :mod:`.attention_processor`: :class:`AnchorAttnProcessor`, the fused rotary + attention
  processor for FLUX transformers.
- :mod:`.sd3`: :class:`JiTStableDiffusion3Pipeline` (Stable Diffusion 3 / 3.5, ``jit=`` and ``ras=``)
  and its :class:`SD3Velocity`;
- :mod:`.ras_pipelines`: :func:`enable_ras`, :class:`RASFluxPipeline` (FLUX.1 with ``ras=``);
  :mod:`.ras_attention`: RAS's per-layer key/value cache as attention processors
  (:func:`use_ras_attention`; ``docs/ras.md``).
- :mod:`.parallel`: JiT under diffusers' context parallelism (Ulysses): the split checks and
  the padding-mask layout (``docs/parallelism.md``).
- :mod:`.cache_dit`: :func:`enable_cache_dit` / :func:`disable_cache_dit` / :func:`use_cache_dit`,
  cache-dit's DBCache on one JiT pipeline, reset at every stage transition.

A new pipeline is a module here with a class that sets ``_stock_class``; list its module in
``_PIPELINE_MODULES`` (:func:`enable_jit`'s preference order) and its public names in
``jit_sampler/_pipeline_names.py`` (the one list both ``jit_sampler`` and this package export).
"""

from __future__ import annotations

import importlib

from .._pipeline_names import PIPELINE_EXPORTS as _EXPORTS  # public name -> its module here
from .attention_processor import AnchorAttnProcessor, install_anchor_attention, remove_anchor_attention, use_anchor_attention
from .base import enable_jit
from .velocity import FluxVelocity

_PIPELINE_MODULES = (
    "flux",
    "flux2_klein",
    "flux_kontext",
    "flux2_klein_kv",
    "qwen_image",
    "flux_img2img",
    "flux_fill",
    "flux_controlnet",
    "sd3",
)


def _load_all() -> None:
    for m in _PIPELINE_MODULES:
        importlib.import_module(f"{__name__}.{m}")


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
