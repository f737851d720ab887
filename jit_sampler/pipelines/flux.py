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

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

from ..config import JiTConfig
from ..schedule import beta_sigmas
from .attention_processor import use_anchor_attention
from .base import UNSET, JiTPipelineMixin, execution_device, per_image
from .velocity import FluxVelocity

__all__ = ["JiTFluxPipeline"]


class JiTFluxPipeline(JiTPipelineMixin, FluxPipeline):
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

    def __call__(self, *args, jit=UNSET, anchor_attention: bool = False, **kwargs):
        # anchor_attention=True: the transformer's stock FLUX attention processors are swapped for
        # AnchorAttnProcessor (fused rotary + attention, attention_processor.py) for this call only.
        if anchor_attention:

            with use_anchor_attention(self.transformer):
                return self.__call__(*args, jit=jit, **kwargs)
        return self._dispatch(super().__call__, args, kwargs, jit)

    @torch.no_grad()
    def _jit_call(self, cfg: JiTConfig, *, explicit_steps: bool, prompt, prompt_2, negative_prompt, negative_prompt_2,
                  true_cfg_scale, height, width, num_inference_steps, sigmas, guidance_scale, num_images_per_prompt,
                  generator, latents, prompt_embeds, pooled_prompt_embeds, ip_adapter_image, ip_adapter_image_embeds,
                  negative_ip_adapter_image, negative_ip_adapter_image_embeds, negative_prompt_embeds,
                  negative_pooled_prompt_embeds, output_type, return_dict, joint_attention_kwargs,
                  callback_on_step_end, callback_on_step_end_tensor_inputs, max_sequence_length, **newer):
        self._refuse_newer(newer)
        t0 = time.perf_counter()
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(prompt, prompt_2, height, width, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        self._check_context_parallel(cfg, height, width, prompt_embeds,
                                     negative_prompt_embeds if true_cfg_scale > 1 else None)
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
        # FluxPipeline repeats only embeddings it encodes itself; precomputed ones are expanded
        # here so that num_images_per_prompt works with prompt_embeds too.
        total = batch_size * num_images_per_prompt
        prompt_embeds, pooled_prompt_embeds = per_image(prompt_embeds, total), per_image(pooled_prompt_embeds, total)
        if negative is not None:
            negative = (per_image(negative[0], total), per_image(negative[1], total), negative[2])
        t_encoded = time.perf_counter()

        num_channels_latents = self.transformer.config.in_channels // 4
        latents, latent_image_ids = self.prepare_latents(batch_size * num_images_per_prompt, num_channels_latents,
                                                         height, width, prompt_embeds.dtype, device, generator,
                                                         latents)
        # The packed token grid (prepare_latents rounds the latent size down to even).
        grid_h = int(height) // (self.vae_scale_factor * 2)
        grid_w = int(width) // (self.vae_scale_factor * 2)

        cfg = self._steps_config(cfg, sigmas, explicit_steps, num_inference_steps)
        steps = cfg.total_steps
        if cfg.sigma_schedule == "beta" and sigmas is None:
            sig = beta_sigmas(steps, cfg.beta_alpha, cfg.beta_beta)
        else:
            sig = self._scheduler_sigmas(steps, sigmas, latents.shape[1], device)
        self._num_timesteps = steps

        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(latents.shape[0])

        image_embeds, negative_image_embeds = self._ip_adapter_embeds(
            ip_adapter_image, ip_adapter_image_embeds, negative_ip_adapter_image, negative_ip_adapter_image_embeds,
            width, height, device, batch_size * num_images_per_prompt)
        if self._joint_attention_kwargs is None:
            self._joint_attention_kwargs = {}

        timesteps, set_timestep = self._timesteps(sig, device)
        velocity = FluxVelocity(self.transformer, prompt_embeds, pooled_prompt_embeds, text_ids, latent_image_ids,
                                guidance=guidance, negative=negative, true_cfg_scale=true_cfg_scale,
                                joint_attention_kwargs=self._joint_attention_kwargs, image_embeds=image_embeds,
                                negative_image_embeds=negative_image_embeds if do_true_cfg else None,
                                pre_call=set_timestep, backend=cfg.backend,
                                token_bucket=cfg.token_bucket)

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
                            calls_per_step=2 if do_true_cfg else 1)

        if not return_dict:
            return (image,)
        return FluxPipelineOutput(images=image)

    def _shift_mu(self, image_seq_len: int, steps: int) -> float:
        c = self.scheduler.config
        return calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.15))

    def _ip_adapter_embeds(self, ip_image, ip_embeds, neg_ip_image, neg_ip_embeds, width, height, device, batch):
        """IP-adapter embeddings per branch, exactly as FluxPipeline prepares them (``None`` when unused)."""
        if (ip_image is not None or ip_embeds is not None) and (neg_ip_image is None and neg_ip_embeds is None):
            neg_ip_image = [np.zeros((width, height, 3), dtype=np.uint8)] * self.transformer.encoder_hid_proj.num_ip_adapters
        elif (ip_image is None and ip_embeds is None) and (neg_ip_image is not None or neg_ip_embeds is not None):
            ip_image = [np.zeros((width, height, 3), dtype=np.uint8)] * self.transformer.encoder_hid_proj.num_ip_adapters
        image_embeds = negative_image_embeds = None
        if ip_image is not None or ip_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(ip_image, ip_embeds, device, batch)
        if neg_ip_image is not None or neg_ip_embeds is not None:
            negative_image_embeds = self.prepare_ip_adapter_image_embeds(neg_ip_image, neg_ip_embeds, device, batch)
        return image_embeds, negative_image_embeds
