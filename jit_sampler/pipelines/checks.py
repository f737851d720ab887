"""Input checks shared by the JiT pipelines, run before any model (VAE, text encoder, ControlNet, transformer).

The stock diffusers pipelines check some arguments in ``check_inputs`` and leave the rest to
fail wherever they are first used: a negative ``num_images_per_prompt`` in ``repeat``, an
integer image in the resize, a latent of the wrong shape after the VAE has encoded the image,
a generator that is not one in ``randn_tensor``. Under ``jit=`` every such input raises here
instead, with a message that names the argument: ``TypeError`` for a wrong type or dtype,
``ValueError`` for a wrong shape, size, count or value.

:func:`check_call_arguments` covers the arguments every pipeline shares by name (it is called
by :meth:`~jit_sampler.pipelines.base.JiTPipelineMixin._dispatch` for JiT calls only, so
``jit=None`` is untouched); the other helpers are called by each ``_jit_call`` for the
arguments only it has (images, masks, the expected latent shape).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ..scalar_checks import check_int, check_real, check_sigmas

__all__ = ["check_call_arguments", "check_image_input", "check_latents_shape", "check_preprocessed",
           "check_int", "check_scheduler", "check_token_bucket_backend", "effective_batch",
           "ignored_sigma_options"]


def _check_tensor(name: str, value, dims: tuple) -> None:
    """``None`` or a floating-point tensor with one of the dimension counts ``dims``."""
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(value.shape)}")


def _check_size(name: str, value) -> None:
    if value is None:
        return
    check_int(name, value, minimum=1)


def effective_batch(prompt, prompt_embeds, num_images_per_prompt) -> int | None:
    """``batch * num_images_per_prompt`` (``None`` when the prompt gives no batch: stock ``check_inputs`` refuses)."""
    if isinstance(prompt, str):
        batch = 1
    elif isinstance(prompt, list):
        batch = len(prompt)
    elif isinstance(prompt_embeds, torch.Tensor) and prompt_embeds.dim() >= 1:
        batch = prompt_embeds.shape[0]
    else:
        return None
    return batch * num_images_per_prompt


def _check_embedding_sizes(pipe, a: dict) -> None:
    """Precomputed embeddings: non-empty, one dtype, and as wide as the transformer's text inputs."""
    config = pipe.transformer.config
    widths = {"prompt_embeds": config.get("joint_attention_dim"),
              "negative_prompt_embeds": config.get("joint_attention_dim"),
              "pooled_prompt_embeds": config.get("pooled_projection_dim"),
              "negative_pooled_prompt_embeds": config.get("pooled_projection_dim")}
    given = {k: a[k] for k in widths if a.get(k) is not None}
    for key, t in given.items():
        if 0 in t.shape:
            raise ValueError(f"{key} is empty: shape {tuple(t.shape)}")
        if widths[key] is not None and t.shape[-1] != widths[key]:
            raise ValueError(f"{key} must have {widths[key]} features (the transformer's "
                             f"{'pooled_projection_dim' if 'pooled' in key else 'joint_attention_dim'}), got shape "
                             f"{tuple(t.shape)}")
    if len({t.dtype for t in given.values()}) > 1:
        raise TypeError(f"the precomputed embeddings must share one dtype, got "
                        f"{ {k: str(t.dtype) for k, t in given.items()} }")


def check_call_arguments(pipe, a: dict, explicit_steps: bool) -> None:
    """The arguments every JiT pipeline shares, by name (those ``a`` has): steps, sigmas, images per
    prompt, generators, latents (type only; each pipeline checks the shape), prompt embeddings,
    height / width (positive ints; at least one token unless ``pipe._fits_size``), the attention
    kwargs and the callback."""
    if explicit_steps and "num_inference_steps" in a:
        check_int("num_inference_steps", a["num_inference_steps"])
    if a.get("sigmas") is not None:
        check_sigmas(a["sigmas"])
    if "num_images_per_prompt" in a:
        check_int("num_images_per_prompt", a["num_images_per_prompt"])
    if a.get("max_sequence_length") is not None:
        check_int("max_sequence_length", a["max_sequence_length"])
    for key in ("guidance_scale", "true_cfg_scale"):
        if key in a:
            check_real(key, a[key], allow_none=pipe._stock_call.parameters[key].default is None)
    ip_args = [k for k in ("ip_adapter_image", "ip_adapter_image_embeds", "negative_ip_adapter_image",
                           "negative_ip_adapter_image_embeds") if a.get(k) is not None]
    if ip_args and getattr(pipe.transformer, "encoder_hid_proj", None) is None:
        raise ValueError(f"{ip_args} given, but the transformer has no IP-Adapter: load one first "
                         f"(pipe.load_ip_adapter(...))")
    gen = a.get("generator")
    if gen is not None:
        items = gen if isinstance(gen, list) else [gen]
        if not all(isinstance(g, torch.Generator) for g in items):
            bad = next(g for g in items if not isinstance(g, torch.Generator))
            raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(bad).__name__}")
    _check_tensor("latents", a.get("latents"), (2, 3, 4, 5))
    for key in ("prompt_embeds", "negative_prompt_embeds"):
        _check_tensor(key, a.get(key), (3,))
    for key, of in (("pooled_prompt_embeds", "prompt_embeds"),
                    ("negative_pooled_prompt_embeds", "negative_prompt_embeds")):
        pooled, embeds = a.get(key), a.get(of)
        _check_tensor(key, pooled, (2,))
        if pooled is not None and embeds is not None and pooled.shape[0] != embeds.shape[0]:
            raise ValueError(f"{key} has batch {pooled.shape[0]} but {of} has batch {embeds.shape[0]}")
    _check_embedding_sizes(pipe, a)
    for key in ("height", "width"):
        _check_size(key, a.get(key))
    if not getattr(pipe, "_fits_size", False):
        multiple = pipe.vae_scale_factor * 2
        for key in ("height", "width"):
            if a.get(key) is not None and a[key] < multiple:
                raise ValueError(f"{key} must be at least {multiple} (one {multiple} x {multiple} token), got {a[key]}")
    for key in ("joint_attention_kwargs", "attention_kwargs"):
        if a.get(key) is not None and not isinstance(a[key], Mapping):
            raise TypeError(f"{key} must be a dict or None, got {type(a[key]).__name__}")
    if a.get("callback_on_step_end") is not None and not callable(a["callback_on_step_end"]):
        raise TypeError(f"callback_on_step_end must be callable, got {type(a['callback_on_step_end']).__name__}")
    # A prompt without text encoders cannot be encoded, unless the caller swapped in their own
    # ``encode_prompt`` on this instance (a remote or cached text encoder, a test double).
    if a.get("prompt_embeds") is None and a.get("prompt") is not None and "encode_prompt" not in vars(pipe):
        components = getattr(pipe, "components", {})
        missing = [k for k in ("text_encoder", "text_encoder_2") if k in components and components[k] is None]
        if missing:
            raise ValueError(f"{type(pipe).__name__} has no {' / '.join(missing)}: pass prompt_embeds (and the "
                             f"pipeline's other precomputed embeddings) instead of a prompt")
    total = effective_batch(a.get("prompt"), a.get("prompt_embeds"), a.get("num_images_per_prompt", 1))
    if isinstance(gen, list) and total is not None and len(gen) != total:
        raise ValueError(f"You have passed a list of generators of length {len(gen)}, but requested an effective "
                         f"batch size of {total}. Make sure the batch size matches the length of the generators.")


# The scheduler options that re-space FlowMatchEulerDiscreteScheduler's sigmas, which no FLUX / Qwen
# checkpoint sets (unlike shift, dynamic shifting and Qwen-Image's shift_terminal, part of a model's
# native schedule): honoured from ``set_timesteps`` when the run takes the scheduler's sigmas, replaced
# by the Beta table of ``sigma_schedule="beta"`` otherwise, with a warning (``ignored_sigma_options``).
_SPACING_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
_INTEGRATOR = {  # what each sparse call does instead of scheduler.step()
    "jit": "JiT integrates its own Euler steps (lift + micro-flow) on the scheduler's sigmas and never calls "
           "scheduler.step()",
    "ras": "RAS integrates its own Euler steps (the published RAS scheduler's rule) on the scheduler's sigmas and "
           "never calls scheduler.step()",
}


def check_scheduler(scheduler, arg: str = "jit") -> None:
    """Refuse, before any work, a scheduler whose *update rule* a JiT run would silently replace.

    JiT takes only the sigmas from the scheduler (``set_timesteps``, with every sigma option:
    shift, dynamic shifting, Karras / exponential / Beta spacing, ``shift_terminal``); the step
    itself is its own Euler update with lift and micro-flow (docs/method.md, "Schedulers"). That
    is ``FlowMatchEulerDiscreteScheduler``'s rule, so it is accepted (a subclass too, unless it
    overrides ``step``); a second-order, multistep, consistency or re-noising rule (Heun, LCM,
    DPM-Solver++, UniPC, Euler with ``stochastic_sampling``) raises ``ValueError``, and so do
    ``invert_sigmas`` (increasing sigmas: JiT integrates from noise) and any other scheduler.
    RAS calls (``arg="ras"``) integrate the same Euler rule and get the same check.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler as Euler

    name = type(scheduler).__name__
    how = _INTEGRATOR[arg]
    use = ("use FlowMatchEulerDiscreteScheduler (e.g. pipe.scheduler = "
           f"FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)) or {arg}=None")
    if not isinstance(scheduler, Euler) or type(scheduler).step is not Euler.step:
        raise ValueError(f"{name} is not supported with {arg}=...: {how}, so {name}'s own update rule "
                         f"would be silently replaced by Euler; {use}")
    config = scheduler.config
    if config.get("stochastic_sampling", False):
        raise ValueError(f"{name}(stochastic_sampling=True) is not supported with {arg}=...: {how}, so "
                         f"the stochastic re-noising would be silently dropped; set stochastic_sampling=False "
                         f"(FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, "
                         f"stochastic_sampling=False)) or use {arg}=None")
    if config.get("invert_sigmas", False):
        raise ValueError(f"{name}(invert_sigmas=True) is not supported with {arg}=...: {how}, "
                         f"from noise (sigma 1) to data (sigma 0); set invert_sigmas=False or use {arg}=None")


def ignored_sigma_options(scheduler) -> list[str]:
    """The scheduler's spacing options (``use_karras_sigmas=True``, ...) that a run on the config's
    own Beta schedule does not use, as ``name=value`` strings."""
    config = getattr(scheduler, "config", {})
    return [f"{k}={config[k]!r}" for k in _SPACING_OPTIONS if config.get(k)]


_IMAGE_TYPES = (torch.Tensor, np.ndarray)


def check_image_input(name: str, image, *, required: bool = True) -> None:
    """A ``PipelineImageInput`` before preprocessing: a PIL image, a numpy array or a floating-point
    tensor (2 to 4 dims), or a non-empty list of one kind of them."""
    from PIL import Image

    if image is None:
        if required:
            raise ValueError(f"`{name}` is required (got None)")
        return
    items = image if isinstance(image, list) else [image]
    if not items:
        raise ValueError(f"{name}: an empty list")
    kinds = set()
    for it in items:
        if isinstance(it, Image.Image):
            kinds.add(Image.Image)
            continue
        if not isinstance(it, _IMAGE_TYPES):
            raise TypeError(f"{name}: expected a PIL image, a numpy array or a torch tensor (or a list of one kind), "
                            f"got {type(it).__name__}")
        kinds.add(type(it))
        if it.ndim not in (2, 3, 4):
            raise ValueError(f"{name}: an array / tensor must have 2 to 4 dimensions, got shape {tuple(it.shape)}")
        if isinstance(it, torch.Tensor) and not it.is_floating_point():
            raise TypeError(f"{name}: a tensor must be floating point (values in [0, 1] or [-1, 1]), got {it.dtype}")
        if isinstance(it, np.ndarray) and it.dtype.kind not in "fiub":
            raise TypeError(f"{name}: an array must hold numbers, got dtype {it.dtype}")
    if len(kinds) > 1:
        raise TypeError(f"{name}: a list must hold one kind of image, got {sorted(k.__name__ for k in kinds)}")


def check_preprocessed(name: str, t: torch.Tensor, channels: tuple, total: int, what: str = "images") -> None:
    """A preprocessed image / mask ``[b, C, H, W]``: ``C`` one of ``channels`` and ``b`` dividing ``total``."""
    if t.shape[1] not in channels:
        raise ValueError(f"{name} must have {' or '.join(map(str, channels))} channels, got shape {tuple(t.shape)}")
    if t.shape[0] < 1 or total % t.shape[0]:
        raise ValueError(f"{name}: {t.shape[0]} {what} cannot be repeated to a total batch size of {total} "
                         f"(prompts x num_images_per_prompt)")


def check_latents_shape(latents, shape: tuple, what: str) -> None:
    """Given ``latents`` must have exactly ``shape`` (``what`` says which layout it is)."""
    if latents is not None and tuple(latents.shape) != tuple(shape):
        raise ValueError(f"latents must be {what} of shape {tuple(shape)} (B = {shape[0]}: prompts x "
                         f"num_images_per_prompt), got {tuple(latents.shape)}")


# diffusers attention backends (``transformer.set_attention_backend(name)``, the ``attention_backend``
# context manager, ``DIFFUSERS_ATTN_BACKEND``) that apply ``token_bucket``'s boolean key-padding
# mask ``[B, 1, 1, keys]`` as given (diffusers 0.42: SDPA's and flex's). The varlen kernels turn a mask
# into per-row key counts, which is right only while the padding is the last keys: true without
# context parallelism, not under Ulysses (the padding sits in every rank's chunk, see
# :func:`~jit_sampler.pipelines.parallel.padding_keep`). Every other backend is refused: the flash,
# sage, aiter and XLA kernels raise on any mask inside the first transformer call, and xformers
# would read the boolean mask as an additive bias (a silent wrong answer).
_MASK_BACKENDS = frozenset({"native", "_native_math", "_native_efficient", "_native_cudnn", "flex"})
_TRAILING_PAD_BACKENDS = frozenset({"flash_varlen", "flash_varlen_hub", "_flash_varlen_3", "_flash_3_varlen_hub",
                                    "sage_varlen"})


def _attention_backends(transformer) -> set:
    """The diffusers attention backends ``transformer``'s attention processors run (an anchor-attention
    processor's fallback included): a processor's own ``_attention_backend``, else the active one."""
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    except ImportError:  # pragma: no cover - a diffusers without attention backends
        return set()
    active = _AttentionBackendRegistry.get_active_backend()[0]
    names = set()
    for module in transformer.modules():
        proc = getattr(module, "processor", None)
        for p in (proc, getattr(proc, "fallback", None)):
            if p is not None and hasattr(p, "_attention_backend"):
                backend = p._attention_backend or active
                names.add(getattr(backend, "value", backend))
    return names


def check_token_bucket_backend(transformer, token_bucket: int) -> None:
    """``token_bucket`` pads the image tokens and masks the padding keys: refuse, before any model runs,
    an attention backend that takes no such mask (``ValueError`` saying what to do)."""
    if not token_bucket:
        return
    from .parallel import context_parallel_degree

    allowed = _MASK_BACKENDS if context_parallel_degree(transformer) > 1 else _MASK_BACKENDS | _TRAILING_PAD_BACKENDS
    bad = sorted(_attention_backends(transformer) - allowed)
    if bad:
        raise ValueError(f"token_bucket={token_bucket} masks its padding tokens with an attention mask, which the "
                         f"transformer's attention backend {' / '.join(map(repr, bad))} does not take"
                         f"{' under context parallelism' if context_parallel_degree(transformer) > 1 else ''}: use "
                         f"token_bucket=0 (JiTConfig(..., token_bucket=0)), or an attention backend that takes a mask "
                         f"(transformer.set_attention_backend(\"native\"); backends that do: {sorted(allowed)})")
