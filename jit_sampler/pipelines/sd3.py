"""JiT and RAS for diffusers' Stable Diffusion 3 / 3.5: ``JiTStableDiffusion3Pipeline`` and ``SD3Velocity``.

``JiTStableDiffusion3Pipeline(...)(..., jit=None, ras=None)`` is exactly
``StableDiffusion3Pipeline.__call__``. With ``jit=`` (a preset or a :class:`~jit_sampler.JiTConfig`)
the denoising loop is :func:`jit_sampler.jit_sample`; with ``ras=`` (a
:class:`~jit_sampler.ras.RASConfig`) it is :func:`jit_sampler.ras.ras_sample`, with RAS's
per-layer key/value cache (:mod:`.ras_attention`).

What differs from FLUX (docs/method.md section 1, "SD3"):

- The latent stays ``[B, C, H, W]`` in the stock pipeline and the transformer patchifies it
  itself (``pos_embed``: a ``p x p`` strided convolution plus a fixed 2-D sin-cos position
  embedding cropped to the grid). The samplers work on the packed ``[B, N, C * p * p]`` tokens
  (FLUX's channel-major packing, :func:`pack_latents`). On a sparse step :class:`SD3Velocity`
  unpacks the active tokens into a full latent (zeros elsewhere), patch-embeds it in full and
  keeps the active rows, each with its own position embedding (the active tokens are gathered
  *after* the patch embedding), runs the blocks, the final norm and ``proj_out`` on those rows
  and reorders each row's outputs from the stock unpatchify's ``(p, q, c)`` to the packed
  ``(c, p, q)`` (:func:`_subset_forward`: the stock forward's steps, minus ControlNet residuals,
  skipped layers and IP-adapter inputs, which are refused). A dense step calls the stock
  forward. Nothing is attached to the transformer, so calls on one transformer may run
  concurrently.
- CFG is SD3's: uncond and cond in one batch of ``2B`` (negative first), combined as
  ``u + g * (c - u)``. Skip-layer guidance (``skip_guidance_layers``) and IP-adapter inputs are
  refused under ``jit`` / ``ras`` (``NotImplementedError``; ``jit=None`` runs them).
- The schedule is the pipeline's own (``FlowMatchEulerDiscreteScheduler``, static shift 3.0 for
  SD3 / 3.5) under ``ras``; under ``jit`` the config's ``sigma_schedule`` decides, as for FLUX.
"""

from __future__ import annotations

import contextlib
import inspect
import time

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

import jit_kernels as jk

from ..config import JiTConfig
from ..ras import RASConfig, ras_sample
from ..report import flop_summary
from ..schedule import beta_sigmas
from .base import UNSET, JiTPipelineMixin
from .checks import check_latents_shape
from .ras_attention import use_ras_attention

__all__ = ["JiTStableDiffusion3Pipeline", "SD3Velocity", "pack_latents", "unpack_latents", "sd3_flop_config"]


def pack_latents(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, (H/p)(W/p), C * p * p]``: row-major tokens, channel-major within a token."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpack_latents(tokens: torch.Tensor, grid_h: int, grid_w: int, patch: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents`."""
    b, _, cp = tokens.shape
    c = cp // (patch * patch)
    x = tokens.view(b, grid_h, grid_w, c, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, grid_h * patch, grid_w * patch)


def sd3_flop_config(config) -> dict:
    """An ``SD3Transformer2DModel`` config in the keys of :func:`jit_sampler.report.flux_transformer_flops`.

    Every SD3 block is a dual-stream MMDiT block with FLUX.1 double-block sizes (q, k, v, out and
    a GELU MLP ``D -> 4D -> D`` per stream, ``D -> 6D`` adaLN per stream), so it is FLUX's count
    with ``num_layers`` double blocks and no single blocks; the patch embedding is a linear map of
    ``C * p * p`` inputs per token. Not counted: SD3.5 Medium's second (image-only) attention
    in its ``dual_attention_layers`` and the text stream's missing output projection in the last
    block (SD3.5 Large has neither the one nor a large share of the other).
    """
    get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    p = get("patch_size", 2)
    c_in = get("in_channels")
    return dict(patch_size=1, in_channels=c_in * p * p, out_channels=(get("out_channels") or c_in) * p * p,
                num_layers=get("num_layers"), num_single_layers=0, attention_head_dim=get("attention_head_dim"),
                num_attention_heads=get("num_attention_heads"), joint_attention_dim=get("joint_attention_dim"),
                pooled_projection_dim=get("pooled_projection_dim"), guidance_embeds=False)


try:  # diffusers >= 0.36: the LoRA scale of joint_attention_kwargs, as the stock forward applies it
    from diffusers.utils import apply_lora_scale
except ImportError:  # pragma: no cover - older diffusers
    def apply_lora_scale(name):
        return lambda fn: fn


@apply_lora_scale("joint_attention_kwargs")
def _subset_forward(tr, latent, idx, timestep, prompt_embeds, pooled, joint_attention_kwargs=None, backend="auto"):
    """``SD3Transformer2DModel.forward`` on the tokens ``idx [B, M]`` only: the full latent is patch-embedded
    (with its position embedding), then only the rows ``idx`` go through the blocks. Returns the packed
    velocity of those rows ``[B, M, C * p * p]`` (channel-major, as :func:`pack_latents`)."""
    h = jk.gather_tokens(tr.pos_embed(latent).contiguous(), idx, backend=backend, validate=False)  # idx: the sampler's
    temb = tr.time_text_embed(timestep, pooled)
    enc = tr.context_embedder(prompt_embeds)
    for block in tr.transformer_blocks:
        enc, h = block(hidden_states=h, encoder_hidden_states=enc, temb=temb,
                       joint_attention_kwargs=joint_attention_kwargs)
    h = tr.proj_out(tr.norm_out(h, temb))
    b, m = h.shape[0], h.shape[1]
    p = tr.config.patch_size
    # the stock unpatchify reads a token's outputs as (p, q, c); packed tokens are (c, p, q)
    return h.view(b, m, p, p, tr.out_channels).permute(0, 1, 4, 2, 3).reshape(b, m, tr.out_channels * p * p)


class SD3Velocity:
    """``velocity_fn`` of :func:`~jit_sampler.jit_sample` / :func:`~jit_sampler.ras.ras_sample` for SD3 transformers.

    Args:
        transformer: the model.
        prompt_embeds / pooled_prompt_embeds: ``[B', T, D]`` / ``[B', P]``; with CFG ``B' = 2B``,
            negative first (as the stock pipeline concatenates them).
        grid: ``(H_tok, W_tok)``; guidance_scale: CFG weight (``do_cfg``: whether to apply it).
        joint_attention_kwargs: passed to the transformer.
        pre_call: ``pre_call(step, sigma)`` before each evaluation.

    Called as ``(x [B, M, C * p * p], active_idx [M] | [B, M], sigma, step, kv=None)``; the
    timestep is ``1000 * sigma`` computed in float32 as the scheduler does. ``kv``: a
    :class:`~jit_sampler.ras.RASKVCache` handed to the attention processors as ``ras_kv``.
    ``calls`` counts transformer forwards.
    """

    def __init__(self, transformer, prompt_embeds, pooled_prompt_embeds, grid, *, guidance_scale: float = 1.0,
                 do_cfg: bool = False, joint_attention_kwargs=None, pre_call=None, backend: str = "auto"):
        self.transformer = transformer
        self.prompt_embeds = prompt_embeds
        self.pooled_prompt_embeds = pooled_prompt_embeds
        self.grid_h, self.grid_w = grid
        self.guidance_scale = guidance_scale
        self.do_cfg = do_cfg
        self.joint_attention_kwargs = dict(joint_attention_kwargs or {})
        self.pre_call = pre_call
        self.backend = backend
        self.patch = transformer.config.patch_size
        self.calls = 0

    def __call__(self, x: torch.Tensor, active_idx: torch.Tensor, sigma: float, step: int, kv=None) -> torch.Tensor:
        if self.pre_call is not None:
            self.pre_call(step, sigma)
        tr = self.transformer
        b, m = x.shape[0], x.shape[1]
        n = self.grid_h * self.grid_w
        dense = m == n
        dtype = tr.dtype
        full = x if dense else jk.scatter_tokens(x.new_zeros(b, n, x.shape[2]), active_idx, x, backend=self.backend,
                                                   validate=False)
        latent = unpack_latents(full.to(dtype), self.grid_h, self.grid_w, self.patch)
        reps = 2 if self.do_cfg else 1
        inp = torch.cat([latent] * reps) if reps > 1 else latent
        t = (torch.tensor(float(sigma), dtype=torch.float32) * 1000).to(x.device).expand(inp.shape[0])
        idx = None
        if not dense:
            idx = active_idx if active_idx.dim() == 2 else active_idx.unsqueeze(0).expand(b, -1)
            idx = torch.cat([idx] * reps).contiguous() if reps > 1 else idx.contiguous()
        kwargs = dict(self.joint_attention_kwargs)
        if kv is not None:
            kv.select_rows(slice(None), inp.shape[0], "joint", idx)
            kwargs["ras_kv"] = kv
        if dense:
            out = tr(hidden_states=inp, timestep=t, encoder_hidden_states=self.prompt_embeds,
                     pooled_projections=self.pooled_prompt_embeds, joint_attention_kwargs=kwargs or None,
                     return_dict=False)[0]
            out = pack_latents(out, self.patch)
        else:
            out = _subset_forward(tr, inp, idx, t, self.prompt_embeds, self.pooled_prompt_embeds,
                                  joint_attention_kwargs=kwargs or None, backend=self.backend)
        self.calls += 1
        if self.do_cfg:
            uncond, cond = out.chunk(2)
            out = uncond + self.guidance_scale * (cond - uncond)
        return out.to(x.dtype)


class JiTStableDiffusion3Pipeline(JiTPipelineMixin, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` with ``jit=`` (JiT) and ``ras=`` (RAS) arguments (module docstring).

    ``jit=None`` and ``ras=None`` call the stock ``__call__`` unchanged. With both set, RAS runs
    inside JiT's final dense stage (:class:`~jit_sampler.ras.RASFinalStage`: the ``ras`` config's
    selection settings, its schedule re-based on the stage; ``last_jit_report.active_tokens`` are
    then the tokens actually computed). Steps: the config's (``JiTConfig.total_steps`` / ``RASConfig.num_steps``) unless
    ``num_inference_steps`` or ``sigmas`` is passed explicitly. After a call
    ``pipe.last_jit_report`` holds the :class:`~jit_sampler.JiTReport` (a
    :class:`~jit_sampler.ras.RASReport` under ``ras``), FLOPs per sample.
    """

    _stock_class = StableDiffusion3Pipeline
    _stock_call = inspect.signature(StableDiffusion3Pipeline.__call__)
    _default_ras = None
    _stage_ras = None  # set for the duration of a jit= + ras= call

    def __call__(self, *args, jit=UNSET, ras=UNSET, **kwargs):
        ras = self._default_ras if ras is UNSET else RASConfig.coerce(ras)
        if ras is None:
            return self._dispatch(super().__call__, args, kwargs, jit)
        if jit is not UNSET and jit is not None:  # RAS inside JiT's final dense stage
            self._stage_ras = ras
            try:
                return self._dispatch(super().__call__, args, kwargs, jit)
            finally:
                self._stage_ras = None
        a, explicit_steps = self._bound_arguments(args, kwargs, "ras")
        ras = ras.with_call_steps(a["sigmas"], a["num_inference_steps"] if explicit_steps else None)
        return self._sample(ras, **a)

    def _jit_call(self, cfg: JiTConfig, *, explicit_steps: bool, **a):
        cfg = self._steps_config(cfg, a["sigmas"], explicit_steps, a["num_inference_steps"])
        return self._sample(cfg, **a)

    def _shift_mu(self, image_seq_len: int, steps: int):
        c = self.scheduler.config
        if not c.get("use_dynamic_shifting", None):
            return None
        return calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.16))

    def _scheduler_sigmas(self, steps: int, sigmas, image_seq_len: int, device, mu=None) -> list[float]:
        """The stock pipeline's schedule: ``retrieve_timesteps`` with its ``mu``; ``steps + 1`` floats."""
        mu = self._shift_mu(image_seq_len, steps) if mu is None else mu
        kw = {} if mu is None else {"mu": mu}
        retrieve_timesteps(self.scheduler, None if sigmas is not None else steps, device, sigmas=sigmas, **kw)
        out = [float(v) for v in self.scheduler.sigmas.cpu().tolist()]
        if len(out) == steps:
            out.append(0.0)
        return out[: steps + 1]

    @torch.no_grad()
    def _sample(self, cfg, *, prompt, prompt_2, prompt_3, height, width, num_inference_steps, sigmas, guidance_scale,
                negative_prompt, negative_prompt_2, negative_prompt_3, num_images_per_prompt, generator, latents,
                prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds,
                ip_adapter_image, ip_adapter_image_embeds, output_type, return_dict, joint_attention_kwargs, clip_skip,
                callback_on_step_end, callback_on_step_end_tensor_inputs, max_sequence_length, skip_guidance_layers,
                skip_layer_guidance_scale, skip_layer_guidance_stop, skip_layer_guidance_start, mu, **newer):
        self._refuse_newer(newer)
        ras = isinstance(cfg, RASConfig)
        if skip_guidance_layers is not None:
            raise NotImplementedError("skip_guidance_layers is not supported with jit= / ras=; use jit=None")
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            raise NotImplementedError("IP-Adapter inputs are not supported with jit= / ras=; use jit=None")
        if not ras and cfg.token_bucket:
            raise NotImplementedError("JiTConfig.token_bucket (padding with an attention mask) is not supported on SD3")
        if ras and "ras_kv" in (joint_attention_kwargs or {}):
            raise ValueError("joint_attention_kwargs must not contain 'ras_kv' (the RAS call sets it)")
        t0 = time.perf_counter()
        height, width = self._default_size(height, width)
        self.check_inputs(prompt, prompt_2, prompt_3, height, width, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        patch = self.transformer.config.patch_size
        grid_h, grid_w = int(height) // (self.vae_scale_factor * patch), int(width) // (self.vae_scale_factor * patch)
        batch_size = self._batch_size(prompt, prompt_embeds)
        total = batch_size * num_images_per_prompt
        channels = self.transformer.config.in_channels
        check_latents_shape(latents, (total, channels, grid_h * patch, grid_w * patch), "a [B, C, H/8, W/8] latent")
        if ras:  # the drop counts of this grid, before any work
            from ..ras import skip_counts
            skip_counts(cfg, grid_h * grid_w, (grid_h, grid_w))
        self._guidance_scale = guidance_scale
        self._skip_layer_guidance_scale = skip_layer_guidance_scale
        self._clip_skip = clip_skip
        self._joint_attention_kwargs = joint_attention_kwargs
        self._interrupt = False
        self._current_timestep = None
        device = self._execution_device
        lora_scale = (joint_attention_kwargs or {}).get("scale", None)
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
            do_classifier_free_guidance=self.do_classifier_free_guidance, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, device=device, clip_skip=clip_skip,
            num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
            lora_scale=lora_scale)
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
            pooled_prompt_embeds = torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds], dim=0)
        t_encoded = time.perf_counter()
        latents = self.prepare_latents(total, channels, height, width, prompt_embeds.dtype, device, generator, latents)
        n = grid_h * grid_w
        steps = cfg.num_steps if ras else cfg.total_steps
        if ras or cfg.sigma_schedule == "pipeline" or sigmas is not None:
            sig = self._scheduler_sigmas(steps, sigmas, n, device, mu=mu)
        else:
            sig = beta_sigmas(steps, cfg.beta_alpha, cfg.beta_beta)
        self._num_timesteps = steps
        timesteps = torch.tensor(sig[:-1], dtype=torch.float32, device=device) * 1000

        def set_timestep(step, sigma):
            self._current_timestep = timesteps[step]

        velocity = SD3Velocity(self.transformer, prompt_embeds, pooled_prompt_embeds, (grid_h, grid_w),
                               guidance_scale=guidance_scale, do_cfg=self.do_classifier_free_guidance,
                               joint_attention_kwargs=joint_attention_kwargs, pre_call=set_timestep,
                               backend=cfg.backend)
        tokens = pack_latents(latents, patch)
        with self.progress_bar(total=steps) as progress_bar:
            def on_step(i, sigma, y):
                new = None
                if callback_on_step_end is not None:
                    avail = {"latents": unpack_latents(y, grid_h, grid_w, patch), "prompt_embeds": prompt_embeds,
                             "pooled_prompt_embeds": pooled_prompt_embeds}
                    outputs = callback_on_step_end(self, i, timesteps[i], {k: avail[k] for k in
                                                                            callback_on_step_end_tensor_inputs}) or {}
                    if "latents" in outputs:
                        new = pack_latents(outputs["latents"], patch)
                progress_bar.update()
                return new

            if ras:
                ctx = use_ras_attention(self.transformer) if cfg.kv_cache else contextlib.nullcontext()
                with ctx:
                    tokens, report = ras_sample(velocity, tokens, grid_h, grid_w, sig, cfg, step_callback=on_step,
                                                interrupt=lambda: self.interrupt)
            else:
                from ..sampler import jit_sample
                stage = None
                fn = velocity
                if self._stage_ras is not None:
                    from ..ras import RASFinalStage
                    stage = fn = RASFinalStage(velocity, self._stage_ras, cfg, sig, grid_h, grid_w)
                ctx = (use_ras_attention(self.transformer) if stage is not None and self._stage_ras.kv_cache
                       else contextlib.nullcontext())
                with ctx:
                    tokens, report = jit_sample(fn, tokens, grid_h, grid_w, sig, cfg, generator,
                                                step_callback=on_step, interrupt=lambda: self.interrupt)
                if stage is not None:
                    report.active_tokens = list(stage.active_tokens)
        self._current_timestep = None
        t_sampled = time.perf_counter()
        latents = unpack_latents(tokens, grid_h, grid_w, patch).to(prompt_embeds.dtype)
        if output_type == "latent":
            image = latents
        else:
            latents = (latents / self.vae.config.scaling_factor) + self.vae.config.shift_factor
            image = self.vae.decode(latents, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        self.maybe_free_model_hooks()
        report.phase_times = {"encode": t_encoded - t0, "sample": t_sampled - t_encoded,
                              "decode": time.perf_counter() - t_sampled, "total": time.perf_counter() - t0}
        report.flops = flop_summary(sd3_flop_config(self.transformer.config), report.active_tokens, n,
                                    text_tokens=int(prompt_embeds.shape[1]),
                                    calls_per_step=2 if self.do_classifier_free_guidance else 1)
        self.last_jit_report = report
        if not return_dict:
            return (image,)
        return StableDiffusion3PipelineOutput(images=image)
