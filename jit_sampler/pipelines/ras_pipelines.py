"""RAS on diffusers pipelines: :func:`enable_ras`, :class:`RASFluxPipeline` and :class:`FluxRASVelocity`.

- FLUX.1 text-to-image: :class:`RASFluxPipeline` is :class:`~jit_sampler.JiTFluxPipeline` with a
  ``ras=`` argument (a :class:`~jit_sampler.ras.RASConfig`): the call is the JiT pipeline's with a
  dense config on the pipeline's own schedule, and its denoising loop is
  :func:`~jit_sampler.ras.ras_sample` with :class:`FluxRASVelocity`.
- Stable Diffusion 3 / 3.5: :class:`~jit_sampler.pipelines.sd3.JiTStableDiffusion3Pipeline` takes
  ``ras=`` itself.

RAS's per-layer key/value cache (:mod:`.ras_attention`) is installed on the transformer for the
duration of each RAS call (``RASConfig.kv_cache``, on by default) and removed afterwards. The
call's state (selection, drop counts, cached velocity, K/V caches) lives in the call, so calls
on different pipelines, or on pipelines sharing one transformer, do not interfere; one pipeline
instance runs one call at a time (as every diffusers pipeline, it keeps per-call attributes).
"""

from __future__ import annotations

import contextlib

from diffusers import FluxPipeline, StableDiffusion3Pipeline

from ..config import JiTConfig
from ..ras import RASConfig, ras_sample, skip_counts
from .base import UNSET, _share
from .flux import JiTFluxPipeline
from .ras_attention import use_ras_attention
from .velocity import FluxVelocity

__all__ = ["FluxRASVelocity", "RASFluxPipeline", "RASVelocityMixin", "enable_ras"]


class RASVelocityMixin:
    """Makes a :class:`~jit_sampler.FluxVelocity` (or subclass) take RAS's ``kv=`` keyword.

    Before each transformer forward the cache rows of that forward (the batch rows, the CFG
    branch, the computed tokens of those rows) are set on the :class:`~jit_sampler.ras.RASKVCache`,
    and the cache rides to the attention processors as ``joint_attention_kwargs["ras_kv"]``.
    """

    _ras_kv = None
    _ras_idx = None
    _ras_batch = 0

    def __call__(self, x, active_idx, sigma, step, kv=None):
        if kv is None:
            return super().__call__(x, active_idx, sigma, step)
        base = self.joint_attention_kwargs
        self._ras_kv, self._ras_idx, self._ras_batch = kv, active_idx, x.shape[0]
        self.joint_attention_kwargs = {**base, "ras_kv": kv}
        try:
            return super().__call__(x, active_idx, sigma, step)
        finally:
            self.joint_attention_kwargs = base
            self._ras_kv = self._ras_idx = None

    def _forward(self, x, ids, sl, sigma, cond: bool):
        kv = self._ras_kv
        if kv is not None:
            dense = self._ras_idx.shape[-1] == kv.num_tokens
            idx = None if dense else (self._ras_idx[sl] if self._ras_idx.dim() == 2 else self._ras_idx.unsqueeze(0))
            kv.select_rows(sl, self._ras_batch, "cond" if cond else "uncond", idx)
        return super()._forward(x, ids, sl, sigma, cond)


class FluxRASVelocity(RASVelocityMixin, FluxVelocity):
    """:class:`~jit_sampler.FluxVelocity` with RAS's ``kv=`` keyword (:class:`RASVelocityMixin`)."""


class RASFluxPipeline(JiTFluxPipeline):
    """``FluxPipeline`` with ``ras=`` (RAS) besides ``jit=`` (JiT); ``ras=None``: :class:`~jit_sampler.JiTFluxPipeline`.

    With both ``jit=`` and ``ras=``, RAS runs inside JiT's final dense stage
    (:class:`~jit_sampler.ras.RASFinalStage`); ``last_jit_report.active_tokens`` are then the tokens
    actually computed per step.

    Under ``ras`` every FluxPipeline argument keeps its meaning; the steps are
    ``RASConfig.num_steps`` unless ``num_inference_steps`` / ``sigmas`` is passed, and the sigmas
    are the pipeline's own (resolution-shifted) schedule. ``token_bucket``-style padding and the
    anchor-attention processor are not combined with RAS. ``pipe.last_jit_report`` is a
    :class:`~jit_sampler.ras.RASReport`.
    """

    _default_ras = None
    _active_ras = None
    _stage_ras = None  # set for the duration of a jit= + ras= call

    def __call__(self, *args, jit=UNSET, ras=UNSET, anchor_attention: bool = False, **kwargs):
        ras = self._default_ras if ras is UNSET else RASConfig.coerce(ras)
        if ras is None:
            return super().__call__(*args, jit=jit, anchor_attention=anchor_attention, **kwargs)
        if anchor_attention:
            raise ValueError("anchor_attention=True is not combined with ras= (RAS installs its own processors)")
        if jit is not UNSET and jit is not None:  # RAS inside JiT's final dense stage
            if "ras_kv" in (kwargs.get("joint_attention_kwargs") or {}):
                raise ValueError("joint_attention_kwargs must not contain 'ras_kv' (the RAS call sets it)")
            if JiTConfig.coerce(jit).token_bucket and ras.kv_cache:
                raise ValueError("RAS's K/V cache does not take token_bucket padding; use token_bucket=0")
            self._stage_ras = ras
            try:
                ctx = use_ras_attention(self.transformer) if ras.kv_cache else contextlib.nullcontext()
                with ctx:
                    return super().__call__(*args, jit=jit, **kwargs)
            finally:
                self._stage_ras = None
        a, explicit_steps = self._bound_arguments(args, kwargs, "ras")
        ras = ras.with_call_steps(a["sigmas"], a["num_inference_steps"] if explicit_steps else None)
        if "ras_kv" in (a.get("joint_attention_kwargs") or {}):
            raise ValueError("joint_attention_kwargs must not contain 'ras_kv' (the RAS call sets it)")
        height, width = self._default_size(a["height"], a["width"])
        gh, gw = self._token_grid(height, width)
        skip_counts(ras, gh * gw, (gh, gw))  # drop counts of this grid, before any work
        cfg = JiTConfig.dense(ras.num_steps, sigma_schedule="pipeline", backend=ras.backend)
        self._active_ras = ras
        try:
            ctx = use_ras_attention(self.transformer) if ras.kv_cache else contextlib.nullcontext()
            with ctx:
                return self._jit_call(cfg, explicit_steps=True, **{**a, "num_inference_steps": ras.num_steps})
        finally:
            self._active_ras = None

    def _denoise(self, velocity, latents, grid_h, grid_w, sig, cfg, generator, timesteps, callback_on_step_end,
                 callback_on_step_end_tensor_inputs, post_step=None):
        ras = self._active_ras
        if ras is None and self._stage_ras is not None:  # jit= + ras=: RAS in JiT's final stage
            from ..ras import RASFinalStage

            velocity.__class__ = _ras_class(type(velocity))
            stage = RASFinalStage(velocity, self._stage_ras, cfg, sig, grid_h, grid_w)
            latents, report = super()._denoise(_StageProxy(velocity, stage), latents, grid_h, grid_w, sig, cfg,
                                               generator, timesteps, callback_on_step_end,
                                               callback_on_step_end_tensor_inputs, post_step=post_step)
            report.active_tokens = list(stage.active_tokens)
            return latents, report
        if ras is None:
            return super()._denoise(velocity, latents, grid_h, grid_w, sig, cfg, generator, timesteps,
                                    callback_on_step_end, callback_on_step_end_tensor_inputs, post_step=post_step)
        velocity.__class__ = _ras_class(type(velocity))  # same object, RAS's kv= keyword added
        with self.progress_bar(total=ras.num_steps) as progress_bar:
            def on_step(i, sigma, y):
                new = None
                if callback_on_step_end is not None:
                    avail = {"latents": y, "prompt_embeds": velocity.prompt_embeds}
                    out = callback_on_step_end(self, i, timesteps[i],
                                               {k: avail[k] for k in callback_on_step_end_tensor_inputs}) or {}
                    new = out.get("latents")
                progress_bar.update()
                return new

            latents, report = ras_sample(velocity, latents, grid_h, grid_w, sig, ras, step_callback=on_step,
                                         interrupt=lambda: self.interrupt)
        self._current_timestep = None
        return latents, report


class _StageProxy:
    """The velocity as the JiT loop sees it with RAS in its final stage: calls go to the
    :class:`~jit_sampler.ras.RASFinalStage`, attribute reads and writes (``prompt_embeds`` replaced by a
    callback, ``calls``, ...) to the velocity itself."""

    def __init__(self, velocity, stage):
        object.__setattr__(self, "_velocity", velocity)
        object.__setattr__(self, "_stage", stage)

    def __call__(self, *args, **kwargs):
        return self._stage(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._velocity, name)

    def __setattr__(self, name, value):
        setattr(self._velocity, name, value)


_RAS_CLASSES: dict = {}


def _ras_class(cls):
    """``cls`` (a FluxVelocity class) with :class:`RASVelocityMixin` in front; one class per ``cls``."""
    if issubclass(cls, RASVelocityMixin):
        return cls
    if cls not in _RAS_CLASSES:
        _RAS_CLASSES[cls] = type(f"RAS{cls.__name__}", (RASVelocityMixin, cls), {})
    return _RAS_CLASSES[cls]


def enable_ras(pipe, ras=None):
    """A pipeline sharing ``pipe``'s components whose calls default to RAS with ``ras``.

    ``pipe``: a ``FluxPipeline`` (-> :class:`RASFluxPipeline`) or a ``StableDiffusion3Pipeline``
    (-> :class:`~jit_sampler.pipelines.sd3.JiTStableDiffusion3Pipeline`). ``ras``: a
    :class:`~jit_sampler.ras.RASConfig`, a dict of its fields, or ``None`` for the published
    defaults. ``(..., ras=None)`` on the result runs the stock pipeline. ``pipe`` is not changed.
    """
    cfg = RASConfig() if ras is None else RASConfig.coerce(ras)
    from .sd3 import JiTStableDiffusion3Pipeline

    if isinstance(pipe, StableDiffusion3Pipeline):
        cls = JiTStableDiffusion3Pipeline
    elif type(pipe) in (FluxPipeline, JiTFluxPipeline, RASFluxPipeline):
        cls = RASFluxPipeline
    else:
        raise TypeError(f"enable_ras needs a FluxPipeline or a StableDiffusion3Pipeline, got {type(pipe).__name__}")
    out = pipe if type(pipe) is cls else _share(cls, pipe)  # nothing cast, moved or re-hooked (as enable_jit)
    out._default_ras = cfg
    return out
