"""The methods JiT is compared against, on the same velocity callables (docs/evaluation.md section 3).

- :func:`ras_sample`: RAS (Liu et al., 2025) as published, :func:`jit_sampler.ras.ras_sample`
  (``docs/ras.md``), behind the bench's older call signature: ``ratio`` is RAS's
  ``sample_ratio``, ``warmup`` its ``scheduler_start_step``, and every ``refresh_every``-th
  step after the warm-up is one of its dense ``error_reset_steps``. A FLUX velocity
  (:class:`~jit_sampler.FluxVelocity` or a subclass, e.g. the tiny model's) gets RAS's per-layer
  key/value cache; any other callable runs without it.
- :func:`jit_ras_sample`: JiT with RAS inside its final dense stage.
- :class:`BlockWorkCounter`: counts which transformer blocks actually ran (cache hooks skip
  blocks or whole attention modules) and turns that into FLOPs with the model's dimensions,
  so every method, cached or not, is costed by the same rule.
- :func:`cache_hook`: a context manager around ``transformer.enable_cache(...)`` that
  always leaves the model without hooks and with clean state.

The tiny model's token is a 2 x 2 patch of a one-channel image, so RAS's per-pixel spread
over latent channels would be empty there; the score is taken over the token's four values
(``RASConfig.pixels_per_token=1``). On FLUX.1 / SD3 latents the published per-pixel score applies.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Sequence

import torch

from jit_sampler.pipelines.ras_attention import use_ras_attention
from jit_sampler.pipelines.ras_pipelines import _ras_class
from jit_sampler.pipelines.velocity import FluxVelocity
from jit_sampler import jit_sample
from jit_sampler.ras import RASConfig, RASFinalStage, RASReport
from jit_sampler.ras import ras_sample as _ras
from jit_sampler.report import flux_transformer_flops

__all__ = ["ras_sample", "ras_config", "jit_ras_sample", "RASReport", "BlockWorkCounter", "cache_hook"]


def ras_config(steps: int, ratio: float, warmup: int = 2, refresh_every: int = 5, backend: str = "auto",
               kv_cache: bool = True, pixels_per_token: int = 1) -> RASConfig:
    """The :class:`~jit_sampler.ras.RASConfig` of the bench's ``(ratio, warmup, refresh_every)`` arguments."""
    if not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup must be an int >= 1 (dense steps before RAS starts), got {warmup}")
    if not isinstance(refresh_every, int) or refresh_every < 0:
        raise ValueError(f"refresh_every must be >= 0 (0: never), got {refresh_every}")
    resets = tuple(i for i in range(warmup, steps)
                   if refresh_every > 0 and (i - warmup) % refresh_every == refresh_every - 1)
    return RASConfig(num_steps=steps, sample_ratio=float(ratio), scheduler_start_step=warmup,
                     scheduler_end_step=max(steps, warmup + 1), error_reset_steps=resets,
                     kv_cache=kv_cache, pixels_per_token=pixels_per_token, backend=backend)


@torch.no_grad()
def ras_sample(velocity_fn, latents: torch.Tensor, height: int, width: int, sigmas: Sequence[float], *,
               ratio: float, warmup: int = 2, refresh_every: int = 5, backend: str = "auto"):
    """RAS (:func:`jit_sampler.ras.ras_sample`) on ``latents [B, N, C]`` with the bench's arguments (module docstring).

    Returns ``(y, RASReport)``; ``report.active_tokens`` are the tokens computed per step.
    """
    if latents.dim() != 3 or latents.shape[1] != height * width:
        raise ValueError(f"latents must be [B, {height * width}, C], got {tuple(latents.shape)}")
    steps = len(sigmas) - 1
    flux = isinstance(velocity_fn, FluxVelocity)
    cfg = ras_config(steps, ratio, warmup, refresh_every, backend, kv_cache=flux)
    if not flux:
        return _ras(velocity_fn, latents, height, width, sigmas, cfg)
    fn = copy.copy(velocity_fn)
    fn.__class__ = _ras_class(type(velocity_fn))  # the same velocity with RAS's kv= keyword
    with use_ras_attention(fn.transformer):
        return _ras(fn, latents, height, width, sigmas, cfg)


@torch.no_grad()
def jit_ras_sample(velocity_fn, latents: torch.Tensor, height: int, width: int, sigmas: Sequence[float], jit_config,
                   generator=None, *, ratio: float = 0.5):
    """JiT with RAS inside its final dense stage (:class:`jit_sampler.ras.RASFinalStage`, ``sample_ratio=ratio``).

    ``velocity_fn`` as for :func:`ras_sample` (a FLUX velocity gets the K/V cache). Returns
    ``(y, report)``: :func:`jit_sampler.jit_sample`'s report with ``active_tokens`` the tokens
    actually computed per step.
    """
    flux = isinstance(velocity_fn, FluxVelocity)
    cfg = RASConfig(sample_ratio=float(ratio), kv_cache=flux, pixels_per_token=1, backend=jit_config.backend)
    fn = velocity_fn
    if flux:
        fn = copy.copy(velocity_fn)
        fn.__class__ = _ras_class(type(velocity_fn))
    stage = RASFinalStage(fn, cfg, jit_config, sigmas, height, width)
    with use_ras_attention(fn.transformer) if flux else contextlib.nullcontext():
        y, report = jit_sample(stage, latents, height, width, sigmas, jit_config, generator)
    report.active_tokens = list(stage.active_tokens)
    return y, report


class BlockWorkCounter:
    """FLOPs a ``FluxTransformer2DModel`` actually spent, block by block, while attached.

    Every forward adds the embedders and modulation of its token count; each block adds its
    attention half (q/k/v/out projections: 1/3 of its linear work, plus the quadratic
    attention) when its attention module's ``to_q`` runs, and its MLP half (2/3 of its
    linear work) when its MLP runs. Cache hooks that skip blocks or predict attention
    outputs therefore lower the count; dense runs give :func:`flux_transformer_flops`
    exactly. Use as a context manager.
    """

    def __init__(self, transformer):
        self.transformer = transformer
        self.config = transformer.config
        self.flops = 0.0
        self.forwards = 0
        self._handles = []
        self._cur = None

    def _per_call(self, tokens: int, text: int, batch: int):
        f = flux_transformer_flops(self.config, tokens, text, batch)
        nb = self.config.num_layers + self.config.num_single_layers
        lin = (f.image_linear + f.text_linear)
        d = self.config.num_attention_heads * self.config.attention_head_dim
        p = self.config.patch_size or 1
        c_in = self.config.in_channels
        c_out = (self.config.out_channels or c_in) * p * p
        embed = 2.0 * batch * (tokens * (c_in * d + d * c_out) + text * self.config.joint_attention_dim * d)
        blk = (lin - embed) / nb
        return f.modulation + embed, blk / 3 + f.attention / nb, 2 * blk / 3

    def _pre(self, module, args, kwargs):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        enc = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        text = enc.shape[1] if enc is not None else 0
        base, self._attn, self._mlp = self._per_call(hs.shape[1], text, hs.shape[0])
        self.flops += base
        self.forwards += 1

    def _add(self, attr):
        def hook(module, args, out):
            self.flops += getattr(self, attr)
        return hook

    def __enter__(self):
        tr = self.transformer
        self._handles.append(tr.register_forward_pre_hook(self._pre, with_kwargs=True))
        for blk in tr.transformer_blocks:
            self._handles.append(blk.attn.to_q.register_forward_hook(self._add("_attn")))
            self._handles.append(blk.ff.register_forward_hook(self._add("_mlp")))
        for blk in tr.single_transformer_blocks:
            self._handles.append(blk.attn.to_q.register_forward_hook(self._add("_attn")))
            self._handles.append(blk.proj_mlp.register_forward_hook(self._add("_mlp")))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False


@contextlib.contextmanager
def cache_hook(transformer, config):
    """``transformer.enable_cache(config)`` for the duration of the block (``None``: no hook);
    the hook state is reset on entry and the hooks removed on exit. A callable ``config`` is a
    cache of another library: ``config(transformer)`` is the context manager entered instead
    (e.g. ``functools.partial(jit_sampler.use_cache_dit, cache_config=...)``)."""
    if config is None:
        yield transformer
        return
    if callable(config):
        with config(transformer):
            yield transformer
        return
    transformer.enable_cache(config)
    try:
        transformer._reset_stateful_cache()
        yield transformer
    finally:
        transformer.disable_cache()
