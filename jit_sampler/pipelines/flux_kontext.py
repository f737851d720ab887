"""JiT for diffusers' FLUX.1 Kontext (image editing with a reference image): ``JiTFluxKontextPipeline``.

``JiTFluxKontextPipeline(...)(..., jit=None)`` is exactly ``FluxKontextPipeline.__call__``.
With ``jit`` (a preset name or a :class:`~jit_sampler.JiTConfig`) the denoising loop is
:func:`jit_sampler.jit_sample`, as in :class:`~jit_sampler.JiTFluxPipeline`, with one
addition: the reference image.

- The reference image is prepared as the stock pipeline does it (``max_area`` fitting of the
  output size, the preferred-resolution ``_auto_resize``, VAE encoding in ``prepare_latents``;
  latents with the VAE's channel count are used as they are). Its packed tokens carry the
  position ids ``(1, row, col)`` (first id axis 1, the target's is 0).
- JiT works on the target tokens only. Every reference token is passed to the transformer in
  every call, after the active target tokens, with its own ids
  (``FluxVelocity(ref_tokens=..., ref_ids=...)``); only the target rows of the output are
  kept. The dense stage therefore sees exactly the stock sequence ``[target, reference]``.
- The report's FLOPs count the reference tokens as dense image tokens in every call, in the
  JiT run and in both dense baselines, so the speed-ups are those of the whole transformer
  work (they are lower than without a reference: the reference is never made sparse).
"""

from __future__ import annotations

import inspect
import math
import time

import torch
from diffusers import FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
from diffusers.utils import logging

from ..config import JiTConfig
from ..scalar_checks import is_real
from .checks import check_image_input, check_latents_shape, check_preprocessed
from .flux1_common import Flux1JiTMixin

__all__ = ["JiTFluxKontextPipeline"]

logger = logging.get_logger(__name__)


def _check_reference(image, latent_channels: int) -> None:
    """Refuse a reference ``image`` that the stock preprocessing would choke on, before any work."""
    if image is None:
        return
    if isinstance(image, list) and not image:
        raise ValueError("image: an empty list; pass None for text-to-image")
    check_image_input("image", image)
    if isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[1] == latent_channels:
        if image.shape[2] % 2 or image.shape[3] % 2:
            raise ValueError(f"image: reference latents need an even height and width to be packed 2 x 2, got "
                             f"{tuple(image.shape)}")


class JiTFluxKontextPipeline(Flux1JiTMixin, FluxKontextPipeline):
    """``FluxKontextPipeline`` with a ``jit=`` argument (``None``, a preset name or a :class:`JiTConfig`).

    ``jit=None`` calls ``FluxKontextPipeline.__call__`` unchanged. Otherwise every argument
    keeps its stock meaning (``image``, ``max_area``, ``_auto_resize`` included), except: the
    steps and sigmas come from the config (``config.total_steps``, Beta schedule) unless
    ``num_inference_steps`` or ``sigmas`` is passed explicitly (``sigmas`` or
    ``sigma_schedule="pipeline"`` use the scheduler's resolution-shifted schedule, shifted by
    the target's token count as stock does). The reference tokens are active in every call;
    JiT makes only the target sparse (module docstring). ``pipe.last_jit_report`` holds the
    :class:`~jit_sampler.JiTReport` of the last JiT call (FLOPs per sample, reference tokens
    counted as dense in every call; ``flops["extra_tokens"]`` lists them per step).
    ``anchor_attention=True`` is as in :class:`~jit_sampler.JiTFluxPipeline`.
    """

    _stock_class = FluxKontextPipeline
    _stock_call = inspect.signature(FluxKontextPipeline.__call__)
    _fits_size = True  # height / width only set the aspect ratio: max_area sets the size (checked after the fit)

    def _fit_area(self, height, width, max_area):
        """The output size as stock computes it: the aspect ratio kept, the area set to ``max_area``,
        rounded down to a multiple of ``2 * vae_scale_factor`` (with stock's warning when it changes)."""
        if not is_real(max_area):
            raise TypeError(f"max_area must be a number of pixels, got {type(max_area).__name__}")
        if not (math.isfinite(max_area) and max_area > 0):
            raise ValueError(f"max_area must be a positive number of pixels, got {max_area}")
        asked_h, asked_w = self._default_size(height, width)
        aspect_ratio = asked_w / asked_h
        multiple_of = self.vae_scale_factor * 2
        width = round((max_area * aspect_ratio) ** 0.5) // multiple_of * multiple_of
        height = round((max_area / aspect_ratio) ** 0.5) // multiple_of * multiple_of
        if height < multiple_of or width < multiple_of:
            raise ValueError(f"max_area={max_area} with the aspect ratio {asked_w}:{asked_h} gives a {height} x "
                             f"{width} image, less than one {multiple_of} x {multiple_of} token")
        if (height, width) != (asked_h, asked_w):
            logger.warning(f"Generation `height` and `width` have been adjusted to {height} and {width} to fit "
                           f"`max_area` ({max_area}) and the model's multiple of {multiple_of}.")
        return height, width

    def _reference_tokens(self, image) -> int:
        """Packed tokens of a preprocessed reference (pixels ``[b, 3, H, W]`` or latents ``[b, c, h, w]``)."""
        if image is None:
            return 0
        p = 2 if image.shape[1] == self.latent_channels else 2 * self.vae_scale_factor
        return (image.shape[-2] // p) * (image.shape[-1] // p)

    def _preprocess_reference(self, image, auto_resize: bool):
        """The reference image resized and normalised as stock does (latent tensors pass through)."""
        if image is None or (isinstance(image, torch.Tensor) and image.size(1) == self.latent_channels):
            return image
        multiple_of = self.vae_scale_factor * 2
        img = image[0] if isinstance(image, list) else image
        image_height, image_width = self.image_processor.get_default_height_width(img)
        if auto_resize:  # Kontext's preferred resolution closest in aspect ratio
            aspect_ratio = image_width / image_height
            _, image_width, image_height = min((abs(aspect_ratio - w / h), w, h)
                                               for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        image_width = image_width // multiple_of * multiple_of
        image_height = image_height // multiple_of * multiple_of
        if image_width < multiple_of or image_height < multiple_of:
            raise ValueError(f"image: the reference is smaller than one {multiple_of} x {multiple_of} token "
                             f"(use _auto_resize=True to resize it)")
        image = self.image_processor.resize(image, image_height, image_width)
        image = self.image_processor.preprocess(image, image_height, image_width)
        if image.shape[1] != 3:
            raise ValueError(f"image: a reference image needs 3 channels (or {self.latent_channels} for latents), got "
                             f"shape {tuple(image.shape)}")
        return image

    @torch.no_grad()
    def _jit_call(self, cfg: JiTConfig, *, explicit_steps: bool, image, prompt, prompt_2, negative_prompt,
                  negative_prompt_2, true_cfg_scale, height, width, num_inference_steps, sigmas, guidance_scale,
                  num_images_per_prompt, generator, latents, prompt_embeds, pooled_prompt_embeds, ip_adapter_image,
                  ip_adapter_image_embeds, negative_ip_adapter_image, negative_ip_adapter_image_embeds,
                  negative_prompt_embeds, negative_pooled_prompt_embeds, output_type, return_dict,
                  joint_attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs,
                  max_sequence_length, max_area, _auto_resize, **newer):
        self._refuse_newer(newer)
        _check_reference(image, self.latent_channels)
        t0 = time.perf_counter()
        height, width = self._fit_area(height, width, max_area)
        self.check_inputs(prompt, prompt_2, height, width, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        self._start_call(guidance_scale, joint_attention_kwargs)

        batch_size = self._batch_size(prompt, prompt_embeds)
        device = self._execution_device
        total = batch_size * num_images_per_prompt
        grid_h, grid_w = self._token_grid(height, width)
        check_latents_shape(latents, (total, grid_h * grid_w, self.transformer.config.in_channels),
                            "packed start latents [B, N tokens, C]")
        # Preprocessing (no model) before the prompts are encoded, so that a bad reference fails first.
        image = self._preprocess_reference(image, _auto_resize)
        if image is not None:  # the stock prepare_latents repeats a reference batch that divides the images
            check_preprocessed("image", image, (3, self.latent_channels), total)
        stages = self._steps_config(cfg, sigmas, explicit_steps, num_inference_steps)  # this run's stages
        self._check_context_parallel(stages, height, width, prompt_embeds,
                                     negative_prompt_embeds if true_cfg_scale > 1 else None,
                                     extra=self._reference_tokens(image))
        prompt_embeds, pooled_prompt_embeds, text_ids, negative = self._encode_prompts(
            prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_embeds=negative_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, true_cfg_scale=true_cfg_scale, device=device,
            num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
            joint_attention_kwargs=joint_attention_kwargs, total=total)

        num_channels_latents = self.transformer.config.in_channels // 4
        latents, image_latents, latent_ids, image_ids = self.prepare_latents(
            image, total, num_channels_latents, height, width, prompt_embeds.dtype, device, generator, latents)

        # stock shifts by the target's token count (the reference does not count)
        cfg, sig = self._schedule(cfg, sigmas, explicit_steps, num_inference_steps, latents.shape[1], device)
        return self._sample_and_finish(
            cfg, sig, t0, (prompt_embeds, pooled_prompt_embeds, text_ids, negative), latents=latents,
            latent_image_ids=latent_ids, grid_h=grid_h, grid_w=grid_w, height=height, width=width, total=total,
            device=device, generator=generator, guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale,
            ip_adapter=(ip_adapter_image, ip_adapter_image_embeds, negative_ip_adapter_image,
                        negative_ip_adapter_image_embeds),
            output_type=output_type, return_dict=return_dict, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, ref_tokens=image_latents,
            ref_ids=image_ids)
