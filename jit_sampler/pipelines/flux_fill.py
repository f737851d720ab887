"""JiT for diffusers' FLUX.1 Fill (inpainting / outpainting model): ``JiTFluxFillPipeline``.

FLUX.1 Fill is a transformer with a wider input: every image token carries the noisy latent
(``4 c`` channels, 64 for FLUX), the latents of the masked image (``4 c``) and the mask at
pixel resolution folded into the token (``4 * vae_scale_factor^2`` = 256 channels), all three
packed 2 x 2 and concatenated on the channel axis (FLUX.1 Fill: 64 + 64 + 256 = 384 inputs,
64 outputs). Under ``jit=`` the latent is integrated by :func:`jit_sampler.jit_sample` as for
text-to-image; the masked-image and mask tokens are handed to
:class:`~jit_sampler.FluxVelocity` as ``cond_tokens``, which gathers the rows of the active
tokens with the same indices as their position ids (once per stage) and concatenates them to
the active latent tokens before every forward. Every token, masked or not, is in the JiT
active sets: the model repaints the masked region from the condition, there is no per-step
blend (unlike :class:`~jit_sampler.JiTFluxInpaintPipeline`).

``strength`` (1.0 by default: start from pure noise) cuts the schedule exactly as for
Img2Img, and the JiT stages are laid out over the steps actually run
(:mod:`jit_sampler.pipelines.flux_img2img`). ``jit=None`` calls ``FluxFillPipeline.__call__``
untouched.
"""

from __future__ import annotations

import inspect
import time

import torch
from diffusers import FluxFillPipeline

from ..config import JiTConfig
from .checks import check_image_input, check_latents_shape, check_preprocessed
from .flux_img2img import _JiTFluxImageMixin

__all__ = ["JiTFluxFillPipeline"]


class JiTFluxFillPipeline(_JiTFluxImageMixin, FluxFillPipeline):
    """``FluxFillPipeline`` with ``jit=`` (``None``, a preset name or a :class:`JiTConfig`).

    Every argument keeps its meaning; the schedule of ``n`` steps (the config's, or
    ``num_inference_steps`` / ``sigmas`` when passed) is cut at ``strength`` and the JiT stages
    cover the steps run. The masked image and the mask (or ``masked_image_latents``, the packed
    ``[B, N, 4c + 4 vae_scale_factor^2]`` condition as diffusers takes it) are concatenated to the
    active tokens at every step (module docstring). ``pipe.last_jit_report`` holds the
    :class:`~jit_sampler.JiTReport`; its FLOPs use the transformer's (wider) ``in_channels``.
    """

    _stock_class = FluxFillPipeline
    _stock_call = inspect.signature(FluxFillPipeline.__call__)

    @torch.no_grad()
    def _jit_call(self, cfg: JiTConfig, *, explicit_steps: bool, prompt, prompt_2, image, mask_image,
                  masked_image_latents, height, width, strength, num_inference_steps, sigmas, guidance_scale,
                  num_images_per_prompt, generator, latents, prompt_embeds, pooled_prompt_embeds, output_type,
                  return_dict, joint_attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs,
                  max_sequence_length, **newer):
        self._refuse_newer(newer)
        self._check_strength(strength)
        t0 = time.perf_counter()
        height, width = self._default_size(height, width)
        self.check_inputs(prompt, prompt_2, strength, height, width, prompt_embeds=prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length, image=image, mask_image=mask_image,
                          masked_image_latents=masked_image_latents)
        # The stock call always preprocesses `image` and fails on a missing one (even with
        # `masked_image_latents`, which check_inputs does not allow together with `image`). Here the
        # image is needed for the start latent and, without `masked_image_latents`, for the condition.
        if image is None and (masked_image_latents is None or latents is None):
            raise ValueError("`image` is required (unless both `masked_image_latents` and `latents` are given)")
        check_image_input("image", image, required=False)
        check_image_input("mask_image", mask_image, required=masked_image_latents is None)
        batch_size, total, device, grid_h, grid_w = self._start_image_call(
            guidance_scale, joint_attention_kwargs, prompt, prompt_embeds, num_images_per_prompt, generator, height,
            width)
        n_tokens = grid_h * grid_w
        c = self.vae.config.latent_channels
        check_latents_shape(latents, (total, n_tokens, 4 * c), "packed noised start latents [B, N tokens, C]")
        cond_channels = self.transformer.config.in_channels - 4 * c
        if masked_image_latents is None and cond_channels != 4 * c + 4 * self.vae_scale_factor ** 2:
            raise ValueError(f"{type(self).__name__} needs a FLUX Fill transformer with in_channels = 4 * {c} (latent) "
                             f"+ 4 * {c} (masked image) + 4 * {self.vae_scale_factor ** 2} (mask) = "
                             f"{8 * c + 4 * self.vae_scale_factor ** 2}, got {self.transformer.config.in_channels}")
        if masked_image_latents is not None:
            if not isinstance(masked_image_latents, torch.Tensor):
                raise TypeError(f"masked_image_latents must be a tensor, got {type(masked_image_latents).__name__}")
            want = (n_tokens, cond_channels)
            if masked_image_latents.dim() != 3 or tuple(masked_image_latents.shape[1:]) != want \
                    or masked_image_latents.shape[0] not in (1, total):
                raise ValueError(f"masked_image_latents must be packed [B, N, C] = [{total}, {want[0]}, {want[1]}] "
                                 f"(or batch 1), got {tuple(masked_image_latents.shape)}")
        cfg, sig = self._strength_schedule(cfg, strength, sigmas, explicit_steps, num_inference_steps, n_tokens,
                                           device)
        self._check_context_parallel(cfg, height, width, prompt_embeds)
        init_image = mask_pre = None
        if image is not None:
            init_image = self.image_processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
            # a latent-channel image can only be the start latent; the masked image is made from pixels
            check_preprocessed("image", init_image, (3,) if masked_image_latents is None else (3, self.latent_channels),
                               total)
        if masked_image_latents is None:  # checked before any encoding
            mask_pre = self.mask_processor.preprocess(mask_image, height=height, width=width)
            check_preprocessed("mask_image", mask_pre, (1,), total, "masks")

        encoded = self._encode_prompts(
            prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, device=device,
            num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
            joint_attention_kwargs=joint_attention_kwargs, total=total)
        dtype = encoded[0].dtype
        latents, latent_image_ids = self._start_latents(init_image, latents, c, height, width, total, dtype, device,
                                                        generator, sig[0])
        if masked_image_latents is not None:
            cond = masked_image_latents.to(device=device, dtype=dtype).expand(total, -1, -1)
        else:
            masked_image = (init_image * (1 - mask_pre)).to(device=device, dtype=dtype)
            ih, iw = init_image.shape[-2:]
            mask, masked = self.prepare_mask_latents(mask_pre, masked_image, batch_size, c, num_images_per_prompt,
                                                     ih, iw, dtype, device, generator)
            cond = torch.cat((masked, mask), dim=-1)
            height, width = ih, iw  # as the stock call: decode at the preprocessed size
        # no negative prompt (negative is None) and no IP-adapter: one transformer call per step
        return self._sample_and_finish(
            cfg, sig, t0, encoded, latents=latents, latent_image_ids=latent_image_ids, grid_h=grid_h, grid_w=grid_w,
            height=height, width=width, total=total, device=device, generator=generator,
            guidance_scale=guidance_scale, output_type=output_type, return_dict=return_dict,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, cond_tokens=cond)
