"""JiT for diffusers' Qwen-Image text-to-image: ``JiTQwenImagePipeline`` and ``QwenImageVelocity``.

``JiTQwenImagePipeline(...)(..., jit=None)`` is exactly ``QwenImagePipeline.__call__``. With
``jit`` (a preset name or a :class:`~jit_sampler.JiTConfig`) the denoising loop is
:func:`jit_sampler.jit_sample`, built from QwenImagePipeline's public pieces (``check_inputs``,
``encode_prompt``, ``prepare_latents``, ``_unpack_latents``, the VAE and image processor).

What differs from FLUX (docs/method.md section 1) is how positions reach the model:

- Qwen-Image has no ``img_ids``. ``QwenImageTransformer2DModel.forward`` turns ``img_shapes``
  (``(frames, grid_h, grid_w)``) into rotary tables through ``transformer.pos_embed``
  (``QwenEmbedRope``), which returns ``(image_freqs [N, D/2], text_freqs [T, D/2])`` for the
  *whole* grid: image token ``n`` at ``(n // W, n % W)`` gets row ``n`` (centred positions,
  ``scale_rope=True``), and the text rows start after the grid's largest centred index, so
  they too depend on the full grid size. The forward accepts no precomputed tables.
- :class:`QwenImageVelocity` therefore passes the full grid's ``img_shapes`` (text positions
  stay exactly those of the stock call) and, for the duration of one forward, puts a forward
  hook on ``transformer.pos_embed`` that replaces the image table by its rows for the active
  tokens, in the order of ``active_idx``. Nothing else in the model depends on the image
  token count or order: the text mask is widened by the attention processor to however many
  image tokens arrive, and every other layer is per token. The hook is removed after the
  call (also on error), so the transformer is never left altered.
- True CFG is Qwen-Image's: ``comb = v_neg + s * (v_cond - v_neg)``, then rescaled per token
  to the conditional prediction's norm over channels, ``comb * |v_cond| / |comb|``. Both
  are per-token operations, so they commute with running on a token subset.
- Text embeddings come with a padding mask (``prompt_embeds_mask``, ``[B, T]``), passed on as
  ``encoder_hidden_states_mask``; per-sample anchor sets slice it per sample.

The packed latent is the same row-major 2 x 2 patch grid as FLUX's (``_pack_latents``), so
the sampler core needs nothing new. Schedule: as :class:`~jit_sampler.JiTFluxPipeline`, the
config's ``sigma_schedule`` decides (``"beta"``, the presets' default; ``"pipeline"`` or an
explicit ``sigmas=`` use Qwen-Image's own dynamically shifted scheduler).

Not supported under JiT (``NotImplementedError`` before any work; ``jit=None`` still runs
them): transformers with ``zero_cond_t`` (their modulation index is built from the full
image size), ``use_layer3d_rope`` or ``use_additional_t_cond`` (neither is used by
``QwenImagePipeline``), ``guidance_embeds`` (diffusers 0.42's Qwen timestep embedder takes no
guidance input, so the stock call cannot run such a model either), and
``JiTConfig.token_bucket`` (Qwen's attention processor refuses the external attention mask
that padding would need). Context parallelism, which splits the rotary table across ranks, is
not supported: the velocity raises if ``pos_embed`` returns anything but the full grid.
"""

from __future__ import annotations

import contextlib
import inspect
import time

import torch
from diffusers import QwenImagePipeline
from diffusers.utils import logging
from diffusers.pipelines.qwenimage.pipeline_output import QwenImagePipelineOutput
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

from ..config import JiTConfig
from ..report import flop_summary
from .checks import check_latents_shape
from .base import UNSET, JiTPipelineMixin, execution_device, per_image

__all__ = ["JiTQwenImagePipeline", "QwenImageVelocity", "qwen_flop_config"]

logger = logging.get_logger(__name__)


def qwen_flop_config(config) -> dict:
    """A ``QwenImageTransformer2DModel`` config in the keys of :func:`jit_sampler.report.flux_transformer_flops`.

    Every Qwen-Image block is a dual-stream (MMDiT) block with the same layer sizes as a FLUX.1
    double block: q, k, v, out and a GELU MLP ``D -> 4D -> D`` per stream, ``D -> 6D`` adaLN
    modulation per stream. So it is FLUX's count with ``num_layers`` double blocks, no single
    blocks and no pooled text projection; ``in_channels`` is already the packed ``4 * z``
    width and ``proj_out`` maps to ``patch_size^2 * out_channels``. (The FLUX count adds one
    ``D^2`` for the pooled-text MLP that Qwen lacks: a per-call constant, not per token.)
    """
    get = config.get if hasattr(config, "get") else lambda k, d=None: getattr(config, k, d)
    return dict(
        patch_size=get("patch_size", 2), in_channels=get("in_channels"), out_channels=get("out_channels"),
        num_layers=get("num_layers"), num_single_layers=0, attention_head_dim=get("attention_head_dim"),
        num_attention_heads=get("num_attention_heads"), joint_attention_dim=get("joint_attention_dim"),
        pooled_projection_dim=0, guidance_embeds=bool(get("guidance_embeds", False)),
    )


class QwenImageVelocity:
    """``velocity_fn`` for :func:`~jit_sampler.jit_sample` around a ``QwenImageTransformer2DModel``.

    Args:
        transformer: the model.
        prompt_embeds: ``[B, T, D_txt]``; prompt_embeds_mask: ``[B, T]`` (1 = valid) or ``None``.
        grid: ``(grid_h, grid_w)``, the packed token grid (``N = grid_h * grid_w``).
        negative: ``(neg_prompt_embeds, neg_prompt_embeds_mask)`` for true CFG, or ``None``.
        true_cfg_scale: the CFG scale ``s`` (Qwen-Image's norm-rescaled CFG, module docstring).
        attention_kwargs: passed to the transformer (e.g. ``{"scale": lora_scale}``); copied per call.
        pre_call: called as ``pre_call(step, sigma)`` before each evaluation.

    Called as ``(x [B, M, C], active_idx [M] | [B, M], sigma, step) -> v [B, M, C]`` in
    ``x.dtype``. The transformer sees the ``M`` active tokens with the rows ``active_idx`` of
    the full grid's image rotary table (a forward hook on ``transformer.pos_embed`` during the
    call; none when ``active_idx`` is ``arange(N)``). A per-sample set (``[B, M]``) runs one
    forward per sample. ``calls`` counts transformer forwards; diffusers cache hooks are reset
    when the token count changes (``cache_resets``), as in :class:`~jit_sampler.FluxVelocity`.
    """

    def __init__(self, transformer, prompt_embeds, prompt_embeds_mask, grid: tuple[int, int], *, negative=None,
                  true_cfg_scale: float = 1.0, attention_kwargs: dict | None = None, pre_call=None):
        self.transformer = transformer
        self.prompt_embeds = prompt_embeds
        self.prompt_embeds_mask = prompt_embeds_mask
        self.grid = (int(grid[0]), int(grid[1]))
        self.num_tokens = self.grid[0] * self.grid[1]
        self.negative = negative
        self.true_cfg_scale = float(true_cfg_scale)
        self.attention_kwargs = dict(attention_kwargs or {})
        self.pre_call = pre_call
        self.calls = 0
        self.cache_resets = 0
        self._last_tokens = None
        self._stage_key = None
        self._stage_rows: list = []
        self._freqs: dict = {}  # (id(rows), device) -> (rows, selected image freqs), cleared per stage

    # -- positions ------------------------------------------------------------------------
    def _is_identity(self, idx: torch.Tensor) -> bool:
        n = self.num_tokens
        return idx.shape[-1] == n and bool(torch.equal(idx, torch.arange(n, device=idx.device, dtype=idx.dtype)))

    def _rows(self, active_idx: torch.Tensor) -> list:
        """Per forward group, the token indices whose rotary rows it needs (``None`` = the whole grid in order).

        One entry for a shared set, one per sample for ``[B, M]`` (a single ``None`` when every
        sample runs the full grid in order). Computed once per stage: the loop passes the same
        tensor object for every step of a stage.
        """
        if self._stage_key is not active_idx:
            if active_idx.dim() == 1:
                rows = [None if self._is_identity(active_idx) else active_idx]
            else:
                rows = [None if self._is_identity(r) else r for r in active_idx]
                if all(r is None for r in rows):
                    rows = [None]
            self._stage_rows, self._stage_key, self._freqs = rows, active_idx, {}
        return self._stage_rows

    def _select_hook(self, rows: torch.Tensor):
        """A ``pos_embed`` forward hook returning ``(image_freqs[rows], text_freqs)``.

        The image table of a fixed ``img_shapes`` is a pure function of the grid, so the
        selection is cached per stage and device.
        """

        def hook(module, args, output):
            vid, txt = output
            if vid.shape[0] != self.num_tokens:
                raise RuntimeError(f"QwenImageVelocity: pos_embed returned {vid.shape[0]} image rows, expected the "
                                   f"{self.grid[0]} x {self.grid[1]} grid's {self.num_tokens}")
            key = (id(rows), vid.device, vid.dtype)
            hit = self._freqs.get(key)
            if hit is None:
                hit = (rows, vid.index_select(0, rows.to(vid.device)))
                self._freqs[key] = hit
            return hit[1], txt

        return hook

    @contextlib.contextmanager
    def _rotary_rows(self, rows):
        if rows is None:
            yield
            return
        handle = self.transformer.pos_embed.register_forward_hook(self._select_hook(rows))
        try:
            yield
        finally:
            handle.remove()

    # -- model calls ------------------------------------------------------------------------
    def _reset_cache_hooks(self) -> None:
        tr = self.transformer
        if not hasattr(tr, "_reset_stateful_cache"):
            return
        if any(getattr(getattr(m, "_diffusers_hook", None), "_hook_order", None) for m in tr.modules()):
            tr._reset_stateful_cache()
            self.cache_resets += 1

    def _forward(self, x, rows, sl, sigma, cond: bool):
        tr = self.transformer
        b = x.shape[0]
        # As QwenImagePipeline: timestep t = 1000 * sigma in the latent dtype, passed as t / 1000.
        t = torch.full((b,), sigma * 1000.0, device=x.device, dtype=torch.float32).to(x.dtype)
        pe, mask = (self.prompt_embeds, self.prompt_embeds_mask) if cond else self.negative
        ctx = tr.cache_context("cond" if cond else "uncond") if hasattr(tr, "cache_context") else contextlib.nullcontext()
        with ctx, self._rotary_rows(rows):
            out = tr(hidden_states=x, timestep=t / 1000, encoder_hidden_states_mask=None if mask is None else mask[sl],
                     encoder_hidden_states=pe[sl], img_shapes=[[(1, *self.grid)]] * b,
                     attention_kwargs=dict(self.attention_kwargs), return_dict=False)[0]
        self.calls += 1
        return out

    def _guided(self, x, rows, sl, sigma):
        v = self._forward(x, rows, sl, sigma, True)
        if self.negative is None:
            return v
        v_neg = self._forward(x, rows, sl, sigma, False)
        comb = v_neg + self.true_cfg_scale * (v - v_neg)
        # Qwen-Image's rescale: each token's combined prediction gets the conditional one's norm.
        return comb * (torch.norm(v, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))

    def __call__(self, x: torch.Tensor, active_idx: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        if self.pre_call is not None:
            self.pre_call(step, sigma)
        tokens = active_idx.shape[-1]
        if self._last_tokens is not None and tokens != self._last_tokens:
            self._reset_cache_hooks()
        self._last_tokens = tokens
        xin = x.to(self.transformer.dtype)
        rows = self._rows(active_idx)
        if len(rows) == 1:  # one set for the whole batch
            return self._guided(xin, rows[0], slice(None), sigma).to(x.dtype)
        outs = [self._guided(xin[b:b + 1], rows[b], slice(b, b + 1), sigma) for b in range(x.shape[0])]
        return torch.cat(outs).to(x.dtype)


def _check_mask(name: str, mask, embeds) -> None:
    """A text mask must be a ``[B, T]`` tensor matching its embeddings (checked before any model call)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a tensor [B, T] or None, got {type(mask).__name__}")
    if embeds is not None and tuple(mask.shape) != tuple(embeds.shape[:2]):
        raise ValueError(f"{name} must be [B, T] = {list(embeds.shape[:2])} like its embeddings, "
                         f"got {list(mask.shape)}")


class JiTQwenImagePipeline(JiTPipelineMixin, QwenImagePipeline):
    """``QwenImagePipeline`` with a ``jit=`` argument (``None``, a preset name or a :class:`JiTConfig`).

    ``jit=None`` calls ``QwenImagePipeline.__call__`` unchanged. Otherwise every argument keeps
    its meaning (true CFG with ``true_cfg_scale`` and a negative prompt, Qwen's norm rescale
    included), except: the steps and sigmas come from the config (``config.total_steps``,
    Beta schedule) unless ``num_inference_steps`` or ``sigmas`` is passed explicitly (an
    explicit value overrides the config's steps; ``sigmas`` or ``sigma_schedule="pipeline"``
    use the scheduler's own, resolution-shifted schedule). After a JiT call
    ``pipe.last_jit_report`` holds a :class:`~jit_sampler.JiTReport` (FLOPs per sample, from
    :func:`qwen_flop_config`). See the module docstring for what is refused under JiT.
    """

    _stock_class = QwenImagePipeline
    _stock_call = inspect.signature(QwenImagePipeline.__call__)

    def __call__(self, *args, jit=UNSET, **kwargs):
        return self._dispatch(super().__call__, args, kwargs, jit)

    def _shift_mu(self, image_seq_len: int, steps: int) -> float:
        c = self.scheduler.config
        return calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.15))

    def _refuse_unsupported(self, cfg: JiTConfig) -> None:
        c = self.transformer.config
        for key in ("zero_cond_t", "use_layer3d_rope", "use_additional_t_cond", "guidance_embeds"):
            if c.get(key, False):
                raise NotImplementedError(f"JiTQwenImagePipeline: a transformer with {key}=True is not supported "
                                          f"with jit=...; use jit=None")
        if cfg.token_bucket:
            raise NotImplementedError("JiTQwenImagePipeline: JiTConfig.token_bucket needs an image attention mask, "
                                      "which Qwen-Image's attention processor does not accept; use token_bucket=0")

    @torch.no_grad()
    def _jit_call(self, cfg: JiTConfig, *, explicit_steps: bool, prompt, negative_prompt, true_cfg_scale, height,
                  width, num_inference_steps, sigmas, guidance_scale, num_images_per_prompt, generator, latents,
                  prompt_embeds, prompt_embeds_mask, negative_prompt_embeds, negative_prompt_embeds_mask,
                  output_type, return_dict, attention_kwargs, callback_on_step_end,
                  callback_on_step_end_tensor_inputs, max_sequence_length, **newer):
        self._refuse_newer(newer)
        self._refuse_unsupported(cfg)
        t0 = time.perf_counter()
        height, width = self._default_size(height, width)
        self.check_inputs(prompt, height, width, negative_prompt=negative_prompt, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, prompt_embeds_mask=prompt_embeds_mask,
                          negative_prompt_embeds_mask=negative_prompt_embeds_mask,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        _check_mask("prompt_embeds_mask", prompt_embeds_mask, prompt_embeds)
        _check_mask("negative_prompt_embeds_mask", negative_prompt_embeds_mask, negative_prompt_embeds)
        grid = self._token_grid(height, width)
        check_latents_shape(latents, (self._batch_size(prompt, prompt_embeds) * num_images_per_prompt,
                                      grid[0] * grid[1], self.transformer.config.in_channels),
                            "packed start latents [B, N tokens, C]")
        tc = self.transformer.config
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False

        batch_size = self._batch_size(prompt, prompt_embeds)
        device = self._execution_device
        has_neg_prompt = negative_prompt is not None or negative_prompt_embeds is not None
        do_true_cfg = true_cfg_scale > 1 and has_neg_prompt
        # The stock pipeline's notices, word for word.
        if true_cfg_scale > 1 and not has_neg_prompt:
            logger.warning(f"true_cfg_scale is passed as {true_cfg_scale}, but classifier-free guidance is not "
                           f"enabled since no negative_prompt is provided.")
        elif true_cfg_scale <= 1 and has_neg_prompt:
            logger.warning(" negative_prompt is passed but classifier-free guidance is not enabled since "
                           "true_cfg_scale <= 1")
        if guidance_scale is not None:
            logger.warning(f"guidance_scale is passed as {guidance_scale}, but ignored since the model is not "
                           f"guidance-distilled.")
        prompt_embeds, prompt_embeds_mask = self.encode_prompt(
            prompt=prompt, prompt_embeds=prompt_embeds, prompt_embeds_mask=prompt_embeds_mask, device=device,
            num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length)
        total = batch_size * num_images_per_prompt
        negative = None
        if do_true_cfg:
            neg_embeds, neg_mask = self.encode_prompt(
                prompt=negative_prompt, prompt_embeds=negative_prompt_embeds,
                prompt_embeds_mask=negative_prompt_embeds_mask, device=device,
                num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length)
            # One negative prompt for a batch of prompts is shared (the stock loop would need equal batches).
            neg_embeds = per_image(neg_embeds, total)
            neg_mask = None if neg_mask is None else per_image(neg_mask, total)
            if neg_embeds.shape[0] != total:
                raise ValueError(f"negative prompts give {neg_embeds.shape[0]} embeddings for a batch of {total}")
            negative = (neg_embeds, neg_mask)
        t_encoded = time.perf_counter()

        latents = self.prepare_latents(total, tc.in_channels // 4, height, width, prompt_embeds.dtype, device,
                                       generator, latents)
        # The packed token grid (prepare_latents rounds the latent size down to even).
        grid_h, grid_w = self._token_grid(height, width)

        cfg, sig = self._schedule(cfg, sigmas, explicit_steps, num_inference_steps, grid_h * grid_w, device)

        if self._attention_kwargs is None:
            self._attention_kwargs = {}

        timesteps, set_timestep = self._timesteps(sig, device)
        velocity = QwenImageVelocity(self.transformer, prompt_embeds, prompt_embeds_mask, (grid_h, grid_w),
                                     negative=negative, true_cfg_scale=true_cfg_scale,
                                     attention_kwargs=self._attention_kwargs, pre_call=set_timestep)

        latents, report = self._denoise(velocity, latents, grid_h, grid_w, sig, cfg, generator, timesteps,
                                        callback_on_step_end, callback_on_step_end_tensor_inputs)
        t_sampled = time.perf_counter()

        if output_type == "latent":
            image = latents
        else:
            latents = self._unpack_latents(latents, height, width, self.vae_scale_factor).to(self.vae.dtype)
            vc = self.vae.config
            mean = torch.tensor(vc.latents_mean).view(1, vc.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
            inv_std = 1.0 / torch.tensor(vc.latents_std).view(1, vc.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
            latents = latents / inv_std + mean
            image = self.vae.decode(latents.to(execution_device(self.vae)), return_dict=False)[0][:, :, 0]
            image = self.image_processor.postprocess(image, output_type=output_type)
        return self._finish_call(report, image, (t0, t_encoded, t_sampled), grid_h * grid_w, prompt_embeds.shape[1],
                                 calls_per_step=2 if do_true_cfg else 1, return_dict=return_dict,
                                 output_class=QwenImagePipelineOutput)

    def _finish_report(self, report, times, num_tokens: int, text_tokens: int, calls_per_step: int,
                       ref_tokens=0) -> None:
        """The shared report, with FLOPs counted from :func:`qwen_flop_config` (Qwen's config has no FLUX keys;
        Qwen-Image has no reference tokens, ``ref_tokens`` is always 0)."""
        super()._finish_report(report, times, num_tokens, text_tokens, calls_per_step)
        report.flops = flop_summary(qwen_flop_config(self.transformer.config), report.active_tokens, num_tokens,
                                    text_tokens=int(text_tokens), calls_per_step=calls_per_step)
