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
import time

import torch
from diffusers import FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from diffusers.utils import logging

from ..config import JiTConfig
from ..schedule import beta_sigmas
from .attention_processor import use_anchor_attention
from .base import UNSET, JiTPipelineMixin, execution_device, per_image
from .flux import JiTFluxPipeline
from .velocity import FluxVelocity

__all__ = ["JiTFluxKontextPipeline"]

logger = logging.get_logger(__name__)


def _check_reference(image, latent_channels: int) -> None:
    """Refuse a reference ``image`` that the stock preprocessing would choke on, before any work."""
    if image is None:
        return
    items = image if isinstance(image, list) else [image]
    if not items:
        raise ValueError("image: an empty list; pass None for text-to-image")
    import numpy as np
    from PIL import Image

    for it in items:
        if not isinstance(it, (Image.Image, np.ndarray, torch.Tensor)):
            raise TypeError(f"image: expected a PIL image, a numpy array or a torch tensor (or a list of them), "
                            f"got {type(it).__name__}")
    if isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[1] == latent_channels:
        if image.shape[2] % 2 or image.shape[3] % 2:
            raise ValueError(f"image: reference latents need an even height and width to be packed 2 x 2, got "
                             f"{tuple(image.shape)}")


class JiTFluxKontextPipeline(JiTPipelineMixin, FluxKontextPipeline):
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

    # FLUX.1's resolution shift and IP-adapter preparation are the same for Kontext.
    _shift_mu = JiTFluxPipeline._shift_mu
    _ip_adapter_embeds = JiTFluxPipeline._ip_adapter_embeds

    def __call__(self, *args, jit=UNSET, anchor_attention: bool = False, **kwargs):
        if anchor_attention:
            with use_anchor_attention(self.transformer):
                return self.__call__(*args, jit=jit, **kwargs)
        return self._dispatch(super().__call__, args, kwargs, jit)

    def _fit_area(self, height, width, max_area):
        """The output size as stock computes it: the aspect ratio kept, the area set to ``max_area``,
        rounded down to a multiple of ``2 * vae_scale_factor`` (with stock's warning when it changes)."""
        asked_h = height or self.default_sample_size * self.vae_scale_factor
        asked_w = width or self.default_sample_size * self.vae_scale_factor
        aspect_ratio = asked_w / asked_h
        multiple_of = self.vae_scale_factor * 2
        width = round((max_area * aspect_ratio) ** 0.5) // multiple_of * multiple_of
        height = round((max_area / aspect_ratio) ** 0.5) // multiple_of * multiple_of
        if (height, width) != (asked_h, asked_w):
            logger.warning(f"Generation `height` and `width` have been adjusted to {height} and {width} to fit "
                           f"`max_area` ({max_area}) and the model's multiple of {multiple_of}.")
        return height, width

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
        image = self.image_processor.resize(image, image_height, image_width)
        return self.image_processor.preprocess(image, image_height, image_width)

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
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = joint_attention_kwargs
        self._current_timestep = None
        self._interrupt = False

        batch_size = self._batch_size(prompt, prompt_embeds)
        device = self._execution_device
        lora_scale = joint_attention_kwargs.get("scale", None) if joint_attention_kwargs is not None else None
        has_neg_prompt = negative_prompt is not None or (
            negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None)
        do_true_cfg = true_cfg_scale > 1 and has_neg_prompt
        if do_true_cfg and prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(f"`prompt_embeds` and `negative_prompt_embeds` must have the same shape when passed "
                                 f"directly, but got {prompt_embeds.shape} != {negative_prompt_embeds.shape}.")
        prompt_embeds, pooled_prompt_embeds, text_ids = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            device=device, num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
            lora_scale=lora_scale)
        negative = None
        if do_true_cfg:
            negative = self.encode_prompt(
                prompt=negative_prompt, prompt_2=negative_prompt_2, prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=negative_pooled_prompt_embeds, device=device,
                num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
                lora_scale=lora_scale)
        total = batch_size * num_images_per_prompt
        prompt_embeds, pooled_prompt_embeds = per_image(prompt_embeds, total), per_image(pooled_prompt_embeds, total)
        if negative is not None:
            negative = (per_image(negative[0], total), per_image(negative[1], total), negative[2])

        image = self._preprocess_reference(image, _auto_resize)
        t_encoded = time.perf_counter()

        num_channels_latents = self.transformer.config.in_channels // 4
        latents, image_latents, latent_ids, image_ids = self.prepare_latents(
            image, total, num_channels_latents, height, width, prompt_embeds.dtype, device, generator, latents)
        grid_h = int(height) // (self.vae_scale_factor * 2)
        grid_w = int(width) // (self.vae_scale_factor * 2)
        num_ref = 0 if image_latents is None else image_latents.shape[1]

        cfg = self._steps_config(cfg, sigmas, explicit_steps, num_inference_steps)
        steps = cfg.total_steps
        if cfg.sigma_schedule == "beta" and sigmas is None:
            sig = beta_sigmas(steps, cfg.beta_alpha, cfg.beta_beta)
        else:  # stock shifts by the target's token count (the reference does not count)
            sig = self._scheduler_sigmas(steps, sigmas, latents.shape[1], device)
        self._num_timesteps = steps

        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(latents.shape[0])
        image_embeds, negative_image_embeds = self._ip_adapter_embeds(
            ip_adapter_image, ip_adapter_image_embeds, negative_ip_adapter_image, negative_ip_adapter_image_embeds,
            width, height, device, total)
        if self._joint_attention_kwargs is None:
            self._joint_attention_kwargs = {}

        timesteps, set_timestep = self._timesteps(sig, device)
        velocity = FluxVelocity(self.transformer, prompt_embeds, pooled_prompt_embeds, text_ids, latent_ids,
                                guidance=guidance, negative=negative, true_cfg_scale=true_cfg_scale,
                                joint_attention_kwargs=self._joint_attention_kwargs, image_embeds=image_embeds,
                                negative_image_embeds=negative_image_embeds if do_true_cfg else None,
                                pre_call=set_timestep, backend=cfg.backend, token_bucket=cfg.token_bucket,
                                ref_tokens=image_latents, ref_ids=image_ids)

        latents, report = self._denoise(velocity, latents, grid_h, grid_w, sig, cfg, generator, timesteps,
                                        callback_on_step_end, callback_on_step_end_tensor_inputs)
        t_sampled = time.perf_counter()

        if output_type == "latent":
            image = latents
        else:
            latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            image = self.vae.decode(latents.to(execution_device(self.vae)), return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        t_end = time.perf_counter()

        self._finish_report(report, (t0, t_encoded, t_sampled, t_end), grid_h * grid_w, prompt_embeds.shape[1],
                            calls_per_step=2 if do_true_cfg else 1, ref_tokens=num_ref)
        if not return_dict:
            return (image,)
        return FluxPipelineOutput(images=image)
