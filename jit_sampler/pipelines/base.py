"""What every JiT pipeline shares: the ``jit=`` dispatch, the schedule, the denoising call, the report.

A JiT pipeline is a diffusers pipeline class with :class:`JiTPipelineMixin` in front of it.
The mixin owns everything that is not specific to one model family:

- ``jit=None`` calls the stock ``__call__`` untouched; a preset name or a
  :class:`~jit_sampler.JiTConfig` goes to the subclass's ``_jit_call`` with every stock
  argument bound to its name (``_dispatch``), after the arguments every pipeline shares have
  been checked (:func:`~jit_sampler.pipelines.checks.check_call_arguments`: a clear
  ``TypeError`` / ``ValueError`` before any model runs; ``token_bucket`` against the
  transformer's attention backend, :func:`~jit_sampler.pipelines.checks.check_token_bucket_backend`);
- the step count (the config's, unless the caller passed ``num_inference_steps`` or
  ``sigmas``) and the scheduler's own shifted sigmas (``_scheduler_sigmas``);
- :func:`~jit_sampler.jit_sample` under the progress bar with ``interrupt`` and
  ``callback_on_step_end`` (``_denoise``);
- the report's phase times and FLOPs (``_finish_report``).

Subclasses set ``_stock_class`` (the diffusers pipeline they extend); that registers them
for :func:`enable_jit`, which picks the most specific registered class for a pipeline and
builds it over the pipeline's own components and state (:func:`_share`, not ``from_pipe``).
``save_pretrained`` names the stock class in ``model_index.json``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..config import JiTConfig
from ..report import JiTReport, flop_summary
from ..sampler import jit_sample
from ..schedule import beta_sigmas
from .checks import check_call_arguments, check_scheduler, check_token_bucket_backend, ignored_sigma_options
from .parallel import check_context_parallel, context_parallel_degree
from .velocity import FluxVelocity

try:  # diffusers >= 0.36: the device a (possibly offloaded) module runs on
    from diffusers.utils.torch_utils import get_module_execution_device as execution_device
except ImportError:  # pragma: no cover - older diffusers
    def execution_device(module):
        return module.device

__all__ = ["JiTPipelineMixin", "enable_jit", "execution_device", "per_image", "UNSET"]

UNSET = object()
_REGISTRY: list[type] = []  # JiT pipeline classes, in definition order


def per_image(t: torch.Tensor, total: int) -> torch.Tensor:
    """``[B, ...] -> [total, ...]`` by repeating each prompt's row ``total / B`` times (no-op when equal)."""
    if t.shape[0] == total or total % t.shape[0]:
        return t
    return t.repeat_interleave(total // t.shape[0], dim=0)


def _callback_outputs(outputs, step: int) -> dict:
    """What ``callback_on_step_end`` returned, as a new dict (``None`` -> ``{}``; the caller's dict is not popped)."""
    if outputs is None:
        return {}
    if not isinstance(outputs, Mapping):
        raise TypeError(f"callback_on_step_end must return a dict (or None), got {type(outputs).__name__} at step "
                        f"{step}")
    return dict(outputs)


def _replacement(new, old: torch.Tensor, name: str, step: int) -> torch.Tensor:
    """A tensor a callback hands back for ``name``: the shape of the one it replaces (a clear error, not a
    shape mismatch inside the next transformer call)."""
    if not isinstance(new, torch.Tensor) or new.shape != old.shape:
        raise ValueError(f"callback_on_step_end returned {name} of shape "
                         f"{tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__} at step {step}; "
                         f"a replacement must have the shape {tuple(old.shape)}")
    return new


class JiTPipelineMixin:
    """The shared half of every JiT pipeline (see the module docstring).

    Subclasses set ``_stock_class`` and ``_stock_call`` (the stock ``__call__`` signature),
    and implement ``_jit_call(cfg, *, explicit_steps, **stock_arguments)`` and, when they use
    the scheduler's schedule, ``_shift_mu(image_seq_len, steps)``.
    """

    _default_jit = None
    last_jit_report = None
    _stock_class: type | None = None
    _stock_call: inspect.Signature
    _call_contexts: tuple = ()  # per-instance: context-manager factories entered around each call

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("_stock_class") is not None:
            _REGISTRY.append(cls)

    def to_json_string(self) -> str:
        """``model_index.json`` names the stock class (``FluxPipeline``, ...), not the JiT one, so a folder
        ``save_pretrained`` writes loads with stock ``DiffusionPipeline.from_pretrained`` (and with
        ``JiTXxx.from_pretrained``, which picks its own class). The JiT default (``enable_jit``'s preset)
        is not saved: it is not part of the stock pipeline."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = self._stock_class.__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def _dispatch(self, stock_call, args, kwargs, jit):
        # Per-instance wrappers around every call, JiT or stock (enable_cache_dit installs one):
        # context-manager factories in the instance's own ``_call_contexts``, never on the class.
        if self._call_contexts:
            with contextlib.ExitStack() as stack:
                for make in self._call_contexts:
                    stack.enter_context(make())
                return self._dispatch_now(stock_call, args, kwargs, jit)
        return self._dispatch_now(stock_call, args, kwargs, jit)

    def _dispatch_now(self, stock_call, args, kwargs, jit):
        if jit is UNSET:
            jit = self._default_jit
        cfg = JiTConfig.coerce(jit)
        if cfg is None:
            self.last_jit_report = None
            return stock_call(*args, **kwargs)
        a, explicit_steps = self._bound_arguments(args, kwargs)
        check_token_bucket_backend(self.transformer, cfg.token_bucket)
        return self._jit_call(cfg, explicit_steps=explicit_steps, **a)

    def _bound_arguments(self, args, kwargs, arg: str = "jit") -> tuple[dict, bool]:
        """Every stock argument of a sparse call (JiT or RAS) bound to its name, defaults applied, after
        the checks every such call shares (scheduler, call arguments), before any model runs; and
        whether the caller passed ``num_inference_steps`` explicitly. ``arg``: the argument that asked
        for the sparse call (``"jit"`` or ``"ras"``), named in the errors."""
        bound = self._stock_call.bind(self, *args, **kwargs)
        explicit_steps = "num_inference_steps" in bound.arguments
        bound.apply_defaults()
        a = dict(bound.arguments)
        a.pop("self")
        check_scheduler(self.scheduler, arg)
        check_call_arguments(self, a, explicit_steps)
        return a, explicit_steps

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

    def _default_size(self, height, width) -> tuple[int, int]:
        """``(height, width)`` with the stock default (``default_sample_size * vae_scale_factor``) for a missing one."""
        size = self.default_sample_size * self.vae_scale_factor
        return height or size, width or size

    def _token_grid(self, height, width) -> tuple[int, int]:
        """The packed token grid of a ``height x width`` image (2 x 2 latent patches; odd latent sizes round down)."""
        return int(height) // (self.vae_scale_factor * 2), int(width) // (self.vae_scale_factor * 2)

    @staticmethod
    def _steps_config(cfg: JiTConfig, sigmas, explicit_steps: bool, num_inference_steps) -> JiTConfig:
        """The config's steps, unless the caller chose ``sigmas`` or ``num_inference_steps`` explicitly."""
        if sigmas is not None:
            return cfg.replace(total_steps=len(sigmas))
        if explicit_steps and num_inference_steps != cfg.total_steps:
            return cfg.replace(total_steps=int(num_inference_steps))
        return cfg

    def _shift_mu(self, image_seq_len: int, steps: int) -> float:
        raise NotImplementedError

    def _schedule(self, cfg: JiTConfig, sigmas, explicit_steps: bool, num_inference_steps, image_seq_len: int,
                  device, *, beta: bool = True) -> tuple[JiTConfig, list[float]]:
        """``(config, sigmas)`` of a run from pure noise: the config with the step count of
        :meth:`_steps_config`, and the Beta schedule (``sigma_schedule="beta"`` without explicit
        ``sigmas``, unless ``beta=False``: a pipeline that always keeps its own) or the scheduler's
        own (:meth:`_scheduler_sigmas`). Sets ``_num_timesteps``."""
        cfg = self._steps_config(cfg, sigmas, explicit_steps, num_inference_steps)
        sig = self._run_sigmas(cfg, cfg.total_steps, sigmas, image_seq_len, device, beta=beta)
        self._num_timesteps = cfg.total_steps
        return cfg, sig

    def _run_sigmas(self, cfg: JiTConfig, steps: int, sigmas, image_seq_len: int, device, *,
                    beta: bool = True) -> list[float]:
        """The ``steps + 1`` sigmas of a run from pure noise: the config's Beta table
        (``sigma_schedule="beta"``, no explicit ``sigmas``, ``beta`` allowed), else the scheduler's
        own (:meth:`_scheduler_sigmas`, every sigma option of the scheduler honoured).

        The Beta table replaces the scheduler's spacing: a scheduler configured with one
        (``use_karras_sigmas``, ...; :func:`~.checks.ignored_sigma_options`) gets a warning that
        names it and the way to keep it (``sigma_schedule="pipeline"``)."""
        if beta and cfg.sigma_schedule == "beta" and sigmas is None:
            ignored = ignored_sigma_options(self.scheduler)
            if ignored:
                warnings.warn(f"{type(self).__name__}: the JiT config's Beta sigma schedule (sigma_schedule='beta', "
                              f"the presets' default) replaces the scheduler's {', '.join(ignored)}; pass "
                              f"JiTConfig.preset(..., sigma_schedule='pipeline') to integrate on the scheduler's "
                              f"sigmas instead", UserWarning, stacklevel=2)
            return beta_sigmas(steps, cfg.beta_alpha, cfg.beta_beta)
        return self._scheduler_sigmas(steps, sigmas, image_seq_len, device)

    def _check_context_parallel(self, cfg: JiTConfig, height, width, *embeds, extra: int = 0) -> None:
        """Refuse, before any model runs, a run a context-parallel transformer cannot split (:mod:`.parallel`).

        Checks the stage token counts of the ``height x width`` image (the pipeline defaults when
        ``None``) and the text length of the precomputed ``embeds`` given; encoded prompts are
        checked again before the first transformer call (``_denoise``). ``extra``: reference tokens
        that ride along in every call. No-op without context parallelism.
        """
        if context_parallel_degree(self.transformer) == 1:
            return
        grid_h, grid_w = self._token_grid(*self._default_size(height, width))
        check_context_parallel(self.transformer, [c + extra for c in cfg.token_counts(max(1, grid_h * grid_w))],
                               [e.shape[1] for e in embeds if e is not None], token_bucket=cfg.token_bucket)

    def _scheduler_sigmas(self, steps: int, sigmas, image_seq_len: int, device) -> list[float]:
        """The sigmas the stock pipeline would integrate: ``steps + 1`` floats ending at 0.

        As the stock pipelines call it: ``set_timesteps`` with ``linspace(1, 1/steps, steps)`` (or the
        caller's ``sigmas``) and ``mu`` from ``_shift_mu``, so every sigma option of the scheduler
        (shift, dynamic shifting, Karras / exponential / Beta spacing, ``shift_terminal``) applies;
        a scheduler with ``use_flow_sigmas`` makes its own from the step count."""
        s = np.linspace(1.0, 1 / steps, steps) if sigmas is None else sigmas
        mu = self._shift_mu(image_seq_len, steps)
        if self.scheduler.config.get("use_flow_sigmas", False):  # the scheduler makes its own sigmas
            self.scheduler.set_timesteps(steps, device=device, mu=mu)
        else:  # as diffusers' retrieve_timesteps(scheduler, sigmas=s, mu=mu)
            self.scheduler.set_timesteps(sigmas=s, device=device, mu=mu)
        out = [float(v) for v in self.scheduler.sigmas.cpu().tolist()]
        if len(out) == steps:  # schedulers that do not append the terminal sigma
            out.append(0.0)
        return out[: steps + 1]

    def _timesteps(self, sig, device):
        """``1000 * sigma`` per step for ``current_timestep`` and callbacks (one transfer, not one per step),
        and the ``pre_call`` hook that sets ``current_timestep``."""
        timesteps = torch.tensor([1000.0 * s for s in sig[:-1]], device=device)

        def set_timestep(step: int, sigma: float):
            self._current_timestep = timesteps[step]

        return timesteps, set_timestep

    def _denoise(self, velocity: FluxVelocity, latents, grid_h: int, grid_w: int, sig, cfg: JiTConfig, generator,
                 timesteps, callback_on_step_end, callback_on_step_end_tensor_inputs, post_step=None):
        """:func:`jit_sample` under the pipeline's progress bar, ``interrupt`` and ``callback_on_step_end``
        (which may replace ``latents`` and ``prompt_embeds``). ``post_step(i, y) -> y``, when given, edits
        the full latent after each step, before the callback (inpainting's blend of the known region).
        A context-parallel transformer that cannot split every stage's sequence is refused first
        (:mod:`.parallel`)."""
        neg = velocity.negative
        texts = [velocity.prompt_embeds.shape[1]] + ([] if neg is None else [neg[0].shape[1]])
        refs = getattr(velocity, "ref_tokens", None)  # reference tokens ride along in every call
        extra = 0 if refs is None else refs.shape[1]
        check_context_parallel(velocity.transformer, [c + extra for c in cfg.token_counts(grid_h * grid_w)], texts,
                               token_bucket=cfg.token_bucket)
        with self.progress_bar(total=cfg.total_steps) as progress_bar:
            def on_step(i: int, sigma: float, y: torch.Tensor):
                new_latents = None
                if post_step is not None:
                    y = new_latents = post_step(i, y)
                if callback_on_step_end is not None:
                    avail = {"latents": y, "prompt_embeds": velocity.prompt_embeds}
                    callback_kwargs = {k: avail[k] for k in callback_on_step_end_tensor_inputs}
                    outputs = _callback_outputs(callback_on_step_end(self, i, timesteps[i], callback_kwargs), i)
                    new_latents = outputs.pop("latents", new_latents)
                    if "prompt_embeds" in outputs:
                        velocity.prompt_embeds = _replacement(outputs.pop("prompt_embeds"), velocity.prompt_embeds,
                                                              "prompt_embeds", i)
                progress_bar.update()
                return new_latents

            latents, report = jit_sample(velocity, latents, grid_h, grid_w, sig, cfg, generator,
                                         step_callback=on_step, interrupt=lambda: self.interrupt)
        self._current_timestep = None
        return latents, report

    def _finish_report(self, report: JiTReport, times: tuple[float, float, float, float], num_tokens: int,
                       text_tokens: int, calls_per_step: int, ref_tokens=0) -> None:
        """Phase times from ``(start, encoded, sampled, end)``, FLOPs per sample; stored as ``last_jit_report``.

        ``ref_tokens``: reference-image tokens run in full in every call (an int) or per step (a
        list), counted as dense image tokens in the JiT run and in the dense baselines."""
        t0, t_encoded, t_sampled, t_end = times
        report.phase_times = {"encode": t_encoded - t0, "sample": t_sampled - t_encoded, "decode": t_end - t_sampled,
                              "total": t_end - t0}
        try:
            report.flops = flop_summary(self.transformer.config, report.active_tokens, num_tokens,
                                        text_tokens=int(text_tokens), calls_per_step=calls_per_step,
                                        extra_tokens=ref_tokens)
        except (TypeError, KeyError, AttributeError):  # a transformer without FLUX's config keys
            report.flops = {}
        self.last_jit_report = report

    def _finish_call(self, report: JiTReport, image, times: tuple[float, float, float], num_tokens: int,
                     text_tokens: int, calls_per_step: int, return_dict: bool, output_class, ref_tokens=0):
        """The end of every ``_jit_call``: free the offloaded models, finish the report (times
        ``(start, encoded, sampled)``, the end stamped now; :meth:`_finish_report`) and return
        ``(image,)`` or ``output_class(images=image)`` as the stock pipeline does."""
        self.maybe_free_model_hooks()
        self._finish_report(report, (*times, time.perf_counter()), num_tokens, text_tokens,
                            calls_per_step=calls_per_step, ref_tokens=ref_tokens)
        if not return_dict:
            return (image,)
        return output_class(images=image)


def enable_jit(pipe, jit: Any = "4x"):
    """A JiT pipeline sharing ``pipe``'s components whose calls default to ``jit``.

    ``pipe`` is a ``FluxPipeline`` (-> :class:`~jit_sampler.JiTFluxPipeline`), a
    ``Flux2KleinPipeline`` (-> :class:`~jit_sampler.JiTFlux2KleinPipeline`), or any other stock
    pipeline a JiT class of :mod:`jit_sampler.pipelines` extends (Kontext, FLUX.2-klein KV,
    Qwen-Image, ...); the most specific registered JiT pipeline for ``type(pipe)`` is chosen.
    ``enable_jit(pipe, "4x")(prompt)`` runs the 4x preset; ``(..., jit=None)`` still runs the stock pipeline. ``pipe`` itself is
    not changed (unless it already is a JiT pipeline, whose default is then updated and which
    is returned).

    The new pipeline holds ``pipe``'s very modules as they are (bf16 / fp16, fp8 layerwise
    casting, torchao / quanto / GGUF / bitsandbytes quantization, devices, hooks, attention
    processors) and carries its pipeline-level state (model offload hooks, progress bar config,
    ...), so ``maybe_free_model_hooks`` at the end of a call works as on ``pipe``; see
    :func:`_share`. Its ``save_pretrained`` writes a stock folder (``to_json_string``).
    """
    cfg = JiTConfig.coerce(jit)
    from . import _PIPELINE_MODULES, _load_all  # every JiT pipeline module registers its class on import

    _load_all()
    order = {f"{__package__}.{m}": k for k, m in enumerate(_PIPELINE_MODULES)}  # the package's own classes first
    known = sorted(_REGISTRY, key=lambda c: order.get(c.__module__, len(order)))
    mro = type(pipe).__mro__
    candidates = [c for c in known if isinstance(pipe, c._stock_class)]
    if not candidates:
        names = " or ".join(c._stock_class.__name__ for c in known)
        raise TypeError(f"enable_jit needs a {names}, got {type(pipe).__name__}")
    cls = min(candidates, key=lambda c: mro.index(c._stock_class))
    out = pipe if isinstance(pipe, cls) else _share(cls, pipe)
    out._default_jit = cfg
    return out


def _share(cls, pipe):
    """A ``cls`` pipeline over ``pipe``'s own components and pipeline-level state; ``pipe`` is not changed.

    diffusers' ``from_pipe`` is not used: it ends with ``.to(torch_dtype)`` (float32 unless told
    otherwise), which upcasts a bf16 / fp16 pipeline (the caller's too: the modules are shared),
    widens fp8 layerwise-cast storage and refuses quantized models, and its new pipeline starts
    without the offload hooks and progress bar settings. Here nothing is cast, moved or re-hooked:

    - the components are ``pipe.components`` themselves, the ``__init__`` options (FLUX.2-klein's
      ``is_distilled``, ...) come from ``pipe.config``, and every other config entry
      (``_name_or_path``, the private ones ``from_pipe`` leaves) is registered as it is;
    - every instance attribute ``pipe`` holds that ``cls.__init__`` did not set is carried over:
      the model-offload hooks and device (``_all_hooks``, ``_offload_device``,
      ``_offload_gpu_id``), ``hf_device_map``, ``quantization_config``, the progress bar config,
      and whatever a later diffusers keeps there. Lists, dicts and sets are copied one level, so
      the two pipelines share the hook objects (which act on the shared modules) but not the
      containers. Sequential and group offload hooks live on the modules and come with them.
    """
    expected, optional = cls._get_signature_keys(cls)
    components = pipe.components
    config = dict(pipe.config)
    kwargs = {k: components[k] for k in expected if k in components}
    for k in optional:
        for key in (k, f"_{k}"):  # ``_k``: an option ``from_pipe`` kept from another class
            if key in config:
                kwargs[k] = config[key]
                break
    # A stock __init__ may set processors on the shared modules (Flux2KleinKVPipeline installs fresh
    # KV attention processors, dropping e.g. an attention backend set on the caller's): put the
    # caller's own processor objects back.
    processors = [(m, m.processor) for c in components.values() if isinstance(c, torch.nn.Module)
                  for m in c.modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]
    out = cls(**kwargs)
    for module, proc in processors:
        if module.processor is not proc:
            module.set_processor(proc)
    rest = {k: v for k, v in config.items() if k not in out.config and k.lstrip("_") not in kwargs}
    if rest:
        out.register_to_config(**rest)
    made = set(vars(out))
    for key, value in vars(pipe).items():
        if key in made or key in components:
            continue
        setattr(out, key, type(value)(value) if type(value) in (list, dict, set) else value)
    return out
