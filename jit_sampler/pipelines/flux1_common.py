"""What the FLUX.1 JiT pipelines share: :class:`Flux1JiTMixin`.

The FLUX.1 pipelines of diffusers (text-to-image, Kontext, Img2Img, Inpaint, Fill, ControlNet)
are separate classes (``FluxKontextPipeline`` is not a ``FluxPipeline``), but they encode the
prompts, shift the schedule, prepare IP-adapter embeddings and decode the latents the same way.
:class:`Flux1JiTMixin` holds those pieces once, built from each pipeline's public parts
(``encode_prompt``, ``_unpack_latents``, the VAE and image processor). Every ``_jit_call``
checks and prepares its own inputs (prompts, images, masks, control, start latents, schedule)
and ends in :meth:`Flux1JiTMixin._sample_and_finish`, giving only what differs (a post-step
blend, condition or reference tokens, a velocity class, an overlay). Not registered itself (it
sets no ``_stock_class``).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

from ..config import JiTConfig
from .attention_processor import use_anchor_attention
from .base import UNSET, JiTPipelineMixin, execution_device, per_image
from .velocity import FluxVelocity

__all__ = ["Flux1JiTMixin"]


class Flux1JiTMixin(JiTPipelineMixin):
    """The shared half of the FLUX.1 JiT pipelines (module docstring).

    ``__call__`` takes ``jit=`` and ``anchor_attention=`` (``True``: the transformer's stock FLUX
    attention processors are swapped for :class:`~jit_sampler.pipelines.attention_processor.AnchorAttnProcessor`,
    fused rotary + attention, for this call only).
    """

    def __call__(self, *args, jit=UNSET, anchor_attention: bool = False, **kwargs):
        if anchor_attention:
            with use_anchor_attention(self.transformer):
                return self.__call__(*args, jit=jit, **kwargs)
        return self._dispatch(super().__call__, args, kwargs, jit)

    def _shift_mu(self, image_seq_len: int, steps: int) -> float:
        c = self.scheduler.config
        return calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.15))

    def _start_call(self, guidance_scale, joint_attention_kwargs) -> None:
        """The call state the stock ``__call__`` sets after its input checks."""
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = joint_attention_kwargs
        self._current_timestep = None
        self._interrupt = False

    def _encode_prompts(self, prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, *, negative_prompt=None,
                        negative_prompt_2=None, negative_prompt_embeds=None, negative_pooled_prompt_embeds=None,
                        true_cfg_scale: float = 1.0, device, num_images_per_prompt: int, max_sequence_length: int,
                        joint_attention_kwargs, total: int, shared_text_ids: bool = False):
        """``(prompt_embeds, pooled, text_ids, negative)`` for ``total`` images.

        ``negative`` is ``(neg_embeds, neg_pooled, neg_text_ids)`` when true CFG is on
        (``true_cfg_scale > 1`` and a negative prompt or both negative embeddings), else ``None``;
        precomputed negative embeddings must then have the positive's shape (``ValueError``, the
        stock text-to-image check). With ``shared_text_ids`` the negative branch takes the
        positive's text ids, as the stock ControlNet / Img2Img / Inpaint loops do; otherwise its
        own (stock text-to-image and Kontext). Both branches are encoded with the LoRA scale of
        ``joint_attention_kwargs``, and precomputed embeddings are repeated per image too (the
        stock ``encode_prompt`` repeats only what it encodes itself).
        """
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
            neg_embeds, neg_pooled, neg_ids = self.encode_prompt(
                prompt=negative_prompt, prompt_2=negative_prompt_2, prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=negative_pooled_prompt_embeds, device=device,
                num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
                lora_scale=lora_scale)
            negative = (per_image(neg_embeds, total), per_image(neg_pooled, total),
                        text_ids if shared_text_ids else neg_ids)
        return per_image(prompt_embeds, total), per_image(pooled_prompt_embeds, total), text_ids, negative

    def _blank_ip_image(self, width, height):
        """The IP-adapter image of a branch given none while the other has one: FluxPipeline's black
        image per IP-adapter (the stock Img2Img / Inpaint pipelines use a single one)."""
        return [np.zeros((width, height, 3), dtype=np.uint8)] * self.transformer.encoder_hid_proj.num_ip_adapters

    def _ip_adapter_embeds(self, ip_image, ip_embeds, neg_ip_image, neg_ip_embeds, width, height, device, batch):
        """IP-adapter embeddings per branch, as the stock pipeline prepares them (``None`` when unused)."""
        if (ip_image is not None or ip_embeds is not None) and (neg_ip_image is None and neg_ip_embeds is None):
            neg_ip_image = self._blank_ip_image(width, height)
        elif (ip_image is None and ip_embeds is None) and (neg_ip_image is not None or neg_ip_embeds is not None):
            ip_image = self._blank_ip_image(width, height)
        image_embeds = negative_image_embeds = None
        if ip_image is not None or ip_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(ip_image, ip_embeds, device, batch)
        if neg_ip_image is not None or neg_ip_embeds is not None:
            negative_image_embeds = self.prepare_ip_adapter_image_embeds(neg_ip_image, neg_ip_embeds, device, batch)
        return image_embeds, negative_image_embeds

    def _guidance(self, guidance_scale, device, batch: int, model=None):
        """The distilled-guidance input ``[batch]`` (float32) of ``model`` (the transformer unless given,
        e.g. a ControlNet), or ``None`` for a model without guidance embedding."""
        if not (self.transformer if model is None else model).config.guidance_embeds:
            return None
        return torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(batch)

    def _sample_and_finish(self, cfg: JiTConfig, sig, t0: float, encoded, *, latents, latent_image_ids, grid_h,
                           grid_w, height, width, total, device, generator, guidance_scale, output_type, return_dict,
                           callback_on_step_end, callback_on_step_end_tensor_inputs, true_cfg_scale: float = 1.0,
                           ip_adapter=(None, None, None, None), post_step=None, cond_tokens=None, ref_tokens=None,
                           ref_ids=None, velocity_class=FluxVelocity, velocity_kwargs=None, postprocess=None,
                           extend_report=None):
        """The end of every FLUX.1 ``_jit_call``, from the prepared packed ``latents`` to the returned output.

        ``encoded``: ``(prompt_embeds, pooled, text_ids, negative)`` of :meth:`_encode_prompts`;
        ``ip_adapter``: the call's ``(ip_adapter_image, ip_adapter_image_embeds,
        negative_ip_adapter_image, negative_ip_adapter_image_embeds)``. In order: the IP-adapter
        embeddings (:meth:`_ip_adapter_embeds`), the end of the encode phase, the velocity
        (``velocity_class``, :class:`FluxVelocity` unless a pipeline brings its own, with its
        ``velocity_kwargs``; ``cond_tokens`` / ``ref_tokens`` / ``ref_ids`` as FluxVelocity takes them),
        :meth:`_denoise` (``post_step`` as it takes it), :meth:`_decode_latents` at ``height x width``,
        ``postprocess(image) -> image`` when given (inpainting's overlay), :meth:`_finish_call`
        (reference tokens counted per call) and ``extend_report(report, velocity)`` when given.
        """
        prompt_embeds, pooled_prompt_embeds, text_ids, negative = encoded
        image_embeds, negative_image_embeds = self._ip_adapter_embeds(*ip_adapter, width, height, device, total)
        t_encoded = time.perf_counter()
        self._num_timesteps = cfg.total_steps
        guidance = self._guidance(guidance_scale, device, latents.shape[0])
        if self._joint_attention_kwargs is None:
            self._joint_attention_kwargs = {}
        timesteps, set_timestep = self._timesteps(sig, device)
        velocity = velocity_class(transformer=self.transformer, prompt_embeds=prompt_embeds,
                                  pooled_prompt_embeds=pooled_prompt_embeds, text_ids=text_ids,
                                  img_ids=latent_image_ids, guidance=guidance, negative=negative,
                                  true_cfg_scale=true_cfg_scale, joint_attention_kwargs=self._joint_attention_kwargs,
                                  image_embeds=image_embeds,
                                  negative_image_embeds=negative_image_embeds if negative is not None else None,
                                  pre_call=set_timestep, backend=cfg.backend, token_bucket=cfg.token_bucket,
                                  ref_tokens=ref_tokens, ref_ids=ref_ids, cond_tokens=cond_tokens,
                                  **(velocity_kwargs or {}))
        latents, report = self._denoise(velocity, latents, grid_h, grid_w, sig, cfg, generator, timesteps,
                                        callback_on_step_end, callback_on_step_end_tensor_inputs, post_step=post_step)
        t_sampled = time.perf_counter()
        image = self._decode_latents(latents, height, width, output_type)
        if postprocess is not None:
            image = postprocess(image)
        out = self._finish_call(report, image, (t0, t_encoded, t_sampled), grid_h * grid_w, prompt_embeds.shape[1],
                                calls_per_step=2 if negative is not None else 1, return_dict=return_dict,
                                output_class=FluxPipelineOutput,
                                ref_tokens=0 if ref_tokens is None else ref_tokens.shape[1])
        if extend_report is not None:
            extend_report(report, velocity)
        return out

    def _decode_latents(self, latents, height, width, output_type):
        """Packed latents -> the pipeline's output as stock: the latents themselves for ``"latent"``,
        else unpacked, un-scaled, VAE-decoded and post-processed images."""
        if output_type == "latent":
            return latents
        latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
        latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
        image = self.vae.decode(latents.to(execution_device(self.vae)), return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type=output_type)
