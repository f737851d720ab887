"""JiT for diffusers' FLUX.2-klein: ``JiTFlux2KleinPipeline``.

Same ``jit=`` argument, presets, sampler core (:func:`jit_sampler.jit_sample`) and report as
:class:`~jit_sampler.JiTFluxPipeline`; what differs is FLUX.2's side of the call (docs/method.md
section 6):

- 4-axis position ids ``(t, h, w, l)``; the anchors run with their own rows of them;
- no pooled text embedding; true CFG with two passes (``guidance_scale`` > 1 on a model that
  is not step-distilled, 4.0 by default), cond and uncond sharing the anchor set;
- the pipeline's own sigma schedule (``linspace(1, 1/n, n)`` shifted by its empirical ``mu``),
  never Beta-warped: the config's ``sigma_schedule`` / Beta parameters are ignored here.

``jit=None`` is exactly ``Flux2KleinPipeline.__call__``.

Reference images (``image=``: a PIL image or a list of them) are prepared as the stock
pipeline does it (area cap, crop to a multiple of ``2 * vae_scale_factor``, VAE encoding;
the output size defaults to the first image's). Reference ``i`` carries the position ids
``(10 + 10 i, row, col, 0)`` (a time offset per image; the target's is 0). JiT works on the
target tokens only: every reference token is passed to the transformer in every call, cond
and uncond alike, after the active target tokens (``FluxVelocity(ref_tokens=...,
ref_ids=...)``), and only the target rows of the output are kept. The report's FLOPs count
the reference tokens as dense image tokens in every call (JiT run and dense baselines).
:mod:`.flux2_klein_kv` adds ``Flux2KleinKVPipeline``, which computes the reference tokens
once and reuses their cached keys and values.
"""

from __future__ import annotations

import inspect
import time

import torch
from diffusers import Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from diffusers.pipelines.flux2.pipeline_output import Flux2PipelineOutput

from ..config import JiTConfig
from .checks import check_latents_shape
from .base import UNSET, JiTPipelineMixin, execution_device, per_image
from .velocity import FluxVelocity

__all__ = ["JiTFlux2KleinPipeline"]


def check_reference_images(pipe, image) -> list | None:
    """``image`` as a list of PIL images (``None`` stays ``None``), each checked as stock checks it
    (size, aspect ratio); anything else raises before any work (stock takes only PIL images here:
    it reads their ``.size``)."""
    if image is None:
        return None
    from PIL import Image

    items = image if isinstance(image, list) else [image]
    if not items:
        raise ValueError("image: an empty list; pass None for text-to-image")
    for it in items:
        if not isinstance(it, Image.Image):
            raise TypeError(f"image: FLUX.2 reference images must be PIL images (or a list of them), "
                            f"got {type(it).__name__}")
        pipe.image_processor.check_image_input(it)
    return items


def prepare_reference_images(pipe, images: list | None, height, width):
    """Stock FLUX.2 preprocessing of the reference images: ``(condition_images, height, width)``.

    Each image (checked by :func:`check_reference_images`) is scaled down to 1024^2 pixels when larger,
    cropped to a multiple of ``2 * vae_scale_factor`` and normalised; ``height`` / ``width``
    default to the first image's size.
    """
    if images is None:
        return None, height, width
    multiple_of = pipe.vae_scale_factor * 2
    condition_images = []
    for img in images:
        image_width, image_height = img.size
        if image_width * image_height > 1024 * 1024:
            img = pipe.image_processor._resize_to_target_area(img, 1024 * 1024)
            image_width, image_height = img.size
        image_width = image_width // multiple_of * multiple_of
        image_height = image_height // multiple_of * multiple_of
        condition_images.append(pipe.image_processor.preprocess(img, height=image_height, width=image_width,
                                                                resize_mode="crop"))
        height = height or image_height
        width = width or image_width
    return condition_images, height, width


def check_flux2_latents(pipe, latents, total: int, height: int, width: int) -> None:
    """Given FLUX.2 ``latents`` are the unpacked ``[total, in_channels, grid_h, grid_w]`` noise (as stock)."""
    grid_h, grid_w = pipe._token_grid(height, width)
    check_latents_shape(latents, (total, pipe.transformer.config.in_channels, grid_h, grid_w),
                        "unpacked start latents [B, C, grid_h, grid_w]")


def decode_flux2(pipe, latents, latent_ids, grid_h: int, grid_w: int, output_type: str):
    """Packed target latents ``[B, N, C]`` -> the pipeline's output (latents or decoded images), as stock."""
    if "height" in inspect.signature(pipe._unpack_latents_with_ids).parameters:
        latents = pipe._unpack_latents_with_ids(latents, latent_ids, grid_h, grid_w)
    else:  # Flux2KleinKVPipeline's older copy reads the grid size from the ids
        latents = pipe._unpack_latents_with_ids(latents, latent_ids)
    bn_mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
    bn_std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps).to(
        latents.device, latents.dtype)
    latents = pipe._unpatchify_latents(latents * bn_std + bn_mean)
    if output_type == "latent":
        return latents
    image = pipe.vae.decode(latents.to(execution_device(pipe.vae)), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)


class Flux2JiTMixin(JiTPipelineMixin):
    """What the FLUX.2-klein JiT pipelines share: the ``jit=`` call and the empirical resolution shift."""

    def __call__(self, *args, jit=UNSET, **kwargs):
        return self._dispatch(super().__call__, args, kwargs, jit)

    def _shift_mu(self, image_seq_len: int, steps: int) -> float:
        return compute_empirical_mu(image_seq_len=image_seq_len, num_steps=steps)


class JiTFlux2KleinPipeline(Flux2JiTMixin, Flux2KleinPipeline):
    """``Flux2KleinPipeline`` with ``jit=`` (``None``, a preset name or a :class:`JiTConfig`).

    ``num_inference_steps`` or ``sigmas``, when passed, override the config's step count; the
    sigmas are always the pipeline's own schedule. ``image=`` reference images stay active in
    every call (module docstring). ``pipe.last_jit_report`` holds the
    :class:`~jit_sampler.JiTReport` of the last JiT call (FLOPs per sample, reference tokens
    counted as dense in every call).
    """

    _stock_class = Flux2KleinPipeline
    _stock_call = inspect.signature(Flux2KleinPipeline.__call__)

    @torch.no_grad()
    def _jit_call(self, cfg: JiTConfig, *, explicit_steps: bool, image, prompt, height, width, num_inference_steps,
                  sigmas, guidance_scale, num_images_per_prompt, generator, latents, prompt_embeds,
                  negative_prompt_embeds, output_type, return_dict, attention_kwargs, callback_on_step_end,
                  callback_on_step_end_tensor_inputs, max_sequence_length, text_encoder_out_layers, **newer):
        self._refuse_newer(newer)
        images = check_reference_images(self, image)
        t0 = time.perf_counter()
        self.check_inputs(prompt=prompt, height=height, width=width, prompt_embeds=prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          guidance_scale=guidance_scale)
        self._guidance_scale = guidance_scale
        stages = self._steps_config(cfg, sigmas, explicit_steps, num_inference_steps)  # this run's stages
        self._check_context_parallel(stages, height, width, prompt_embeds,
                                     negative_prompt_embeds if self.do_classifier_free_guidance else None)
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        batch_size = self._batch_size(prompt, prompt_embeds)
        if self.do_classifier_free_guidance and negative_prompt_embeds is None and self.text_encoder is None:
            raise ValueError("guidance_scale > 1 encodes an empty negative prompt, but the pipeline has no "
                             "text_encoder: pass negative_prompt_embeds (or guidance_scale=1.0)")
        # Reference preprocessing (no model) first, so that the latent shape can be checked before any work.
        condition_images, height, width = prepare_reference_images(self, images, height, width)
        height, width = self._default_size(height, width)
        check_flux2_latents(self, latents, batch_size * num_images_per_prompt, height, width)
        device = self._execution_device
        prompt_embeds, text_ids = self.encode_prompt(
            prompt=prompt, prompt_embeds=prompt_embeds, device=device, num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length, text_encoder_out_layers=text_encoder_out_layers)
        negative = None
        if self.do_classifier_free_guidance:
            neg_prompt = [""] * len(prompt) if isinstance(prompt, list) else ""
            neg_embeds, neg_ids = self.encode_prompt(
                prompt=neg_prompt, prompt_embeds=negative_prompt_embeds, device=device,
                num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
                text_encoder_out_layers=text_encoder_out_layers)
            total = batch_size * num_images_per_prompt
            negative = (per_image(neg_embeds, total), None, neg_ids[0])

        latents, latent_ids = self.prepare_latents(
            batch_size=batch_size * num_images_per_prompt, num_latents_channels=self.transformer.config.in_channels // 4,
            height=height, width=width, dtype=prompt_embeds.dtype, device=device, generator=generator, latents=latents)
        ref_tokens = ref_ids = None
        if condition_images is not None:
            ref_tokens, ref_ids = self.prepare_image_latents(
                images=condition_images, batch_size=batch_size * num_images_per_prompt, generator=generator,
                device=device, dtype=self.vae.dtype)
            ref_ids = ref_ids[0]
        num_ref = 0 if ref_tokens is None else ref_tokens.shape[1]
        t_encoded = time.perf_counter()
        grid_h, grid_w = self._token_grid(height, width)

        cfg, sig = self._schedule(cfg, sigmas, explicit_steps, num_inference_steps, latents.shape[1], device,
                                  beta=False)
        timesteps, set_timestep = self._timesteps(sig, device)

        velocity = FluxVelocity(self.transformer, prompt_embeds, None, text_ids[0], latent_ids[0], guidance=None,
                                negative=negative, true_cfg_scale=guidance_scale,
                                joint_attention_kwargs=attention_kwargs or {}, pre_call=set_timestep,
                                backend=cfg.backend, token_bucket=cfg.token_bucket, ref_tokens=ref_tokens,
                                ref_ids=ref_ids)

        latents, report = self._denoise(velocity, latents, grid_h, grid_w, sig, cfg, generator, timesteps,
                                        callback_on_step_end, callback_on_step_end_tensor_inputs)
        t_sampled = time.perf_counter()

        image = decode_flux2(self, latents, latent_ids, grid_h, grid_w, output_type)
        return self._finish_call(report, image, (t0, t_encoded, t_sampled), grid_h * grid_w, prompt_embeds.shape[1],
                                 calls_per_step=2 if negative is not None else 1, return_dict=return_dict,
                                 output_class=Flux2PipelineOutput, ref_tokens=num_ref)
