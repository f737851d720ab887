"""JiT for diffusers' FLUX.2-klein with KV-cached reference images: ``JiTFlux2KleinKVPipeline``.

``Flux2KleinKVPipeline`` (step-distilled, no CFG) conditions on reference images without
running their tokens at every step. Its transformer's KV attention processors make the
reference tokens attend only to themselves, modulated at a fixed timestep, so their keys and
values depend on nothing but the reference images:

- the first call runs ``[reference, target]`` with ``kv_cache_mode="extract"``; it returns the
  target's velocity and a ``Flux2KVCache`` holding every layer's reference K/V (after RoPE);
- every later call runs the target tokens alone with ``kv_cache_mode="cached"``; the cached
  reference K/V are inserted between the text and the target keys.

Under JiT the first call is the first step's, on that step's active tokens, exactly as stock
does it on all tokens; since the cache does not depend on the target tokens, it is reused by
every later call whatever its active subset (stage transitions included). Per-sample anchor
sets (``anchor_policy="per_sample"``) run one forward per sample: the cache comes from the
first sample's call and serves every sample, because the pipeline gives every sample the
same reference tokens (stock repeats them over the batch).

``jit=None`` is exactly ``Flux2KleinKVPipeline.__call__``. Without ``image`` the pipeline is
plain FLUX.2-klein text-to-image (one pass per step). ``token_bucket`` with reference images
is refused: the KV processors take no attention mask in the extract and cached modes, so
padding tokens could not be masked out.

The report's FLOPs count the reference tokens as dense image tokens in the first call only
(later calls run no reference token through the linear layers); the attention of the later
calls over the cached reference keys is not counted.
"""

from __future__ import annotations

import inspect
import time

import torch
from diffusers import Flux2KleinKVPipeline
from diffusers.models.transformers.transformer_flux2 import Flux2KVCache
from diffusers.pipelines.flux2.pipeline_output import Flux2PipelineOutput

from ..config import JiTConfig
from .flux2_klein import (Flux2JiTMixin, check_flux2_latents, check_reference_images, decode_flux2,
                          prepare_reference_images)
from .velocity import FluxVelocity

__all__ = ["JiTFlux2KleinKVPipeline", "KVReferenceVelocity"]


class KVReferenceVelocity(FluxVelocity):
    """:class:`FluxVelocity` for a FLUX.2 transformer with KV attention processors and reference tokens.

    Args (besides :class:`FluxVelocity`'s, without ``ref_tokens`` / ``ref_ids`` there):
        kv_ref_tokens: ``[B, R, C]`` reference tokens (every row the same images).
        kv_ref_ids: ``[R, 4]`` their position ids.

    The first forward prepends the reference tokens and extracts their K/V
    (``kv_cache_mode="extract"``); every later forward passes the active target tokens only
    and reuses the cache (``"cached"``). ``kv_cache`` holds the cache (``None`` before the
    first call and after :meth:`release`); ``extract_calls`` counts extracting forwards.
    """

    def __init__(self, *args, kv_ref_tokens: torch.Tensor, kv_ref_ids: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        if self.token_bucket:
            raise NotImplementedError("token_bucket with KV-cached reference images: the KV attention processors "
                                      "take no attention mask, so the padding could not be masked out")
        if self.negative is not None:
            raise NotImplementedError("KV-cached reference images with true CFG (the KV pipeline has no CFG)")
        if kv_ref_tokens.dim() != 3 or tuple(kv_ref_ids.shape) != (kv_ref_tokens.shape[1], self.img_ids.shape[1]):
            raise ValueError(f"kv_ref_tokens must be [B, R, C] with kv_ref_ids [R, {self.img_ids.shape[1]}], got "
                             f"{tuple(kv_ref_tokens.shape)} and {tuple(kv_ref_ids.shape)}")
        self.kv_ref_tokens = kv_ref_tokens
        self.kv_ref_ids = kv_ref_ids
        self.kv_cache: Flux2KVCache | None = None
        self.extract_calls = 0
        self._views: dict = {}

    def _full_batch(self, cache: Flux2KVCache, b: int) -> Flux2KVCache:
        """A cache extracted by a one-sample call, viewed for the whole batch (its rows are equal)."""
        full = self.kv_ref_tokens.shape[0]
        if b == full:
            return cache
        for layer in cache.double_block_caches + cache.single_block_caches:
            layer.store(layer.k_ref[:1].expand(full, *layer.k_ref.shape[1:]),
                        layer.v_ref[:1].expand(full, *layer.v_ref.shape[1:]))
        return cache

    def _rows(self, sl: slice) -> Flux2KVCache:
        """The cache rows of the samples ``sl`` (the cache itself for the whole batch); views, memoised."""
        if sl == slice(None):
            return self.kv_cache
        key = (sl.start, sl.stop)
        if key not in self._views:
            view = Flux2KVCache(len(self.kv_cache.double_block_caches), len(self.kv_cache.single_block_caches))
            view.num_ref_tokens = self.kv_cache.num_ref_tokens
            for src, dst in zip(self.kv_cache.double_block_caches + self.kv_cache.single_block_caches,
                                view.double_block_caches + view.single_block_caches):
                dst.store(src.k_ref[sl], src.v_ref[sl])
            self._views[key] = view
        return self._views[key]

    def _forward(self, x, ids, sl, sigma, cond: bool):
        tr = self.transformer
        b = x.shape[0]
        # As the stock loop: timestep t = 1000 * sigma in the latent dtype, passed as t / 1000.
        t = torch.full((b,), sigma * 1000.0, device=x.device, dtype=torch.float32).to(x.dtype)
        common = dict(timestep=t / 1000, guidance=None, encoder_hidden_states=self.prompt_embeds[sl],
                      txt_ids=self.text_ids, joint_attention_kwargs=dict(self.joint_attention_kwargs),
                      return_dict=False)
        if self.kv_cache is None:
            refs = self.kv_ref_tokens[sl].to(x.dtype)
            out, cache = tr(hidden_states=torch.cat([refs, x], 1), img_ids=torch.cat([self.kv_ref_ids, ids], 0),
                            kv_cache_mode="extract", num_ref_tokens=refs.shape[1], **common)
            self.kv_cache = self._full_batch(cache, b)
            self.extract_calls += 1
        else:
            out = tr(hidden_states=x, img_ids=ids, kv_cache=self._rows(sl), kv_cache_mode="cached", **common)[0]
        self.calls += 1
        return out

    def release(self) -> None:
        """Drop the cached reference K/V (as stock clears its cache after the loop)."""
        if self.kv_cache is not None:
            self.kv_cache.clear()
        self.kv_cache = None
        self._views.clear()


class JiTFlux2KleinKVPipeline(Flux2JiTMixin, Flux2KleinKVPipeline):
    """``Flux2KleinKVPipeline`` with ``jit=`` (``None``, a preset name or a :class:`JiTConfig`).

    As :class:`~jit_sampler.JiTFlux2KleinPipeline` (the pipeline's own shifted schedule; an
    explicit ``num_inference_steps`` or ``sigmas`` overrides the config's step count), with
    one pass per step and the reference images' K/V extracted in the first call and reused
    by every later call (module docstring). ``pipe.last_jit_report`` holds the
    :class:`~jit_sampler.JiTReport` of the last JiT call.
    """

    _stock_class = Flux2KleinKVPipeline
    _stock_call = inspect.signature(Flux2KleinKVPipeline.__call__)

    @torch.no_grad()
    def _jit_call(self, cfg: JiTConfig, *, explicit_steps: bool, image, prompt, height, width, num_inference_steps,
                  sigmas, num_images_per_prompt, generator, latents, prompt_embeds, output_type, return_dict,
                  attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs, max_sequence_length,
                  text_encoder_out_layers, **newer):
        self._refuse_newer(newer)
        images = check_reference_images(self, image)
        if images is not None and cfg.token_bucket:
            raise NotImplementedError("JiTFlux2KleinKVPipeline: token_bucket with reference images is not supported "
                                      "(the KV attention processors take no attention mask); use token_bucket=0")
        t0 = time.perf_counter()
        self.check_inputs(prompt=prompt, height=height, width=width, prompt_embeds=prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        batch_size = self._batch_size(prompt, prompt_embeds)
        total = batch_size * num_images_per_prompt
        # Reference preprocessing (no model) first, so that the latent shape can be checked before any work.
        condition_images, height, width = prepare_reference_images(self, images, height, width)
        height, width = self._default_size(height, width)
        check_flux2_latents(self, latents, total, height, width)
        stages = self._steps_config(cfg, sigmas, explicit_steps, num_inference_steps)  # this run's stages
        self._check_context_parallel(stages, height, width, prompt_embeds)
        device = self._execution_device
        prompt_embeds, text_ids = self.encode_prompt(
            prompt=prompt, prompt_embeds=prompt_embeds, device=device, num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length, text_encoder_out_layers=text_encoder_out_layers)

        latents, latent_ids = self.prepare_latents(
            batch_size=total, num_latents_channels=self.transformer.config.in_channels // 4, height=height,
            width=width, dtype=prompt_embeds.dtype, device=device, generator=generator, latents=latents)
        ref_tokens = ref_ids = None
        if condition_images is not None:
            ref_tokens, ref_ids = self.prepare_image_latents(images=condition_images, batch_size=total,
                                                             generator=generator, device=device, dtype=self.vae.dtype)
        t_encoded = time.perf_counter()
        grid_h, grid_w = self._token_grid(height, width)

        cfg, sig = self._schedule(cfg, sigmas, explicit_steps, num_inference_steps, latents.shape[1], device,
                                  beta=False)
        timesteps, set_timestep = self._timesteps(sig, device)

        args = (self.transformer, prompt_embeds, None, text_ids[0], latent_ids[0])
        kwargs = dict(guidance=None, joint_attention_kwargs=attention_kwargs or {}, pre_call=set_timestep,
                      backend=cfg.backend, token_bucket=cfg.token_bucket)
        if ref_tokens is None:
            velocity = FluxVelocity(*args, **kwargs)
        else:
            velocity = KVReferenceVelocity(*args, kv_ref_tokens=ref_tokens, kv_ref_ids=ref_ids[0], **kwargs)

        try:
            latents, report = self._denoise(velocity, latents, grid_h, grid_w, sig, cfg, generator, timesteps,
                                            callback_on_step_end, callback_on_step_end_tensor_inputs)
        finally:
            extracted = ref_tokens is not None and velocity.extract_calls > 0
            if ref_tokens is not None:
                velocity.release()
        t_sampled = time.perf_counter()

        image = decode_flux2(self, latents, latent_ids, grid_h, grid_w, output_type)
        num_ref = ref_tokens.shape[1] if extracted else 0
        per_step = [num_ref if i == 0 else 0 for i in range(len(report.active_tokens))]
        return self._finish_call(report, image, (t0, t_encoded, t_sampled), grid_h * grid_w, prompt_embeds.shape[1],
                                 calls_per_step=1, return_dict=return_dict, output_class=Flux2PipelineOutput,
                                 ref_tokens=per_step)
