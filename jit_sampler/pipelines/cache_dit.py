"""JiT + cache-dit: the DBCache of `cache-dit <https://github.com/vipshop/cache-dit>`_ on a JiT pipeline.

``cache_dit.enable_cache(pipe)`` does not know JiT pipelines (it looks adapters up by class-name
prefix), wraps ``__call__`` on the pipeline *class* (every instance, and ``FluxPipeline``'s
subclasses, would share it), and never learns of JiT's stage transitions: a cached residual from
a stage with ``M`` active tokens would be reused at a stage with ``M' != M`` tokens. This module
attaches cache-dit to one pipeline instance instead:

- :func:`enable_cache_dit` hands cache-dit the transformer through a :class:`cache_dit.BlockAdapter`
  of its own (FLUX.1: double and single blocks, each a cache context; FLUX.2: the same with
  FLUX.2's single-block pattern) with a placeholder pipeline, so that cache-dit keeps persistent
  contexts and patches no class;
- the cached ``transformer.forward`` cache-dit builds is taken off the transformer again and put
  back only for the duration of this pipeline's calls, so another pipeline sharing the
  transformer (``enable_jit``, ``from_pipe``) still runs it uncached;
- every call starts with fresh contexts, and :class:`~jit_sampler.pipelines.velocity.FluxVelocity`
  resets them before the first step of every JiT stage (``transformer._jit_stage_hook``), so
  each stage's first steps run in full and no residual crosses a change of token set;
- true CFG: in a JiT call cache-dit's separate-CFG mode follows the call (on when the call runs
  a negative branch; FluxVelocity evaluates cond first, so ``cfg_compute_first=False``),
  whatever ``enable_separate_cfg`` / ``cfg_compute_first`` the config says. ``jit=None`` calls
  use the config as given and give exactly what ``cache_dit.enable_cache`` gives on the stock
  pipeline with the same two-context ``BlockAdapter`` (cache-dit's own FLUX.1 adapter instead
  joins all blocks in one context and swaps in its own copy of the transformer's ``forward``;
  this module keeps diffusers' ``forward``);
- :func:`disable_cache_dit` (or :meth:`CacheDiT.disable`) removes everything and restores the
  transformer's and blocks' own ``forward`` entries.

:func:`use_cache_dit` is the same for a bare transformer driven by a ``FluxVelocity`` (the
evaluation bench): cache-dit is active inside the ``with`` block only.

Not supported (``NotImplementedError``): per-sample anchor sets with a batch above one (one
forward per sample per step would interleave the samples in cache-dit's step counter).
``cache-dit`` is an optional dependency (``pip install jit-diffusion[cache-dit]``).
"""

from __future__ import annotations

import contextlib
import copy
import logging

import torch

__all__ = ["CacheDiT", "disable_cache_dit", "enable_cache_dit", "use_cache_dit"]

_MISSING = object()
_OPTIONS = ("cache_config", "calibrator_config", "params_modifiers")


def _import_cache_dit():
    try:
        import cache_dit
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("enable_cache_dit needs the cache-dit package: pip install cache-dit "
                          "(or jit-diffusion[cache-dit])") from e
    return cache_dit


@contextlib.contextmanager
def _quiet():
    """cache-dit logs every adapter decision at INFO on its own (non-propagating) loggers; silence them."""
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.startswith("cache_dit")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _adapter(cache_dit, transformer):
    """A BlockAdapter for a FLUX.1 or FLUX.2 transformer around a placeholder pipeline (persistent contexts)."""
    from cache_dit.caching.block_adapters import FakeDiffusionPipeline
    from diffusers import FluxTransformer2DModel

    patterns = None
    if isinstance(transformer, FluxTransformer2DModel):
        patterns = [cache_dit.ForwardPattern.Pattern_1, cache_dit.ForwardPattern.Pattern_1]
    else:
        try:
            from diffusers import Flux2Transformer2DModel
        except ImportError:  # pragma: no cover - older diffusers
            Flux2Transformer2DModel = ()
        if Flux2Transformer2DModel and isinstance(transformer, Flux2Transformer2DModel):
            # FLUX.2's single blocks take the joined text + image stream and return it alone.
            patterns = [cache_dit.ForwardPattern.Pattern_1, cache_dit.ForwardPattern.Pattern_3]
    if patterns is None:
        raise TypeError(f"cache-dit with JiT supports FluxTransformer2DModel and Flux2Transformer2DModel, "
                        f"got {type(transformer).__name__}")
    return cache_dit.BlockAdapter(
        pipe=FakeDiffusionPipeline(transformer), transformer=transformer,
        blocks=[transformer.transformer_blocks, transformer.single_transformer_blocks],
        forward_pattern=patterns, check_forward_pattern=True)


def _check_option_types(cache_dit, options: dict) -> None:
    """``calibrator_config`` / ``params_modifiers`` of the kinds ``cache_dit.enable_cache`` takes (it fails
    deep inside on anything else, with an ``AttributeError``), checked before anything is attached."""
    cal = options.get("calibrator_config")
    if cal is not None and not isinstance(cal, cache_dit.CalibratorConfig):
        raise TypeError(f"calibrator_config must be a cache_dit.CalibratorConfig, got {type(cal).__name__}")
    mods = options.get("params_modifiers")
    if mods is None:
        return
    flat = mods if isinstance(mods, list) else [mods]
    flat = [m for item in flat for m in (item if isinstance(item, list) else [item])]
    if not all(isinstance(m, cache_dit.ParamsModifier) for m in flat):
        raise TypeError("params_modifiers must be a cache_dit.ParamsModifier or a list (of lists) of them, got "
                        f"{type(mods).__name__}")


class CacheDiT:
    """cache-dit attached to one FLUX transformer, active only inside :meth:`active`.

    Built by :func:`enable_cache_dit` / :func:`use_cache_dit`; ``options`` are
    ``cache_dit.enable_cache``'s ``cache_config`` (default ``cache_dit.DBCacheConfig()``),
    ``calibrator_config`` and ``params_modifiers`` (deep-copied: nothing passed in is changed).

    Counters: ``calls`` (times :meth:`active` was entered), ``resets`` (context resets, one per
    call and one per JiT stage, the first included), ``transition_resets`` (resets at a change of
    the active token count, i.e. at JiT stage transitions). :meth:`stats` is
    ``cache_dit.summary`` of the transformer (cached steps per context, of the last call).
    """

    def __init__(self, transformer, **options):
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"unsupported cache-dit options {unknown}; supported: {list(_OPTIONS)} (parallelism, "
                            f"quantization and attention backends are not part of the JiT integration)")
        if not isinstance(transformer, torch.nn.Module):
            raise TypeError(f"transformer must be a torch.nn.Module, got {type(transformer).__name__}")
        if getattr(transformer, "_jit_cache_dit", None) is not None:
            raise ValueError("this transformer already carries cache-dit through JiT (possibly from another "
                             "pipeline sharing it); disable it there first")
        if getattr(transformer, "_is_cached", False) or getattr(transformer, "_context_manager", None) is not None:
            raise ValueError("this transformer already carries cache-dit hooks (cache_dit.enable_cache); "
                             "call cache_dit.disable_cache on it first")
        cache_dit = _import_cache_dit()
        cfg = options.get("cache_config")
        if cfg is not None and not isinstance(cfg, cache_dit.BasicCacheConfig):
            raise TypeError(f"cache_config must be a cache_dit.DBCacheConfig, got {type(cfg).__name__}")
        _check_option_types(cache_dit, options)
        options = {k: copy.deepcopy(v) for k, v in options.items() if v is not None}
        options.setdefault("cache_config", cache_dit.DBCacheConfig())
        self.transformer = transformer
        self._order = list(transformer._modules)
        with _quiet():
            adapter = _adapter(cache_dit, transformer)
            self._modules = [transformer, *transformer.transformer_blocks, *transformer.single_transformer_blocks]
            self._saved = [m.__dict__.get("forward", _MISSING) for m in self._modules]
            cache_dit.enable_cache(adapter, **options)
        # cache-dit has replaced transformer.forward with its block-swapping forward: keep it aside,
        # so the transformer stays uncached outside this handle's active() blocks.
        self._cached_forward = transformer.__dict__["forward"]
        self._put_forward(self._saved[0])
        self._manager = transformer._context_manager
        self._names = list(transformer._context_names)
        self._init = {n: copy.deepcopy(self._manager.get_context(n)._init_kwargs) for n in self._names}
        self._depth = 0
        self.calls = 0
        self.resets = 0
        self.transition_resets = 0
        self.removed = False
        transformer._jit_cache_dit = self

    @property
    def cache_config(self):
        """The cache config in force (after cache-dit's defaults; a copy)."""
        return copy.deepcopy(self._init[self._names[0]]["cache_config"])

    def _restore_order(self) -> None:
        """Put the transformer's submodules back in their registration order.

        cache-dit swaps the block lists in with ``unittest.mock.patch.object`` for every forward;
        undoing the patch deletes and re-adds ``transformer_blocks`` / ``single_transformer_blocks``,
        which moves them to the end of ``_modules`` (single blocks first). Code that takes the first
        block in module order as the first block run (diffusers' First-Block Cache) then hooks the
        wrong block.
        """
        mods = self.transformer._modules
        if list(mods) != self._order:
            items = dict(mods)
            mods.clear()
            for k in self._order:
                if k in items:
                    mods[k] = items.pop(k)
            mods.update(items)

    def _forward(self, *args, **kwargs):
        try:
            return self._cached_forward(*args, **kwargs)
        finally:
            self._restore_order()

    def _put_forward(self, fwd) -> None:
        if fwd is _MISSING:
            self.transformer.__dict__.pop("forward", None)
        else:
            self.transformer.__dict__["forward"] = fwd

    def reset(self, separate_cfg: bool | None = None) -> None:
        """Fresh contexts (no cached residual, step counters at 0). ``separate_cfg`` overrides the
        config's ``enable_separate_cfg`` (with ``cfg_compute_first=False``: cond is evaluated first)."""
        for name in self._names:
            kwargs = copy.deepcopy(self._init[name])
            if separate_cfg is not None:
                kwargs["cache_config"].enable_separate_cfg = bool(separate_cfg)
                kwargs["cache_config"].cfg_compute_first = False
            self._manager.reset_context(name, **kwargs)
        self.resets += 1

    def _stage_hook(self, velocity, active_idx: torch.Tensor) -> None:
        """Called by FluxVelocity before the first evaluation of every stage."""
        if active_idx.dim() == 2 and active_idx.shape[0] > 1:
            raise NotImplementedError("cache-dit with per-sample anchor sets (anchor_policy='per_sample', batch > 1) "
                                      "is not supported: use anchor_policy='shared'")
        if velocity._last_tokens is not None:
            self.transition_resets += 1
        self.reset(separate_cfg=velocity.negative is not None)

    @contextlib.contextmanager
    def active(self):
        """Cache-dit on for the block: fresh contexts, the cached forward installed, stage resets armed."""
        if self.removed:
            raise RuntimeError("this cache-dit handle was disabled")
        if self._depth:  # nested call of the same pipeline: already active
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        tr = self.transformer
        before = tr.__dict__.get("forward", _MISSING)
        self.reset()
        self.calls += 1
        tr.__dict__["forward"] = self._forward
        tr._jit_stage_hook = self._stage_hook
        self._depth = 1
        try:
            yield self
        finally:
            self._depth = 0
            tr.__dict__.pop("_jit_stage_hook", None)
            self._put_forward(before)

    def stats(self):
        """``cache_dit.summary(transformer)``: cached steps and residual diffs per context."""
        cache_dit = _import_cache_dit()
        with _quiet():
            return cache_dit.summary(self.transformer)

    def disable(self) -> None:
        """Remove cache-dit from the transformer and restore its own ``forward`` entries (idempotent)."""
        if self.removed:
            return
        if self._depth:
            raise RuntimeError("cannot disable cache-dit during a call")
        cache_dit = _import_cache_dit()
        tr = self.transformer
        tr.__dict__["forward"] = self._cached_forward  # what cache-dit's release expects to find
        with _quiet():
            cache_dit.disable_cache(tr)
        for m, fwd in zip(self._modules, self._saved):
            if fwd is _MISSING:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = fwd
        self._restore_order()
        tr.__dict__.pop("_jit_cache_dit", None)
        self.removed = True


def enable_cache_dit(pipe, cache_config=None, **options) -> CacheDiT:
    """Attach cache-dit's cache to the JiT pipeline ``pipe`` (this instance only); returns the handle.

    ``cache_config`` (a ``cache_dit.DBCacheConfig``; default: cache-dit's default) and
    ``calibrator_config`` / ``params_modifiers`` mean what they mean to ``cache_dit.enable_cache``.
    Every later call of ``pipe`` (JiT or ``jit=None``) runs with the cache, reset at the start of
    the call and at each JiT stage transition; other pipelines, the pipeline class and anything
    sharing ``pipe.transformer`` outside ``pipe``'s calls are not affected. ``pipe.cache_dit`` is
    the handle while enabled; :func:`disable_cache_dit` removes it.

    JiT calls with true CFG give cond and uncond their own cache state automatically; a
    ``jit=None`` call with true CFG does so only with ``enable_separate_cfg=True`` in the config
    (as with cache-dit on the stock pipeline). Raises ``TypeError`` for a pipeline that is not a
    JiT pipeline, an unknown option or a ``cache_config`` that is not a cache-dit config, and
    ``ValueError`` when the pipeline or its transformer already carries cache-dit.

    Example::

        pipe = enable_jit(FluxPipeline.from_pretrained(...), "4x")
        enable_cache_dit(pipe, cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0,
                                                       max_warmup_steps=1, residual_diff_threshold=0.12))
        image = pipe(prompt).images[0]      # JiT 4x + DBCache
        disable_cache_dit(pipe)
    """
    from .base import JiTPipelineMixin

    if not isinstance(pipe, JiTPipelineMixin):
        raise TypeError(f"enable_cache_dit needs a JiT pipeline (enable_jit(pipe) makes one), got {type(pipe).__name__}")
    if pipe.__dict__.get("cache_dit") is not None:
        raise ValueError("cache-dit is already enabled on this pipeline; disable_cache_dit(pipe) first")
    state = CacheDiT(pipe.transformer, cache_config=cache_config, **options)
    pipe.cache_dit = state
    pipe._call_contexts = (*pipe._call_contexts, state.active)
    return state


def disable_cache_dit(pipe) -> None:
    """Undo :func:`enable_cache_dit` on ``pipe``: the pipeline and its transformer are as before."""
    state = getattr(pipe, "__dict__", {}).get("cache_dit")
    if state is None:
        raise ValueError("cache-dit is not enabled on this pipeline (enable_cache_dit)")
    state.disable()
    rest = tuple(c for c in pipe._call_contexts if c != state.active)
    if rest:
        pipe._call_contexts = rest
    else:
        pipe.__dict__.pop("_call_contexts", None)
    del pipe.__dict__["cache_dit"]


@contextlib.contextmanager
def use_cache_dit(transformer, cache_config=None, **options):
    """cache-dit on a bare FLUX transformer for the ``with`` block, reset at every JiT stage of a
    :class:`~jit_sampler.pipelines.velocity.FluxVelocity` that drives it (the evaluation bench's
    ``TinyVelocity`` is one); removed on exit. Yields the :class:`CacheDiT` handle."""
    state = CacheDiT(transformer, cache_config=cache_config, **options)
    try:
        with state.active():
            yield state
    finally:
        state.disable()
