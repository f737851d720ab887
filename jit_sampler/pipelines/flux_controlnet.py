"""JiT for diffusers' FLUX.1 ControlNet pipeline: ``JiTFluxControlNetPipeline``.

``JiTFluxControlNetPipeline(...)(..., jit=None)`` is exactly ``FluxControlNetPipeline.__call__``.
With ``jit`` (a preset name or a :class:`~jit_sampler.JiTConfig`) the denoising loop is
:func:`jit_sampler.jit_sample`, and at every step the ControlNet runs on the *same* active
tokens as the transformer (:class:`FluxControlNetVelocity`):

- the packed control latents ``[B, N, C]`` (the VAE-encoded control image, as the stock
  pipeline prepares it) are gathered with the active indices, once per stage;
- the ControlNet is called with the active latent tokens, their control tokens and their own
  ``img_ids`` rows. Its residuals (``controlnet_block_samples`` after every double block,
  ``controlnet_single_block_samples`` after every single block) are per *image* token
  ``[B, M, D]``: in diffusers 0.42 both FLUX block types return the text and image streams
  separately, so the single-block residuals carry no text rows. They therefore line up row
  by row with the transformer's active tokens, and the ControlNet's cost shrinks with the
  token count exactly as the transformer's does;
- ``controlnet_conditioning_scale``, ``control_guidance_start`` / ``control_guidance_end`` (the
  stock per-step ``controlnet_keep`` schedule over the JiT steps), the union ControlNet's
  ``control_mode`` and ``FluxMultiControlNetModel`` behave as in the stock pipeline; under true
  CFG the ControlNet runs once per step on the positive prompt and both branches get its
  residuals (as stock). A step whose effective scale is 0 for every ControlNet skips the
  ControlNet call (stock adds ``0 * residual``, which changes nothing).

Why JiT keeps ControlNet intact where RAS-style samplers do not: region-adaptive samplers
(RAS and relatives) recompute only a "focus" subset of tokens per step, picked from the
model's own output, and reuse the previous step's cached output (and cached attention keys /
values) for every other token. ControlNet residuals are added per token inside the network,
so (a) the frozen tokens keep outputs computed under an earlier step's timestep and residuals,
(b) the cached context the focus tokens attend to was never produced with the current
residuals (keeping it consistent would need a ControlNet that caches in step with the
transformer, which the stock one does not), and (c) the focus follows what the model finds
uncertain, not the control layout, so regions whose structure only the control image fixes
can stay frozen. JiT caches nothing across steps: each step evaluates transformer *and*
ControlNet on one active set spread over the whole image (a lattice plus the border, then
ITA picks), every evaluated token gets its own residual at its own RoPE position, the other
tokens take a velocity interpolated from those controlled anchors, and the last stage runs
every token through both networks. The control signal therefore acts at every step and, by
the end, on every token.

XLabs-style ControlNets (with an ``input_hint_block``) take the *pixel* control image and
turn it into tokens inside their ``forward`` (a small conv encoder, then ``patch_size``
patches), on every step. Under JiT that hint encoder runs once per call on the full image
(its result does not depend on the step); at every step the hint tokens of the active set
are handed to the ControlNet through a forward hook on ``input_hint_block`` that is in place
only for that call (the ControlNet's own weights and code are untouched), and the
transformer gets ``controlnet_blocks_repeat=True`` as in the stock pipeline.

Not supported with ``jit=...`` (``NotImplementedError``, raised before any work):
``token_bucket`` padding (diffusers' ControlNet does not forward ``joint_attention_kwargs``
to its blocks, so padded tokens could not be masked out of its attention and would change
the residuals of the real tokens); a multi-ControlNet mixing hint-encoder and latent
ControlNets (the stock pipeline cannot run it either); a hint encoder whose token grid is not
the latent token grid; and a ``callback_on_step_end`` that asks for ``control_image`` with a
hint-encoder ControlNet (the stock callback sees pixels, the JiT loop holds tokens).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import time

import numpy as np
import PIL.Image
import torch
from diffusers import FluxControlNetModel, FluxControlNetPipeline
from diffusers.models.controlnets.controlnet_flux import FluxMultiControlNetModel
from diffusers.pipelines.flux.pipeline_flux_controlnet import retrieve_latents

import jit_kernels as jk

from ..config import JiTConfig
from ..report import flop_summary
from ..scalar_checks import check_real, is_integer
from .flux1_common import Flux1JiTMixin
from .velocity import FluxVelocity

__all__ = ["FluxControlNetVelocity", "JiTFluxControlNetPipeline"]

_IMAGE_TYPES = (PIL.Image.Image, np.ndarray, torch.Tensor)


class _WithResiduals:
    """The transformer, called with the current step's ControlNet residuals added to its inputs.

    :class:`FluxVelocity` calls ``self.transformer(...)``; during one ``_forward`` this stand-in
    takes its place, forwards every attribute (``cache_context``, ``dtype``, ...) to the real
    module and calls it with ``extra`` keyword arguments on top.
    """

    def __init__(self, module, extra: dict):
        self._module = module
        self._extra = extra

    def __call__(self, *args, **kwargs):
        return self._module(*args, **kwargs, **self._extra)

    def __getattr__(self, name):
        return getattr(self._module, name)


def _patchify(hint: torch.Tensor, p: int) -> torch.Tensor:
    """Hint-encoder map ``[B, C, H, W]`` -> tokens ``[B, (H / p) (W / p), C p p]``, row-major (as the ControlNet's
    forward patchifies it)."""
    b, c, h, w = hint.shape
    patches = hint.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // p) * (w // p), c * p * p)


def _as_hint_map(tokens: torch.Tensor, p: int) -> torch.Tensor:
    """Tokens ``[B, M, C p p]`` -> a ``[B, C, p, M p]`` map that :func:`_patchify` turns back into exactly ``tokens``
    (a 1 x M strip of patches): what the hint hook returns so that the ControlNet's forward sees these tokens."""
    b, m, cpp = tokens.shape
    c = cpp // (p * p)
    return tokens.reshape(b, 1, m, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, p, m * p)


@contextlib.contextmanager
def _hint_override(nets: list, tokens: list):
    """While active, ``nets[k].input_hint_block`` returns (the map of) ``tokens[k]``, in call order.

    A forward hook replaces the hint encoder's output, so the ControlNet's own forward patchifies
    the given tokens back out; a net called several times (one union net, several conditions) pops
    its entries in order. The hooks are removed on exit.
    """
    queues: dict[int, tuple] = {}
    for net, tok in zip(nets, tokens):
        block = net.input_hint_block
        queues.setdefault(id(block), (block, []))[1].append(_as_hint_map(tok, net.config.patch_size))
    handles = [block.register_forward_hook(lambda mod, args, out, q=q: q.pop(0)) for block, q in queues.values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class FluxControlNetVelocity(FluxVelocity):
    """:class:`FluxVelocity` whose transformer gets ControlNet residuals computed on the same active tokens.

    Args (besides :class:`FluxVelocity`'s):
        controlnet: a ``FluxControlNetModel`` or ``FluxMultiControlNetModel``.
        control: packed control latents ``[B, N, C]`` (one tensor), or a list of them for a
            ``FluxMultiControlNetModel`` (one per condition).
        control_mode: what the stock pipeline passes as ``controlnet_mode`` (``[B, 1]``, a list
            of ``[B]``, or ``None``).
        conditioning_scale: a float, or a list of floats (one per condition).
        controlnet_keep: per step, the stock keep factor (a float, or a list per condition).
        controlnet_guidance: ``[B]`` embedded guidance for the ControlNet, or ``None``.
        blocks_repeat: the transformer's ``controlnet_blocks_repeat``.
        hint_nets: for hint-encoder (XLabs) ControlNets, the net of each condition; ``control``
            then holds their hint tokens and reaches them through :func:`_hint_override`.

    ``controlnet_calls`` counts ControlNet forwards and ``controlnet_tokens`` the image tokens
    of each (per sample). The control tokens are gathered once per stage (the loop keeps one
    index tensor per stage); :meth:`set_control` replaces the control latents between steps.
    """

    def __init__(self, transformer, controlnet, control, prompt_embeds, pooled_prompt_embeds, text_ids, img_ids, *,
                 control_mode=None, conditioning_scale=1.0, controlnet_keep=(), controlnet_guidance=None,
                 blocks_repeat: bool = False, hint_nets: list | None = None, **kwargs):
        if kwargs.get("token_bucket"):
            raise NotImplementedError(
                "token_bucket cannot be combined with a ControlNet: diffusers' FluxControlNetModel does not pass "
                "joint_attention_kwargs (the padding mask) to its blocks, so padded tokens would change its residuals")
        super().__init__(transformer, prompt_embeds, pooled_prompt_embeds, text_ids, img_ids, **kwargs)
        self.controlnet = controlnet
        self.multi = isinstance(control, (list, tuple))
        self.control = list(control) if self.multi else [control]
        self.control_mode = control_mode
        self.conditioning_scale = conditioning_scale
        self.controlnet_keep = list(controlnet_keep)
        self.controlnet_guidance = controlnet_guidance
        self.blocks_repeat = bool(blocks_repeat)
        self.hint_nets = hint_nets
        self.controlnet_calls = 0
        self.controlnet_tokens: list[int] = []
        self._active = None
        self._step = 0
        self._rows_key = None
        self._rows = None

    def set_control(self, control) -> None:
        """Replace the control latents (e.g. from ``callback_on_step_end``); same shapes as before."""
        new = list(control) if isinstance(control, (list, tuple)) else [control]
        if len(new) != len(self.control) or any(
                not isinstance(n, torch.Tensor) or n.shape != c.shape for n, c in zip(new, self.control)):
            raise ValueError("a replacement control_image must have the shapes of the packed control latents "
                             f"{[tuple(c.shape) for c in self.control]}")
        self.control = new
        self._rows_key = self._rows = None

    def _scale(self, step: int):
        """The effective ``conditioning_scale`` at ``step`` (as the stock loop computes ``cond_scale``)."""
        keep = self.controlnet_keep[step]
        if isinstance(keep, list):
            return [c * k for c, k in zip(self.conditioning_scale, keep)]
        s = self.conditioning_scale
        return (s[0] if isinstance(s, list) else s) * keep

    def _control_rows(self, m: int, sl):
        """The control tokens of the current active set, samples ``sl``: one ``[b, m, C]`` per condition."""
        if m == self.img_ids.shape[0]:  # dense stage: every token in grid order
            return [c[sl] for c in self.control]
        if self._rows_key is not self._active:
            self._rows = [jk.gather_tokens(c, self._active, backend=self.backend) for c in self.control]
            self._rows_key = self._active
        return [r[sl] for r in self._rows]

    def _residuals(self, x, ids, sl, sigma) -> dict:
        scale = self._scale(self._step)
        if all(s == 0 for s in (scale if isinstance(scale, list) else [scale])):
            return {}
        b = x.shape[0]
        cond = self._control_rows(x.shape[1], sl)
        t = torch.full((b,), sigma * 1000.0, device=x.device, dtype=torch.float32).to(x.dtype)
        mode = self.control_mode
        if mode is not None:
            mode = [md[sl] for md in mode] if isinstance(mode, list) else mode[sl]
        guidance = None if self.controlnet_guidance is None else self.controlnet_guidance[sl]
        hook = contextlib.nullcontext()
        if self.hint_nets is not None:  # the hint encoder gets a tiny stand-in; its hook returns our tokens
            hook = _hint_override(self.hint_nets, cond)
            cond = [net.input_hint_block.conv_in.weight.new_zeros(b, net.input_hint_block.conv_in.in_channels, 8, 8)
                    for net in self.hint_nets]
        with hook:
            blocks, singles = self._call_controlnet(x, ids, sl, cond, mode, scale, t, guidance)
        self.controlnet_calls += 1
        self.controlnet_tokens.append(x.shape[1])
        return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": singles}

    def _call_controlnet(self, x, ids, sl, cond, mode, scale, t, guidance):
        return self.controlnet(
            hidden_states=x, controlnet_cond=cond if self.multi else cond[0], controlnet_mode=mode,
            conditioning_scale=scale, timestep=t / 1000, guidance=guidance,
            pooled_projections=self.pooled_prompt_embeds[sl], encoder_hidden_states=self.prompt_embeds[sl],
            txt_ids=self.text_ids, img_ids=ids, joint_attention_kwargs=self.joint_attention_kwargs,
            return_dict=False)

    def _guided(self, x, ids, sl, sigma):
        extra = self._residuals(x, ids, sl, sigma)
        extra["controlnet_blocks_repeat"] = self.blocks_repeat
        real = self.transformer
        self.transformer = _WithResiduals(real, extra)
        try:
            return super()._guided(x, ids, sl, sigma)
        finally:
            self.transformer = real

    def __call__(self, x: torch.Tensor, active_idx: torch.Tensor, sigma: float, step: int) -> torch.Tensor:
        self._active, self._step = active_idx, step
        return super().__call__(x, active_idx, sigma, step)


def _is_image(image) -> bool:
    """A ``PipelineImageInput``: an image, an array, a tensor, or a non-empty list of one of those kinds."""
    if isinstance(image, _IMAGE_TYPES):
        return True
    return (isinstance(image, list) and len(image) > 0 and all(isinstance(i, _IMAGE_TYPES) for i in image)
            and len({type(i) for i in image}) == 1)


def _per_condition(value, n: int, name: str) -> list:
    """``value`` broadcast to ``n`` entries, one per control condition (a list must have exactly ``n``),
    each a finite real number (:func:`_check_entry`)."""
    items = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(items) != n:
        raise ValueError(f"{name} has {len(items)} entries, expected {n} (one per control condition)")
    for v in items:
        _check_entry(name, v)
    return items


def _check_entry(name: str, value) -> None:
    """An entry of the per-condition lists: a finite real number, any bad one a ``TypeError``."""
    check_real(name, value, nonfinite=TypeError)


class JiTFluxControlNetPipeline(Flux1JiTMixin, FluxControlNetPipeline):
    """``FluxControlNetPipeline`` with a ``jit=`` argument (``None``, a preset name or a :class:`JiTConfig`).

    ``jit=None`` calls ``FluxControlNetPipeline.__call__`` unchanged. Otherwise every stock
    argument keeps its meaning (steps and sigmas as in :class:`~jit_sampler.JiTFluxPipeline`;
    the output size follows the control image, as in the stock pipeline), and the ControlNet
    runs on the active tokens of each step (see the module docstring). After a JiT call
    ``pipe.last_jit_report`` holds a :class:`~jit_sampler.JiTReport`; its ``flops`` count the
    transformer, and ``flops["controlnet"]`` holds ``{"calls", "tokens", "summary"}`` for the
    ControlNet (``summary``: :func:`~jit_sampler.report.flop_summary` of the first net over
    the steps it ran). With a ``FluxMultiControlNetModel``, scalar ``controlnet_conditioning_scale``,
    ``control_guidance_start`` and ``control_guidance_end`` apply to every condition.

    Raises (before any model call): ``TypeError`` for a pipeline without a FLUX ControlNet or a
    control image that is not an image / array / tensor (list); ``ValueError`` for a missing
    control image, a tensor that is not ``[B, 3, H, W]`` with ``H``, ``W`` multiples of 16, a
    batch that is neither 1 nor the prompt batch, multi-ControlNet images of different sizes or
    counts, a bad ``control_mode`` (a union ControlNet needs one in range), or a guidance window
    outside ``0 <= start < end <= 1``; ``NotImplementedError`` for ``token_bucket`` and the
    hint-encoder cases listed in the module docstring.
    """

    _stock_class = FluxControlNetPipeline
    _stock_call = inspect.signature(FluxControlNetPipeline.__call__)

    # ------------------------------------------------------------------ validation

    def _nets(self) -> list:
        cn = getattr(self, "controlnet", None)
        if isinstance(cn, FluxMultiControlNetModel):
            nets = list(cn.nets)
        elif isinstance(cn, FluxControlNetModel):
            nets = [cn]
        else:
            raise TypeError(f"{type(self).__name__} needs a FluxControlNetModel or FluxMultiControlNetModel as "
                            f"`controlnet`, got {type(cn).__name__}")
        if not nets:
            raise ValueError("the FluxMultiControlNetModel has no ControlNets")
        hinted = {n.input_hint_block is not None for n in nets}
        if len(hinted) > 1:
            raise NotImplementedError("a FluxMultiControlNetModel mixing ControlNets with and without an "
                                      "input_hint_block is not supported (nor by the stock pipeline)")
        for n in nets if hinted == {True} else ():
            strides = [m.stride[0] for m in n.input_hint_block.modules() if isinstance(m, torch.nn.Conv2d)]
            if math.prod(strides) * n.config.patch_size != self.vae_scale_factor * 2:
                raise NotImplementedError(
                    f"the ControlNet's input_hint_block downsamples {math.prod(strides)}x with patch_size "
                    f"{n.config.patch_size}; JiT needs its tokens on the latent grid ({self.vae_scale_factor * 2}x)")
        return nets

    def _control_tensor(self, image, height: int, width: int, batch: int, name: str) -> torch.Tensor:
        """``image`` as the pixel tensor ``[b, 3, H, W]`` the stock ``prepare_image`` would encode (checked)."""
        if image is None:
            raise ValueError(f"{name} is required")
        if not _is_image(image):
            raise TypeError(f"{name} must be a PIL image, numpy array or torch tensor, or a non-empty list of one "
                            f"kind of them, got {type(image).__name__}")
        if not isinstance(image, torch.Tensor):  # as prepare_image: resized to (height, width) by the processor
            image = self.image_processor.preprocess(image, height=height, width=width)
        channels = self.vae.config.in_channels
        multiple = self.vae_scale_factor * 2
        if image.dim() != 4 or image.shape[1] != channels:
            raise ValueError(f"{name} must be a [B, {channels}, H, W] tensor, got shape {tuple(image.shape)}")
        h, w = image.shape[-2:]
        if h < multiple or w < multiple or h % multiple or w % multiple:
            raise ValueError(f"{name} height and width must be positive multiples of {multiple}, got {h} x {w}")
        if not image.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor in [-1, 1], got {image.dtype}")
        if image.shape[0] not in (1, batch):
            raise ValueError(f"{name} has batch {image.shape[0]}; expected 1 or the prompt batch {batch}")
        return image

    @staticmethod
    def _check_modes(nets, modes: list, name: str) -> None:
        for k, mode in enumerate(modes):
            net = nets[min(k, len(nets) - 1)]
            if mode is not None and not is_integer(mode, "int"):
                raise TypeError(f"{name} must be an int or None, got {mode!r}")
            if net.union:
                n = net.controlnet_mode_embedder.num_embeddings
                if mode is None or not 0 <= mode < n:
                    raise ValueError(f"{name}: a union ControlNet needs a control mode in [0, {n}), got {mode!r}")

    def _check_control(self, control_image, control_mode, scale, start, end, height, width, batch):
        """Everything ControlNet-specific, checked before any model call. Returns
        ``(pixel images, modes, scales, starts, ends, multi)`` in the shapes the loop uses."""
        nets = self._nets()
        multi = isinstance(self.controlnet, FluxMultiControlNetModel)
        if not multi:
            images = [self._control_tensor(control_image, height, width, batch, "control_image")]
            if isinstance(control_mode, list):
                raise ValueError("for a single FluxControlNetModel, control_mode must be an int or None")
            self._check_modes(nets, [control_mode], "control_mode")
            scale = scale[0] if isinstance(scale, list) and scale else scale
            _check_entry("controlnet_conditioning_scale", scale)
            n = 1
        else:
            if not isinstance(control_image, (list, tuple)) or not control_image:
                raise TypeError("with a FluxMultiControlNetModel, control_image must be a list with one image "
                                "input per ControlNet (or per condition of a single union ControlNet)")
            n = len(control_image)
            if len(nets) > 1 and n != len(nets):
                raise ValueError(f"control_image has {n} entries for {len(nets)} ControlNets")
            images = [self._control_tensor(im, height, width, batch, f"control_image[{k}]")
                      for k, im in enumerate(control_image)]
            if len({im.shape[-2:] for im in images}) > 1:
                raise ValueError(f"the control images have different sizes {[tuple(im.shape[-2:]) for im in images]}")
            modes = control_mode if isinstance(control_mode, list) else [control_mode] * n
            if len(modes) != n:
                raise ValueError(f"control_mode has {len(modes)} entries for {n} control images")
            self._check_modes(nets, modes, "control_mode")
            control_mode = modes
            scale = _per_condition(scale, n, "controlnet_conditioning_scale")
        starts = _per_condition(start, n, "control_guidance_start")
        ends = _per_condition(end, n, "control_guidance_end")
        for s, e in zip(starts, ends):
            if not 0.0 <= s < e <= 1.0:
                raise ValueError(f"control guidance window must satisfy 0 <= start < end <= 1, got [{s}, {e}]")
        return images, control_mode, scale, starts, ends, multi

    # ------------------------------------------------------------------ the call

    def _encode_control(self, image, batch: int, num_images_per_prompt: int, device, generator,
                        hint_net=None) -> torch.Tensor:
        """Pixel control image -> control tokens ``[B, N, C]``: packed VAE latents as the stock pipeline (same
        generator use), or for a hint-encoder ControlNet ``hint_net`` its patchified hint map (computed once)."""
        image = self.prepare_image(image=image, width=image.shape[-1], height=image.shape[-2],
                                   batch_size=batch * num_images_per_prompt,
                                   num_images_per_prompt=num_images_per_prompt, device=device, dtype=self.vae.dtype)
        if hint_net is not None:
            return _patchify(hint_net.input_hint_block(image), hint_net.config.patch_size)
        lat = retrieve_latents(self.vae.encode(image), generator=generator)
        lat = (lat - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        c, h, w = lat.shape[1:]
        return self._pack_latents(lat, batch * num_images_per_prompt, c, h, w)

    @torch.no_grad()
    def _jit_call(self, cfg: JiTConfig, *, explicit_steps: bool, prompt, prompt_2, negative_prompt, negative_prompt_2,
                  true_cfg_scale, height, width, num_inference_steps, sigmas, guidance_scale, control_guidance_start,
                  control_guidance_end, control_image, control_mode, controlnet_conditioning_scale,
                  num_images_per_prompt, generator, latents, prompt_embeds, pooled_prompt_embeds, ip_adapter_image,
                  ip_adapter_image_embeds, negative_ip_adapter_image, negative_ip_adapter_image_embeds,
                  negative_prompt_embeds, negative_pooled_prompt_embeds, output_type, return_dict,
                  joint_attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs,
                  max_sequence_length, **newer):
        self._refuse_newer(newer)
        if cfg.token_bucket:
            raise NotImplementedError(
                "token_bucket cannot be combined with a ControlNet: diffusers' FluxControlNetModel does not pass "
                "joint_attention_kwargs (the padding mask) to its blocks, so padded tokens would change its residuals")
        t0 = time.perf_counter()
        height, width = self._default_size(height, width)
        self.check_inputs(prompt, prompt_2, height, width, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        batch_size = self._batch_size(prompt, prompt_embeds)
        images, control_mode, scale, starts, ends, multi = self._check_control(
            control_image, control_mode, controlnet_conditioning_scale, control_guidance_start,
            control_guidance_end, height, width, batch_size)
        if (callback_on_step_end is not None and "control_image" in (callback_on_step_end_tensor_inputs or ())
                and self._nets()[0].input_hint_block is not None):
            raise NotImplementedError("callback_on_step_end with 'control_image' and a hint-encoder (XLabs) "
                                      "ControlNet: the stock callback sees pixels, the JiT loop holds tokens")
        height, width = images[-1].shape[-2:]  # as stock: the output follows the control image
        stages = self._steps_config(cfg, sigmas, explicit_steps, num_inference_steps)  # this run's stages
        self._check_context_parallel(stages, height, width, prompt_embeds,
                                     negative_prompt_embeds if true_cfg_scale > 1 else None)
        tokens = math.prod(self._token_grid(height, width))
        want = (batch_size * num_images_per_prompt, tokens, self.transformer.config.in_channels)
        if isinstance(latents, torch.Tensor) and tuple(latents.shape) != want:
            raise ValueError(f"latents must be packed [B, {tokens}, C] = {list(want)} for the {height} x {width} "
                             f"control image, got shape {tuple(latents.shape)}")
        self._start_call(guidance_scale, joint_attention_kwargs)

        device = self._execution_device
        total = batch_size * num_images_per_prompt
        # As stock: the negative branch runs with the positive branch's text ids (check_inputs has
        # compared precomputed embedding shapes).
        prompt_embeds, pooled_prompt_embeds, text_ids, negative = self._encode_prompts(
            prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_embeds=negative_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, true_cfg_scale=true_cfg_scale, device=device,
            num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
            joint_attention_kwargs=joint_attention_kwargs, total=total, shared_text_ids=True)

        # Control tokens: VAE latents (drawing from the generator before the initial noise, as stock), or
        # the hint encoder's tokens for XLabs-style ControlNets.
        nets = self._nets()
        hint_nets = None
        if nets[0].input_hint_block is not None:
            hint_nets = [nets[min(k, len(nets) - 1)] for k in range(len(images))]
        control = [self._encode_control(im, batch_size, num_images_per_prompt, device, generator,
                                        None if hint_nets is None else hint_nets[k]) for k, im in enumerate(images)]
        if multi:
            modes = [torch.tensor(-1 if m is None else m).expand(total).to(device, dtype=torch.long)
                     for m in control_mode]
        else:
            modes = None if control_mode is None else \
                torch.tensor(control_mode).to(device, dtype=torch.long).view(-1, 1).expand(total, 1)

        num_channels_latents = self.transformer.config.in_channels // 4
        latents, latent_image_ids = self.prepare_latents(total, num_channels_latents, height, width,
                                                         prompt_embeds.dtype, device, generator, latents)
        grid_h, grid_w = self._token_grid(height, width)

        cfg, sig = self._schedule(cfg, sigmas, explicit_steps, num_inference_steps, latents.shape[1], device)
        steps = cfg.total_steps
        # The stock keep schedule over this run's steps: 0 outside [start, end] of the run.
        keep = [[1.0 - float(i / steps < s or (i + 1) / steps > e) for s, e in zip(starts, ends)]
                for i in range(steps)]
        keep = keep if multi else [k[0] for k in keep]

        def extend_report(report, velocity):
            self._controlnet_report(report, velocity, nets, grid_h * grid_w, prompt_embeds.shape[1])

        return self._sample_and_finish(
            cfg, sig, t0, (prompt_embeds, pooled_prompt_embeds, text_ids, negative), latents=latents,
            latent_image_ids=latent_image_ids, grid_h=grid_h, grid_w=grid_w, height=height, width=width, total=total,
            device=device, generator=generator, guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale,
            ip_adapter=(ip_adapter_image, ip_adapter_image_embeds, negative_ip_adapter_image,
                        negative_ip_adapter_image_embeds),
            output_type=output_type, return_dict=return_dict, callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            velocity_class=FluxControlNetVelocity,
            velocity_kwargs=dict(controlnet=self.controlnet, control=control if multi else control[0],
                                 control_mode=modes, conditioning_scale=scale, controlnet_keep=keep,
                                 controlnet_guidance=self._guidance(guidance_scale, device, total, nets[0]),
                                 blocks_repeat=hint_nets is not None, hint_nets=hint_nets),
            extend_report=extend_report)

    def _denoise(self, velocity, latents, grid_h, grid_w, sig, cfg, generator, timesteps, callback_on_step_end,
                 callback_on_step_end_tensor_inputs, post_step=None):
        """The mixin's loop; a callback that asks for ``control_image`` gets the packed control latents
        and may return replacements (as in the stock pipeline)."""
        inputs = list(callback_on_step_end_tensor_inputs or [])
        if callback_on_step_end is not None and "control_image" in inputs:
            user = callback_on_step_end

            def callback_on_step_end(pipe, i, t, kwargs):
                kwargs = dict(kwargs)
                kwargs["control_image"] = velocity.control if velocity.multi else velocity.control[0]
                out = user(pipe, i, t, kwargs) or {}
                if "control_image" in out:
                    velocity.set_control(out.pop("control_image"))
                return out

            inputs = [k for k in inputs if k != "control_image"]
        return super()._denoise(velocity, latents, grid_h, grid_w, sig, cfg, generator, timesteps,
                                callback_on_step_end, inputs, post_step=post_step)

    @staticmethod
    def _controlnet_report(report, velocity: FluxControlNetVelocity, nets, num_tokens: int, text_tokens: int):
        """``report.flops["controlnet"]``: ControlNet forwards, their token counts and a FLOP summary."""
        per_step = report.active_tokens[: len(velocity.controlnet_keep)]
        ran = [m for i, m in enumerate(per_step)
               if any(s != 0 for s in np.atleast_1d(np.asarray(velocity._scale(i), dtype=float)))]
        summary = {}
        if ran:
            try:
                summary = flop_summary(nets[0].config, ran, num_tokens, text_tokens=text_tokens + int(nets[0].union))
            except (TypeError, KeyError, AttributeError):
                summary = {}
        report.flops["controlnet"] = {"calls": velocity.controlnet_calls, "tokens": list(velocity.controlnet_tokens),
                                      "summary": summary}
