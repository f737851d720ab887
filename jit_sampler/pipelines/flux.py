"""JiT for diffusers' FLUX.1 text-to-image: ``JiTFluxPipeline``.

``JiTFluxPipeline(...)(..., jit=None)`` is exactly ``FluxPipeline.__call__``. With ``jit`` (a
preset name or a :class:`~jit_sampler.JiTConfig`) the denoising loop is
:func:`jit_sampler.jit_sample`, built from FluxPipeline's public pieces (``check_inputs``,
``encode_prompt``, ``prepare_latents``, ``_unpack_latents``, the VAE and image processor),
with the transformer run on the active tokens and their own ``img_ids`` rows
(:class:`~jit_sampler.pipelines.velocity.FluxVelocity`).
"""

from __future__ import annotations

import inspect
import time

import torch
from diffusers import FluxPipeline

from ..config import JiTConfig
from .flux1_common import Flux1JiTMixin

__all__ = ["JiTFluxPipeline"]


class JiTFluxPipeline(Flux1JiTMixin, FluxPipeline):
    """``FluxPipeline`` with a ``jit=`` argument (``None``, a preset name or a :class:`JiTConfig`).

    ``jit=None`` calls ``FluxPipeline.__call__`` unchanged. Otherwise every FluxPipeline
    argument keeps its meaning, except: the steps and sigmas come from the config
    (``config.total_steps``, Beta schedule) unless ``num_inference_steps`` or ``sigmas``
    is passed explicitly (an explicit value overrides the config's steps; ``sigmas`` or
    ``sigma_schedule="pipeline"`` use the scheduler's own, resolution-shifted schedule).
    After a JiT call ``pipe.last_jit_report`` holds a :class:`~jit_sampler.JiTReport`
    (FLOPs are per sample). ``anchor_attention=True`` runs the call (JiT or dense) with the
    fused rotary + attention processor of :mod:`jit_sampler.pipelines.attention_processor` and restores the
    previous processors afterwards (the processor fuses on CPU tensors; on CUDA it keeps the
    stock math unless installed with ``devices=("cpu", "cuda")``, see its docstring).
    """

    _stock_class = FluxPipeline
    _stock_call = inspect.signature(FluxPipeline.__call__)

    @torch.no_grad()
    def _jit_call(self, cfg: JiTConfig, *, explicit_steps: bool, prompt, prompt_2, negative_prompt, negative_prompt_2,
                  true_cfg_scale, height, width, num_inference_steps, sigmas, guidance_scale, num_images_per_prompt,
                  generator, latents, prompt_embeds, pooled_prompt_embeds, ip_adapter_image, ip_adapter_image_embeds,
                  negative_ip_adapter_image, negative_ip_adapter_image_embeds, negative_prompt_embeds,
                  negative_pooled_prompt_embeds, output_type, return_dict, joint_attention_kwargs,
                  callback_on_step_end, callback_on_step_end_tensor_inputs, max_sequence_length, **newer):
        self._refuse_newer(newer)
        t0 = time.perf_counter()
        height, width = self._default_size(height, width)
        self.check_inputs(prompt, prompt_2, height, width, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        self._check_context_parallel(cfg, height, width, prompt_embeds,
                                     negative_prompt_embeds if true_cfg_scale > 1 else None)
        self._start_call(guidance_scale, joint_attention_kwargs)

        batch_size = self._batch_size(prompt, prompt_embeds)
        device = self._execution_device
        total = batch_size * num_images_per_prompt
        prompt_embeds, pooled_prompt_embeds, text_ids, negative = self._encode_prompts(
            prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_embeds=negative_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, true_cfg_scale=true_cfg_scale, device=device,
            num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
            joint_attention_kwargs=joint_attention_kwargs, total=total)

        num_channels_latents = self.transformer.config.in_channels // 4
        latents, latent_image_ids = self.prepare_latents(batch_size * num_images_per_prompt, num_channels_latents,
                                                         height, width, prompt_embeds.dtype, device, generator,
                                                         latents)
        # The packed token grid (prepare_latents rounds the latent size down to even).
        grid_h, grid_w = self._token_grid(height, width)

        cfg, sig = self._schedule(cfg, sigmas, explicit_steps, num_inference_steps, latents.shape[1], device)
        return self._sample_and_finish(
            cfg, sig, t0, (prompt_embeds, pooled_prompt_embeds, text_ids, negative), latents=latents,
            latent_image_ids=latent_image_ids, grid_h=grid_h, grid_w=grid_w, height=height, width=width, total=total,
            device=device, generator=generator, guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale,
            ip_adapter=(ip_adapter_image, ip_adapter_image_embeds, negative_ip_adapter_image,
                        negative_ip_adapter_image_embeds),
            output_type=output_type, return_dict=return_dict, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
