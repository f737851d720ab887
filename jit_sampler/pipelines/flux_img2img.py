"""JiT for diffusers' FLUX.1 image-to-image and inpainting: ``JiTFluxImg2ImgPipeline``, ``JiTFluxInpaintPipeline``.

Both start from an image instead of pure noise: ``strength`` in [0, 1] chooses how far up the
noise schedule the image is pushed, and only the remaining steps are integrated. Under
``jit=`` (a preset name or a :class:`~jit_sampler.JiTConfig`) that works as follows
(:meth:`_JiTFluxImageMixin._strength_schedule`):

1. the *full* schedule of ``n`` steps is built: ``n`` is the config's ``total_steps`` unless
   the caller passes ``num_inference_steps`` or ``sigmas``; it is the Beta schedule
   (``sigma_schedule="beta"``, the presets) or the pipeline's own resolution-shifted one
   (``sigma_schedule="pipeline"`` or explicit ``sigmas``);
2. it is cut exactly like diffusers' ``get_timesteps``: ``t_start = int(n - min(n * strength, n))``
   steps are skipped, the run starts at ``sigma[t_start] < 1`` and takes ``n - t_start`` steps;
3. the JiT stage layout (``stage_ratios``) and token budgets (``token_ratios``) are laid out over
   the steps actually run, i.e. the config is used with ``total_steps = n - t_start``. The
   sparse stages therefore always come first, however late the run starts.

Example, the 7x preset (11 steps, stages 0.4 / 0.65 / 1.0, tokens 0.32 / 0.60 / 1.0):
``strength=1.0`` runs 11 steps as 4 / 3 / 4; ``strength=0.6`` skips 4 steps and runs the last 7
(from sigma 0.929) as 2 / 2 / 3; ``strength=0.3`` runs 4 steps as 1 / 1 / 2. The 4x preset at
``strength=0.6`` runs 11 of 18 steps as 4 / 3 / 4. Short runs follow the few-step layout of
:class:`~jit_sampler.JiTConfig` (docs/method.md section 6): 7x at ``strength=0.2`` keeps 3 steps
and runs them as 1 / 1 / 1; with fewer steps than stages the sparsest stages are dropped (one
step left is a dense Euler step). A strength that leaves no step at all raises the stock
``ValueError`` before any work (as in diffusers). A larger ``num_inference_steps`` gives a low
strength more sparse steps (e.g. 7x with ``num_inference_steps=28, strength=0.2`` runs 6 steps
as 2 / 1 / 3).

The image is noised to the first sigma as ``sigma * noise + (1 - sigma) * image_latents``
(the scheduler's ``scale_noise``), the noise drawn from ``generator`` after the image is
encoded, in diffusers' order. Inpainting then blends the known region back after every JiT
step, on the full latent: ``latents = (1 - mask) * image_at(sigma_next) + mask * latents``
with the image re-noised with the same noise to the next sigma (the clean image latents after
the last step), exactly the stock rule; the blend runs before ``callback_on_step_end``. All
tokens, masked or not, stay in the JiT active sets.

``jit=None`` calls the stock ``__call__`` untouched.
"""

from __future__ import annotations

import inspect
import time

import numpy as np
import torch
from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline
from diffusers.utils.torch_utils import randn_tensor

from ..config import JiTConfig
from ..scalar_checks import check_int, is_real
from .checks import check_image_input, check_latents_shape, check_preprocessed
from .flux1_common import Flux1JiTMixin

__all__ = ["JiTFluxImg2ImgPipeline", "JiTFluxInpaintPipeline"]


def steps_after_strength(num_inference_steps: int, strength: float) -> tuple[int, int]:
    """``(t_start, steps_run)`` of diffusers' ``get_timesteps``: the first ``t_start`` of
    ``num_inference_steps`` steps are skipped and ``steps_run`` are integrated."""
    init_timestep = min(num_inference_steps * strength, num_inference_steps)
    t_start = int(max(num_inference_steps - init_timestep, 0))
    return t_start, num_inference_steps - t_start


def add_noise(image_latents: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """The flow's forward process at ``sigma``: ``sigma * noise + (1 - sigma) * image_latents``
    (what ``FlowMatchEulerDiscreteScheduler.scale_noise`` computes, with sigma in the latent dtype)."""
    s = torch.tensor(sigma, dtype=image_latents.dtype, device=image_latents.device)
    return s * noise + (1.0 - s) * image_latents


class _JiTFluxImageMixin(Flux1JiTMixin):
    """What the FLUX.1 pipelines that start from an image share under ``jit=`` (beyond
    :class:`~jit_sampler.pipelines.flux1_common.Flux1JiTMixin`): the input checks, the truncated
    schedule, the image latents. Not registered itself."""

    @staticmethod
    def _check_strength(strength) -> None:
        """A real number in [0, 1] (the stock check lets NaN through and fails on ``None`` with a bare TypeError)."""
        if not is_real(strength):
            raise TypeError(f"strength must be a number in [0, 1], got {type(strength).__name__}")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"The value of strength should in [0.0, 1.0] but is {strength}")

    @staticmethod
    def _check_generators(generator, total: int) -> None:
        """A list of generators needs one per image (as diffusers' ``prepare_latents``), checked up front."""
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(f"You have passed a list of generators of length {len(generator)}, but requested an "
                             f"effective batch size of {total}. Make sure the batch size matches the length of the "
                             f"generators.")

    def _start_image_call(self, guidance_scale, joint_attention_kwargs, prompt, prompt_embeds,
                          num_images_per_prompt: int, generator, height, width):
        """The call state set (:meth:`_start_call`) and ``(batch_size, total, device, grid_h, grid_w)``;
        a list of generators must hold one per image (``total``)."""
        self._start_call(guidance_scale, joint_attention_kwargs)
        batch_size = self._batch_size(prompt, prompt_embeds)
        total = batch_size * num_images_per_prompt
        self._check_generators(generator, total)
        return batch_size, total, self._execution_device, *self._token_grid(height, width)

    def _strength_schedule(self, cfg: JiTConfig, strength, sigmas, explicit_steps: bool, num_inference_steps,
                           image_seq_len: int, device) -> tuple[JiTConfig, list[float]]:
        """The config for the steps actually run and their ``steps_run + 1`` sigmas (module docstring).

        Raises ``ValueError`` when ``strength`` leaves no step, or too few for the config's stage layout.
        """
        if sigmas is not None:
            n = len(sigmas)
        elif explicit_steps:
            n = check_int("num_inference_steps", num_inference_steps, minimum=None)
        else:
            n = cfg.total_steps
        if n < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {n}")
        t_start, run = steps_after_strength(n, strength)
        if run < 1:
            raise ValueError(f"After adjusting the num_inference_steps by strength parameter: {strength}, the number "
                             f"of pipeline steps is {run} which is < 1 and not appropriate for this pipeline.")
        try:
            cfg_run = cfg.replace(total_steps=run)
        except ValueError as exc:
            raise ValueError(f"strength={strength} leaves {run} of {n} steps for the JiT stages: {exc}") from exc
        full = self._run_sigmas(cfg, n, sigmas, image_seq_len, device)
        return cfg_run, full[t_start:]

    def _image_latents(self, init_image: torch.Tensor, total: int, dtype, device, generator) -> torch.Tensor:
        """Unpacked image latents ``[total, C, h, w]``: VAE-encoded (unless ``init_image`` already has the
        latent channels) and repeated per image, as the stock ``prepare_latents``."""
        image = init_image.to(device=device, dtype=dtype)
        lat = self._encode_vae_image(image=image, generator=generator) if image.shape[1] != self.latent_channels \
            else image
        if total > lat.shape[0]:
            if total % lat.shape[0]:
                raise ValueError(f"Cannot duplicate `image` of batch size {lat.shape[0]} to {total} text prompts.")
            lat = torch.cat([lat] * (total // lat.shape[0]), dim=0)
        return lat

    def _start_latents(self, init_image, latents, channels: int, height, width, total: int, dtype, device, generator,
                       sigma: float):
        """``(packed start latents, latent_image_ids)``: the given (already noised, packed) ``latents``,
        or the image latents noised to ``sigma`` with noise drawn after the VAE encoding (diffusers' order)."""
        h, w = self._latent_size(height, width)
        latent_image_ids = self._prepare_latent_image_ids(total, h // 2, w // 2, device, dtype)
        if latents is not None:
            return latents.to(device=device, dtype=dtype), latent_image_ids
        image_latents = self._image_latents(init_image, total, dtype, device, generator)
        noise = randn_tensor((total, channels, h, w), generator=generator, device=device, dtype=dtype)
        return self._pack_latents(add_noise(image_latents, noise, sigma), total, channels, h, w), latent_image_ids

    def _latent_size(self, height, width) -> tuple[int, int]:
        """The unpacked latent's ``(h, w)`` (even: FLUX packs 2 x 2 patches)."""
        grid_h, grid_w = self._token_grid(height, width)
        return 2 * grid_h, 2 * grid_w

    @staticmethod
    def _check_masked_image_latents(masked_image_latents, total: int) -> None:
        """Inpainting's ``masked_image_latents``: ``[b, 16, h, w]`` latents or a ``[b, 3, H, W]`` masked image
        (the stock ``prepare_mask_latents`` tells them apart by the 16 channels), ``b`` dividing ``total``."""
        if masked_image_latents is None:
            return
        if not isinstance(masked_image_latents, torch.Tensor) or not masked_image_latents.is_floating_point():
            raise TypeError(f"masked_image_latents must be a floating-point tensor, got "
                            f"{getattr(masked_image_latents, 'dtype', type(masked_image_latents).__name__)}")
        if masked_image_latents.dim() != 4:
            raise ValueError(f"masked_image_latents must be [B, 16, h, w] latents or a [B, 3, H, W] masked image, "
                             f"got shape {tuple(masked_image_latents.shape)}")
        check_preprocessed("masked_image_latents", masked_image_latents, (3, 16), total)

    @staticmethod
    def _blank_ip_image(width, height):
        """The stock Img2Img / Inpaint placeholder: one black image (not one per IP-adapter)."""
        return np.zeros((width, height, 3), dtype=np.uint8)


class JiTFluxImg2ImgPipeline(_JiTFluxImageMixin, FluxImg2ImgPipeline):
    """``FluxImg2ImgPipeline`` with ``jit=`` (``None``, a preset name or a :class:`JiTConfig`).

    ``jit=None`` is ``FluxImg2ImgPipeline.__call__`` unchanged. Otherwise every argument keeps
    its meaning; the schedule of ``n`` steps (the config's, or ``num_inference_steps`` /
    ``sigmas`` when passed) is cut at ``strength`` like diffusers does, and the JiT stages are
    laid out over the steps actually run (see the module docstring for the arithmetic).
    ``latents``, when given, are the already-noised packed start latents (as in diffusers).
    ``pipe.last_jit_report`` holds the :class:`~jit_sampler.JiTReport` (its ``sigmas`` are the
    truncated schedule; FLOPs per sample).
    """

    _stock_class = FluxImg2ImgPipeline
    _stock_call = inspect.signature(FluxImg2ImgPipeline.__call__)

    @torch.no_grad()
    def _jit_call(self, cfg: JiTConfig, *, explicit_steps: bool, prompt, prompt_2, negative_prompt, negative_prompt_2,
                  true_cfg_scale, image, height, width, strength, num_inference_steps, sigmas, guidance_scale,
                  num_images_per_prompt, generator, latents, prompt_embeds, pooled_prompt_embeds, ip_adapter_image,
                  ip_adapter_image_embeds, negative_ip_adapter_image, negative_ip_adapter_image_embeds,
                  negative_prompt_embeds, negative_pooled_prompt_embeds, output_type, return_dict,
                  joint_attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs,
                  max_sequence_length, **newer):
        self._refuse_newer(newer)
        self._check_strength(strength)
        t0 = time.perf_counter()
        height, width = self._default_size(height, width)
        self.check_inputs(prompt, prompt_2, strength, height, width, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        check_image_input("image", image)
        batch_size, total, device, grid_h, grid_w = self._start_image_call(
            guidance_scale, joint_attention_kwargs, prompt, prompt_embeds, num_images_per_prompt, generator, height,
            width)
        check_latents_shape(latents, (total, grid_h * grid_w, self.transformer.config.in_channels),
                            "packed noised start latents [B, N tokens, C]")
        cfg, sig = self._strength_schedule(cfg, strength, sigmas, explicit_steps, num_inference_steps,
                                           grid_h * grid_w, device)
        self._check_context_parallel(cfg, height, width, prompt_embeds,
                                     negative_prompt_embeds if true_cfg_scale > 1 else None)
        init_image = self.image_processor.preprocess(image, height=height, width=width).to(dtype=torch.float32)
        check_preprocessed("image", init_image, (3, self.latent_channels), total)

        # The stock check_inputs has compared precomputed embedding shapes; the negative branch
        # takes the positive's text ids, as the stock loop does.
        prompt_embeds, pooled_prompt_embeds, text_ids, negative = self._encode_prompts(
            prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_embeds=negative_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, true_cfg_scale=true_cfg_scale, device=device,
            num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
            joint_attention_kwargs=joint_attention_kwargs, total=total, shared_text_ids=True)

        latents, latent_image_ids = self._start_latents(init_image, latents, self.transformer.config.in_channels // 4,
                                                        height, width, total, prompt_embeds.dtype, device, generator,
                                                        sig[0])
        return self._sample_and_finish(
            cfg, sig, t0, (prompt_embeds, pooled_prompt_embeds, text_ids, negative), latents=latents,
            latent_image_ids=latent_image_ids, grid_h=grid_h, grid_w=grid_w, height=height, width=width, total=total,
            device=device, generator=generator, guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale,
            ip_adapter=(ip_adapter_image, ip_adapter_image_embeds, negative_ip_adapter_image,
                        negative_ip_adapter_image_embeds),
            output_type=output_type, return_dict=return_dict, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)


class JiTFluxInpaintPipeline(_JiTFluxImageMixin, FluxInpaintPipeline):
    """``FluxInpaintPipeline`` with ``jit=`` (``None``, a preset name or a :class:`JiTConfig`).

    As :class:`JiTFluxImg2ImgPipeline` (``strength`` cuts the schedule, the JiT stages cover the
    steps run), plus the stock inpainting rule after every JiT step, on the full latent: the
    unmasked region is replaced by the image latents re-noised to the next sigma (the clean
    image latents after the last step), before ``callback_on_step_end`` sees the latents.
    ``padding_mask_crop`` works as in diffusers (PIL output pasted over the original).
    """

    _stock_class = FluxInpaintPipeline
    _stock_call = inspect.signature(FluxInpaintPipeline.__call__)

    @torch.no_grad()
    def _jit_call(self, cfg: JiTConfig, *, explicit_steps: bool, prompt, prompt_2, negative_prompt, negative_prompt_2,
                  true_cfg_scale, image, mask_image, masked_image_latents, height, width, padding_mask_crop, strength,
                  num_inference_steps, sigmas, guidance_scale, num_images_per_prompt, generator, latents,
                  prompt_embeds, pooled_prompt_embeds, ip_adapter_image, ip_adapter_image_embeds,
                  negative_ip_adapter_image, negative_ip_adapter_image_embeds, negative_prompt_embeds,
                  negative_pooled_prompt_embeds, output_type, return_dict, joint_attention_kwargs,
                  callback_on_step_end, callback_on_step_end_tensor_inputs, max_sequence_length, **newer):
        self._refuse_newer(newer)
        self._check_strength(strength)
        t0 = time.perf_counter()
        height, width = self._default_size(height, width)
        self.check_inputs(prompt, prompt_2, image, mask_image, strength, height, width, output_type=output_type,
                          negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          padding_mask_crop=padding_mask_crop, max_sequence_length=max_sequence_length)
        check_image_input("image", image)
        check_image_input("mask_image", mask_image)
        batch_size, total, device, grid_h, grid_w = self._start_image_call(
            guidance_scale, joint_attention_kwargs, prompt, prompt_embeds, num_images_per_prompt, generator, height,
            width)
        channels = self.transformer.config.in_channels // 4
        check_latents_shape(latents, (total, channels, *self._latent_size(height, width)),
                            "unpacked noise latents [B, C, h, w] (as the stock inpainting pipeline takes them)")
        self._check_masked_image_latents(masked_image_latents, total)
        cfg, sig = self._strength_schedule(cfg, strength, sigmas, explicit_steps, num_inference_steps,
                                           grid_h * grid_w, device)
        self._check_context_parallel(cfg, height, width, prompt_embeds,
                                     negative_prompt_embeds if true_cfg_scale > 1 else None)
        if padding_mask_crop is not None:
            crops_coords = self.mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop)
            resize_mode = "fill"
        else:
            crops_coords, resize_mode = None, "default"
        init_image = self.image_processor.preprocess(image, height=height, width=width, crops_coords=crops_coords,
                                                     resize_mode=resize_mode).to(dtype=torch.float32)
        mask_condition = self.mask_processor.preprocess(mask_image, height=height, width=width,
                                                        resize_mode=resize_mode, crops_coords=crops_coords)
        # checked before any encoding (the stock pipeline finds a mismatch after it, or not at all)
        check_preprocessed("image", init_image, (3, self.latent_channels), total)
        check_preprocessed("mask_image", mask_condition, (1,), total, "masks")

        # The stock check_inputs has compared precomputed embedding shapes; the negative branch
        # takes the positive's text ids, as the stock loop does.
        prompt_embeds, pooled_prompt_embeds, text_ids, negative = self._encode_prompts(
            prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_embeds=negative_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, true_cfg_scale=true_cfg_scale, device=device,
            num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
            joint_attention_kwargs=joint_attention_kwargs, total=total, shared_text_ids=True)

        h, w = self._latent_size(height, width)
        c = self.transformer.config.in_channels // 4
        dtype = prompt_embeds.dtype
        latent_image_ids = self._prepare_latent_image_ids(total, h // 2, w // 2, device, dtype)
        image_latents = self._image_latents(init_image, total, dtype, device, generator)
        if latents is None:
            noise = randn_tensor((total, c, h, w), generator=generator, device=device, dtype=dtype)
            latents = add_noise(image_latents, noise, sig[0])
        else:  # as diffusers: given latents are both the start latent and the re-noising noise
            noise = latents = latents.to(device)
        noise = self._pack_latents(noise, total, c, h, w)
        image_latents = self._pack_latents(image_latents, total, c, h, w)
        latents = self._pack_latents(latents, total, c, h, w)
        masked_image = init_image * (mask_condition < 0.5) if masked_image_latents is None else masked_image_latents
        mask, _ = self.prepare_mask_latents(mask_condition, masked_image, batch_size, c, num_images_per_prompt,
                                            height, width, dtype, device, generator)

        last = cfg.total_steps - 1

        def keep_known(i: int, y: torch.Tensor) -> torch.Tensor:
            # The stock rule after step i: the unmasked region is the image at the next sigma.
            known = image_latents if i == last else add_noise(image_latents, noise, sig[i + 1])
            return (1 - mask) * known + mask * y

        def overlay(out):  # check_inputs made sure output_type is "pil"
            return [self.image_processor.apply_overlay(mask_image, image, im, crops_coords) for im in out]

        return self._sample_and_finish(
            cfg, sig, t0, (prompt_embeds, pooled_prompt_embeds, text_ids, negative), latents=latents,
            latent_image_ids=latent_image_ids, grid_h=grid_h, grid_w=grid_w, height=height, width=width, total=total,
            device=device, generator=generator, guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale,
            ip_adapter=(ip_adapter_image, ip_adapter_image_embeds, negative_ip_adapter_image,
                        negative_ip_adapter_image_embeds),
            output_type=output_type, return_dict=return_dict, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs, post_step=keep_known,
            postprocess=None if padding_mask_crop is None else overlay)
