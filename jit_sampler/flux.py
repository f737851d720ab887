"""JiT for diffusers' FLUX.1: ``JiTFluxPipeline``, ``enable_jit`` and the transformer velocity callable.

``JiTFluxPipeline(...)(..., jit=None)`` is exactly ``FluxPipeline.__call__``. With ``jit`` (a
preset name or a :class:`~jit_sampler.JiTConfig`) the denoising loop is
:func:`jit_sampler.core.jit_sample`, built from FluxPipeline's public pieces
(``check_inputs``, ``encode_prompt``, ``prepare_latents``, ``_unpack_latents``, the VAE
and image processor), with the transformer run on the active tokens and their own
``img_ids`` rows.
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

import jit_kernels as jk

try:  # diffusers >= 0.36: the device a (possibly offloaded) module runs on
    from diffusers.utils.torch_utils import get_module_execution_device as _execution_device
except ImportError:  # pragma: no cover - older diffusers
    def _execution_device(module):
        return module.device

from .config import JiTConfig, is_int_at_least
from .core import jit_sample
from .report import flop_summary
from .schedule import beta_sigmas

__all__ = ["FluxVelocity", "JiTFluxPipeline", "enable_jit"]

_FLUX_CALL = inspect.signature(FluxPipeline.__call__)
_UNSET = object()


class FluxVelocity:
    """``velocity_fn`` for :func:`~jit_sampler.jit_sample` around a ``FluxTransformer2DModel``.

    Args:
        transformer: the model (any ``FluxTransformer2DModel``-compatible module).
        prompt_embeds: ``[B, T, D_txt]``; pooled_prompt_embeds: ``[B, P]`` (``None`` for FLUX.2,
            which has no pooled text input); text_ids: ``[T, 3]`` (FLUX.2: ``[..., 4]``).
        img_ids: ``[N, 3]`` position ids of all image tokens (row-major grid; FLUX.2: ``[N, 4]``).
        guidance: ``[B]`` embedded guidance or ``None``.
        negative: ``(neg_prompt_embeds, neg_pooled, neg_text_ids)`` for true CFG, or ``None``.
        true_cfg_scale: ``v = v_neg + s * (v_cond - v_neg)`` when ``negative`` is given.
        joint_attention_kwargs: passed to the transformer (e.g. ``{"scale": lora_scale}``).
        image_embeds / negative_image_embeds: IP-adapter embeddings per branch (lists of ``[B, ...]``).
        pre_call: called as ``pre_call(step, sigma)`` before each evaluation (the pipeline
            sets its ``current_timestep`` there).

    Called as ``(x [B, M, C], active_idx [M] | [B, M], sigma, step) -> v [B, M, C]`` in
    ``x.dtype``. Cond and uncond share the anchor set by construction. A per-sample set
    (``[B, M]``) runs one forward per sample, because diffusers shares ``img_ids`` across
    the batch. ``calls`` counts transformer forwards.

    Cache hooks (``transformer.enable_cache(...)``: First-Block Cache, TaylorSeer, ...) keep
    per-token state from earlier steps. When the number of active tokens changes (a JiT stage
    transition) that state belongs to another token set, so the hooks are reset
    (``_reset_stateful_cache``) and the first step of every stage runs in full; ``cache_resets``
    counts those resets.
    """

    def __init__(self, transformer, prompt_embeds, pooled_prompt_embeds, text_ids, img_ids, *, guidance=None,
                 negative=None, true_cfg_scale: float = 1.0, joint_attention_kwargs: dict | None = None,
                 image_embeds=None, negative_image_embeds=None, pre_call=None, backend: str = "auto",
                 token_bucket: int = 0):
        if not is_int_at_least(token_bucket, 0):
            raise ValueError(f"token_bucket must be an int >= 0 (0 = off), got {token_bucket!r}")
        if token_bucket and "attention_mask" in (joint_attention_kwargs or {}):
            raise ValueError("token_bucket pads with its own attention mask; it cannot be combined with a "
                             "user attention_mask in joint_attention_kwargs")
        self.transformer = transformer
        self.prompt_embeds = prompt_embeds
        self.pooled_prompt_embeds = pooled_prompt_embeds
        self.text_ids = text_ids
        self.img_ids = img_ids
        self.guidance = guidance
        self.negative = negative
        self.true_cfg_scale = float(true_cfg_scale)
        self.joint_attention_kwargs = dict(joint_attention_kwargs or {})
        self.image_embeds = image_embeds
        self.negative_image_embeds = negative_image_embeds
        self.pre_call = pre_call
        self.backend = backend
        self.token_bucket = token_bucket
        self.calls = 0
        self.cache_resets = 0
        self._ids_key = None
        self._ids = None
        self._last_tokens = None

    def _reset_cache_hooks(self) -> None:
        tr = self.transformer
        if not hasattr(tr, "_reset_stateful_cache"):
            return
        # enable_cache registers hooks on submodules; disable_cache leaves empty registries.
        if any(getattr(getattr(m, "_diffusers_hook", None), "_hook_order", None) for m in tr.modules()):
            tr._reset_stateful_cache()
            self.cache_resets += 1

    def _ids_for(self, active_idx: torch.Tensor):
        """``img_ids`` rows of the active tokens: ``[M, 3]`` or a list of ``B`` of them; cached per stage."""
        if self._ids_key is not active_idx:
            def rows(idx):
                if self.img_ids.is_floating_point():
                    return jk.gather_tokens(self.img_ids.unsqueeze(0), idx, backend=self.backend)[0]
                return self.img_ids.index_select(0, idx)  # FLUX.2's integer ids

            self._ids = rows(active_idx) if active_idx.dim() == 1 else [rows(r) for r in active_idx]
            self._ids_key = active_idx  # the loop keeps one tensor object per stage
        return self._ids

    def _forward(self, x, ids, sl, sigma, cond: bool):
        tr = self.transformer
        b, m = x.shape[0], x.shape[1]
        # As FluxPipeline: timestep t = 1000 * sigma in the latent dtype, passed as t / 1000.
        t = torch.full((b,), sigma * 1000.0, device=x.device, dtype=torch.float32).to(x.dtype)
        kwargs = dict(self.joint_attention_kwargs)
        pad = (-m) % self.token_bucket if self.token_bucket else 0
        if pad:
            # Pad to the bucket: zero tokens at a copy of the first position, masked out as keys.
            x = torch.cat([x, x.new_zeros(b, pad, x.shape[2])], 1)
            ids = torch.cat([ids, ids[:1].expand(pad, -1)], 0)
            text = (self.prompt_embeds if cond else self.negative[0]).shape[1]
            keep = torch.ones(b, 1, 1, text + m + pad, dtype=torch.bool, device=x.device)
            keep[..., text + m:] = False
            kwargs["attention_mask"] = keep
        emb = self.image_embeds if cond else self.negative_image_embeds
        if emb is not None:
            kwargs["ip_adapter_image_embeds"] = [e[sl] for e in emb]
        if cond:
            pe, pooled, tids = self.prompt_embeds, self.pooled_prompt_embeds, self.text_ids
        else:
            pe, pooled, tids = self.negative
        ctx = tr.cache_context("cond" if cond else "uncond") if hasattr(tr, "cache_context") else _nullctx()
        extra = {} if pooled is None else {"pooled_projections": pooled[sl]}  # FLUX.2 has no pooled text
        with ctx:
            out = tr(hidden_states=x, timestep=t / 1000, guidance=None if self.guidance is None else self.guidance[sl],
                     encoder_hidden_states=pe[sl], txt_ids=tids, img_ids=ids, joint_attention_kwargs=kwargs,
                     return_dict=False, **extra)[0]
        self.calls += 1
        return out[:, :m] if pad else out

    def _guided(self, x, ids, sl, sigma):
        v = self._forward(x, ids, sl, sigma, True)
        if self.negative is not None:
            v_neg = self._forward(x, ids, sl, sigma, False)
            v = v_neg + self.true_cfg_scale * (v - v_neg)
        return v

    def __call__(self, x: torch.Tensor, active_idx: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        if self.pre_call is not None:
            self.pre_call(step, sigma)
        tokens = active_idx.shape[-1]
        if self._last_tokens is not None and tokens != self._last_tokens:
            self._reset_cache_hooks()
        self._last_tokens = tokens
        dtype = self.transformer.dtype
        xin = x.to(dtype)
        if active_idx.shape[-1] == self.img_ids.shape[0]:
            # Dense stage: every token, in grid order (active sets are kept sorted).
            return self._guided(xin, self.img_ids, slice(None), sigma).to(x.dtype)
        ids = self._ids_for(active_idx)
        if active_idx.dim() == 1:
            return self._guided(xin, ids, slice(None), sigma).to(x.dtype)
        outs = [self._guided(xin[b:b + 1], ids[b], slice(b, b + 1), sigma) for b in range(x.shape[0])]
        return torch.cat(outs).to(x.dtype)


def _per_image(t: torch.Tensor, total: int) -> torch.Tensor:
    """``[B, ...] -> [total, ...]`` by repeating each prompt's row ``total / B`` times (no-op when equal)."""
    if t.shape[0] == total or total % t.shape[0]:
        return t
    return t.repeat_interleave(total // t.shape[0], dim=0)


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _JiTPipelineMixin:
    """What every JiT pipeline shares around :func:`jit_sample`: the ``jit=`` dispatch, the batch
    size, the step override and the denoising call with diffusers' callbacks. Subclasses set
    ``_stock_call`` (the stock ``__call__`` signature) and implement ``_jit_call``."""

    _default_jit = None
    last_jit_report = None
    _stock_call: inspect.Signature

    def _dispatch(self, stock_call, args, kwargs, jit):
        if jit is _UNSET:
            jit = self._default_jit
        cfg = JiTConfig.coerce(jit)
        if cfg is None:
            self.last_jit_report = None
            return stock_call(*args, **kwargs)
        bound = self._stock_call.bind(self, *args, **kwargs)
        explicit = set(bound.arguments)
        bound.apply_defaults()
        a = dict(bound.arguments)
        a.pop("self")
        return self._jit_call(cfg, explicit_steps="num_inference_steps" in explicit, **a)

    def _refuse_newer(self, newer: dict) -> None:
        """Arguments a later diffusers adds to the stock ``__call__`` are refused unless left at their default."""
        unsupported = sorted(k for k, v in newer.items() if v is not self._stock_call.parameters[k].default)
        if unsupported:
            raise NotImplementedError(f"{type(self).__name__}: {unsupported} not supported with jit=...; use jit=None")

    @staticmethod
    def _batch_size(prompt, prompt_embeds) -> int:
        if prompt is not None and isinstance(prompt, str):
            return 1
        if prompt is not None and isinstance(prompt, list):
            return len(prompt)
        return prompt_embeds.shape[0]

    @staticmethod
    def _steps_config(cfg: JiTConfig, sigmas, explicit_steps: bool, num_inference_steps) -> JiTConfig:
        """The config's steps, unless the caller chose ``sigmas`` or ``num_inference_steps`` explicitly."""
        if sigmas is not None:
            return cfg.replace(total_steps=len(sigmas))
        if explicit_steps and num_inference_steps != cfg.total_steps:
            return cfg.replace(total_steps=int(num_inference_steps))
        return cfg

    def _denoise(self, velocity: FluxVelocity, latents, grid_h: int, grid_w: int, sig, cfg: JiTConfig, generator,
                 timesteps, callback_on_step_end, callback_on_step_end_tensor_inputs):
        """:func:`jit_sample` under the pipeline's progress bar, ``interrupt`` and ``callback_on_step_end``
        (which may replace ``latents`` and ``prompt_embeds``)."""
        with self.progress_bar(total=cfg.total_steps) as progress_bar:
            def on_step(i: int, sigma: float, y: torch.Tensor):
                new_latents = None
                if callback_on_step_end is not None:
                    avail = {"latents": y, "prompt_embeds": velocity.prompt_embeds}
                    callback_kwargs = {k: avail[k] for k in callback_on_step_end_tensor_inputs}
                    outputs = callback_on_step_end(self, i, timesteps[i], callback_kwargs) or {}
                    new_latents = outputs.pop("latents", None)
                    if "prompt_embeds" in outputs:
                        velocity.prompt_embeds = outputs.pop("prompt_embeds")
                progress_bar.update()
                return new_latents

            return jit_sample(velocity, latents, grid_h, grid_w, sig, cfg, generator,
                              step_callback=on_step, interrupt=lambda: self.interrupt)


class JiTFluxPipeline(_JiTPipelineMixin, FluxPipeline):
    """``FluxPipeline`` with a ``jit=`` argument (``None``, a preset name or a :class:`JiTConfig`).

    ``jit=None`` calls ``FluxPipeline.__call__`` unchanged. Otherwise every FluxPipeline
    argument keeps its meaning, except: the steps and sigmas come from the config
    (``config.total_steps``, Beta schedule) unless ``num_inference_steps`` or ``sigmas``
    is passed explicitly (an explicit value overrides the config's steps; ``sigmas`` or
    ``sigma_schedule="pipeline"`` use the scheduler's own, resolution-shifted schedule).
    After a JiT call ``pipe.last_jit_report`` holds a :class:`~jit_sampler.JiTReport`
    (FLOPs are per sample). ``anchor_attention=True`` runs the call (JiT or dense) with the
    fused rotary + attention processor of :mod:`jit_sampler.attention` and restores the
    previous processors afterwards (the processor fuses on CPU tensors; on CUDA it keeps the
    stock math unless installed with ``devices=("cpu", "cuda")``, see its docstring).
    """

    _stock_call = _FLUX_CALL

    def __call__(self, *args, jit=_UNSET, anchor_attention: bool = False, **kwargs):
        # anchor_attention=True: the transformer's stock FLUX attention processors are swapped
        # for jit_sampler.attention.AnchorAttnProcessor (fused rotary + attention) for this call only.
        if anchor_attention:
            from .attention import use_anchor_attention

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
        prompt_embeds, pooled_prompt_embeds = _per_image(prompt_embeds, total), _per_image(pooled_prompt_embeds, total)
        if negative is not None:
            negative = (_per_image(negative[0], total), _per_image(negative[1], total), negative[2])
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
            sig = self._pipeline_sigmas(steps, sigmas, latents.shape[1], device)
        self._num_timesteps = steps

        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32).expand(latents.shape[0])

        image_embeds, negative_image_embeds = self._ip_adapter_embeds(
            ip_adapter_image, ip_adapter_image_embeds, negative_ip_adapter_image, negative_ip_adapter_image_embeds,
            width, height, device, batch_size * num_images_per_prompt)
        if self._joint_attention_kwargs is None:
            self._joint_attention_kwargs = {}

        # Timesteps (1000 * sigma) for current_timestep and callbacks: one transfer, not one per step.
        timesteps = torch.tensor([1000.0 * s for s in sig[:-1]], device=device)

        def set_timestep(step: int, sigma: float):
            self._current_timestep = timesteps[step]

        velocity = FluxVelocity(self.transformer, prompt_embeds, pooled_prompt_embeds, text_ids, latent_image_ids,
                                guidance=guidance, negative=negative, true_cfg_scale=true_cfg_scale,
                                joint_attention_kwargs=self._joint_attention_kwargs, image_embeds=image_embeds,
                                negative_image_embeds=negative_image_embeds if do_true_cfg else None,
                                pre_call=set_timestep, backend=cfg.backend,
                                token_bucket=cfg.token_bucket)

        latents, report = self._denoise(velocity, latents, grid_h, grid_w, sig, cfg, generator, timesteps,
                                        callback_on_step_end, callback_on_step_end_tensor_inputs)
        self._current_timestep = None
        t_sampled = time.perf_counter()

        if output_type == "latent":
            image = latents
        else:
            latents = self._unpack_latents(latents, height, width, self.vae_scale_factor)
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            image = self.vae.decode(latents.to(_execution_device(self.vae)), return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        t_end = time.perf_counter()

        report.phase_times = {"encode": t_encoded - t0, "sample": t_sampled - t_encoded, "decode": t_end - t_sampled,
                              "total": t_end - t0}
        try:
            report.flops = flop_summary(self.transformer.config, report.active_tokens, grid_h * grid_w,
                                        text_tokens=int(prompt_embeds.shape[1]),
                                        calls_per_step=2 if do_true_cfg else 1)
        except (TypeError, KeyError, AttributeError):  # a transformer without FLUX's config keys
            report.flops = {}
        self.last_jit_report = report

        if not return_dict:
            return (image,)
        return FluxPipelineOutput(images=image)

    def _pipeline_sigmas(self, steps: int, sigmas, image_seq_len: int, device) -> list[float]:
        """The scheduler's own (resolution-shifted) schedule, as FluxPipeline sets it: ``steps + 1`` floats."""
        s = np.linspace(1.0, 1 / steps, steps) if sigmas is None else sigmas
        if getattr(self.scheduler.config, "use_flow_sigmas", False):
            s = None
        mu = calculate_shift(image_seq_len, self.scheduler.config.get("base_image_seq_len", 256),
                             self.scheduler.config.get("max_image_seq_len", 4096),
                             self.scheduler.config.get("base_shift", 0.5), self.scheduler.config.get("max_shift", 1.15))
        retrieve_timesteps(self.scheduler, steps, device, sigmas=s, mu=mu)
        out = [float(v) for v in self.scheduler.sigmas.cpu().tolist()]
        if len(out) == steps:  # schedulers that do not append the terminal sigma
            out.append(0.0)
        return out[: steps + 1]

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


def enable_jit(pipe, jit: Any = "4x"):
    """A JiT pipeline sharing ``pipe``'s components whose calls default to ``jit``.

    ``pipe`` is a ``FluxPipeline`` (-> :class:`JiTFluxPipeline`) or a ``Flux2KleinPipeline``
    (-> :class:`~jit_sampler.JiTFlux2KleinPipeline`). ``enable_jit(pipe, "4x")(prompt)`` runs
    the 4x preset; ``(..., jit=None)`` still runs the stock pipeline. ``pipe`` itself is not
    changed (unless it already is a JiT pipeline, whose default is then updated and which is
    returned).
    """
    cfg = JiTConfig.coerce(jit)
    from diffusers import Flux2KleinPipeline

    if isinstance(pipe, Flux2KleinPipeline):
        from .flux2 import JiTFlux2KleinPipeline

        cls = JiTFlux2KleinPipeline
    elif isinstance(pipe, FluxPipeline):
        cls = JiTFluxPipeline
    else:
        raise TypeError(f"enable_jit needs a FluxPipeline or Flux2KleinPipeline, got {type(pipe).__name__}")
    out = pipe if isinstance(pipe, cls) else cls.from_pipe(pipe)
    out._default_jit = cfg
    return out
