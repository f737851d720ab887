"""Bad inputs, valid edge cases and mutation checks for the image-conditioned JiT pipelines.

Every bad case runs a tiny offline pipeline under ``jit="7x"`` with one bad argument and
names the exception the call must raise: ``TypeError`` for a wrong type / dtype,
``ValueError`` for a wrong shape / size / value / range, ``NotImplementedError`` for an
unsupported combination. Forward pre-hooks on the VAE encoder, the transformer and the
ControlNet (the :class:`Spies`) prove that the error came before any of them ran. Where the
stock pipeline (``jit=None``) accepts the input or fails deep inside (an ``AttributeError``,
``IndexError`` or ``RuntimeError`` from diffusers or torch), :data:`STOCK` records what the
stock call does; ``test_stock_behaviour`` keeps that record honest.

The valid edge cases (batch 2 with ``num_images_per_prompt=2``, sizes that are not multiples
of 16, ``strength=1.0``, a one-step run) must run, give the expected output shape and be
reproducible bit for bit; every run compares all its tensor inputs (images, masks, latents,
embeddings, control images), its generator list and its ``joint_attention_kwargs`` with copies
taken before the call.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

import tests._fixtures.flux  # noqa: F401  (one torch thread)
from tests._fixtures.flux import build_pipe, controlnet, prompt_inputs, stock_pipe
from jit_sampler import JiTConfig

S = 64  # image side: a 4 x 4 FLUX token grid


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def pil(h=S, w=S, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


def img(batch=1, h=S, w=S, seed=5):
    return torch.rand(batch, 3, h, w, generator=gen(seed))


def mask(batch=1, h=S, w=S):
    m = torch.zeros(batch, 1, h, w)
    m[..., h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1.0
    return m


# ---------------------------------------------------------------- the pipelines


def _flux(stock_name: str, jit_name: str):
    import diffusers

    import jit_sampler

    p = getattr(jit_sampler, jit_name).from_pipe(build_pipe(getattr(diffusers, stock_name)))
    p.set_progress_bar_config(disable=True)
    return p


def _controlnet():
    from diffusers import FluxControlNetPipeline

    from jit_sampler import JiTFluxControlNetPipeline

    base = build_pipe()
    stock = stock_pipe(base, FluxControlNetPipeline, controlnet=controlnet(base.transformer, seed=5).eval())
    p = JiTFluxControlNetPipeline.from_pipe(stock)
    p.set_progress_bar_config(disable=True)
    return p


def _klein(kv: bool):
    from diffusers import Flux2KleinKVPipeline

    from tests._fixtures.flux2 import build_klein
    from jit_sampler import JiTFlux2KleinKVPipeline, JiTFlux2KleinPipeline

    if kv:
        p = JiTFlux2KleinKVPipeline.from_pipe(build_klein(cls=Flux2KleinKVPipeline, is_distilled=True))
    else:
        p = JiTFlux2KleinPipeline.from_pipe(build_klein())
    p.set_progress_bar_config(disable=True)
    return p


def _qwen():
    from tests._fixtures.qwen import build_qwen
    from jit_sampler import JiTQwenImagePipeline

    p = JiTQwenImagePipeline.from_pipe(build_qwen())
    p.set_progress_bar_config(disable=True)
    return p


BUILD: dict[str, Callable] = {
    "img2img": lambda: _flux("FluxImg2ImgPipeline", "JiTFluxImg2ImgPipeline"),
    "inpaint": lambda: _flux("FluxInpaintPipeline", "JiTFluxInpaintPipeline"),
    "fill": lambda: _flux("FluxFillPipeline", "JiTFluxFillPipeline"),
    "kontext": lambda: _flux("FluxKontextPipeline", "JiTFluxKontextPipeline"),
    "controlnet": _controlnet,
    "klein": lambda: _klein(False),
    "klein_kv": lambda: _klein(True),
    "qwen": _qwen,
}
_CACHE: dict = {}


def get_pipe(name: str):
    if name not in _CACHE:
        _CACHE[name] = BUILD[name]()
    return _CACHE[name]


def valid_kwargs(name: str) -> dict:
    """A valid call of pipeline ``name`` (64 x 64, latents out), fresh tensors every time."""
    if name in ("klein", "klein_kv"):
        from tests._fixtures.flux2 import embeds

        d = dict(image=[pil()], prompt_embeds=embeds(), height=S, width=S, output_type="latent")
        if name == "klein":  # the base model runs true CFG (guidance_scale 4): no text encoder, so its embeddings
            d["negative_prompt_embeds"] = embeds(seed=2)
        return d
    if name == "qwen":
        from tests._fixtures.qwen import prompt_inputs as qwen_inputs

        return dict(height=S, width=S, output_type="latent", **qwen_inputs())
    d = dict(height=S, width=S, output_type="latent", **prompt_inputs())
    if name in ("img2img", "inpaint", "fill"):
        d["image"] = img()
    if name == "img2img":
        d["strength"] = 0.8
    if name in ("inpaint", "fill"):
        d["mask_image"] = mask()
    if name == "inpaint":
        d["strength"] = 0.8
    if name == "kontext":
        d.update(image=pil(), max_area=S * S, _auto_resize=False)
    if name == "controlnet":
        d["control_image"] = img() * 2 - 1
    return d


class Spies:
    """Forward pre-hooks counting the calls of the VAE encoder, the transformer and the ControlNet."""

    def __init__(self, pipe):
        self.pipe, self.counts, self._handles = pipe, {}, []

    def __enter__(self):
        mods = {"vae.encoder": getattr(self.pipe.vae, "encoder", None), "transformer": self.pipe.transformer,
                "controlnet": getattr(self.pipe, "controlnet", None)}
        for key, mod in mods.items():
            if mod is None:
                continue
            self.counts[key] = 0

            def hook(module, args, key=key):
                self.counts[key] += 1

            self._handles.append(mod.register_forward_pre_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()

    def ran(self) -> dict:
        return {k: n for k, n in self.counts.items() if n}


# ---------------------------------------------------------------- snapshots (the no-mutation check)


def snapshot(value):
    """A deep copy of what the caller passed: tensors cloned, arrays copied, PIL images as bytes,
    dicts / lists element by element, generator lists as their identities."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.clone(), value.dtype, value.device)
    if isinstance(value, np.ndarray):
        return ("array", value.copy())
    if isinstance(value, Image.Image):
        return ("pil", value.mode, value.size, value.tobytes())
    if isinstance(value, torch.Generator):
        return ("generator", id(value))
    if isinstance(value, dict):
        return ("dict", id(value), {k: snapshot(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, id(value), [snapshot(v) for v in value])
    if isinstance(value, JiTConfig):
        return ("config", copy.deepcopy(value))
    return ("other", value)


def same(a, b) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "tensor":
        return a[2] == b[2] and a[3] == b[3] and a[1].shape == b[1].shape and bool(
            torch.equal(torch.nan_to_num(a[1].float(), 1e30), torch.nan_to_num(b[1].float(), 1e30)))
    if a[0] == "array":
        return a[1].shape == b[1].shape and bool(np.array_equal(a[1], b[1], equal_nan=a[1].dtype.kind == "f"))
    if a[0] == "dict":
        return a[1] == b[1] and a[2].keys() == b[2].keys() and all(same(a[2][k], b[2][k]) for k in a[2])
    if a[0] in ("list", "tuple"):
        return a[1] == b[1] and len(a[2]) == len(b[2]) and all(same(x, y) for x, y in zip(a[2], b[2]))
    if a[0] == "other":
        return a[1] is b[1] or (a[1] == b[1]) is True or (
            isinstance(a[1], float) and isinstance(b[1], float) and math.isnan(a[1]) and math.isnan(b[1]))
    return a == b


def assert_unchanged(before: dict, kwargs: dict) -> None:
    changed = [k for k in before if not same(before[k], snapshot(kwargs[k]))]
    assert not changed, f"inputs mutated by the call: {changed}"


# ---------------------------------------------------------------- the corpus


@dataclass
class Case:
    """One bad input: ``edit(kwargs)`` edits a valid call of each pipeline in ``pipes`` in place;
    the JiT call (``jit``) must raise ``exc`` before any model runs (what ``jit=None`` does: :data:`STOCK`)."""

    id: str
    pipes: tuple
    edit: Callable
    exc: type
    jit: object = "7x"


FLUX1 = ("img2img", "inpaint", "fill", "kontext", "controlnet")
ALL = FLUX1 + ("klein", "klein_kv", "qwen")
STRENGTH = ("img2img", "inpaint", "fill")
MASKED = ("inpaint", "fill")


def _set(**kw):
    def edit(d):
        d.update(kw)
    return edit


def _call(fn):
    def edit(d):
        fn(d)
    return edit


GUIDED = tuple(p for p in ALL if p != "klein_kv")  # the KV pipeline takes no guidance_scale
TRUE_CFG = ("img2img", "inpaint", "kontext", "controlnet")  # FLUX.1 pipelines with negative prompts


def _negative(d, **over):
    """True CFG (scale 2) with precomputed negative embeddings, then ``over``."""
    d.update(prompt_inputs(1, seed=3, prefix="negative_"), true_cfg_scale=2.0)
    d.update(over)


def _attention_key(d) -> str:
    return "joint_attention_kwargs" if "pooled_prompt_embeds" in d else "attention_kwargs"


def _text_prompt(d):
    """A text prompt instead of the embeddings (the fixtures have no text encoder)."""
    for k in ("prompt_embeds", "pooled_prompt_embeds", "prompt_embeds_mask"):
        d.pop(k, None)
    d["prompt"] = "a cat"


CASES: list[Case] = [
    # --- the JiT argument itself
    Case("jit-unknown-preset", ALL, _set(), ValueError, jit="9x"),
    Case("jit-wrong-type", ALL, _set(), TypeError, jit=7),
    # --- steps
    Case("steps-negative", ALL, _set(num_inference_steps=-3), ValueError),
    Case("steps-zero", ALL, _set(num_inference_steps=0), ValueError),
    Case("steps-float", ALL, _set(num_inference_steps=2.5), TypeError),
    Case("steps-string", ALL, _set(num_inference_steps="4"), TypeError),
    Case("sigmas-empty", ALL, _set(sigmas=[]), ValueError),
    Case("sigmas-nan", ALL, _set(sigmas=[1.0, float("nan"), 0.5]), ValueError),
    Case("sigmas-string", ALL, _set(sigmas="abc"), TypeError),
    # --- images per prompt, generators
    Case("images-per-prompt-zero", ALL, _set(num_images_per_prompt=0), ValueError),
    Case("images-per-prompt-negative", ALL, _set(num_images_per_prompt=-1), ValueError),
    Case("images-per-prompt-float", ALL, _set(num_images_per_prompt=1.5), TypeError),
    Case("generator-list-too-long", ALL, _set(generator=[gen(0), gen(1)]), ValueError),
    Case("generator-list-too-short", ALL, _call(lambda d: d.update(num_images_per_prompt=3, generator=[gen(0)])),
         ValueError),
    Case("generator-wrong-type", ALL, _set(generator=123), TypeError),
    # --- latents
    Case("latents-wrong-shape", ALL, _set(latents=torch.randn(1, 7, 5)), ValueError),
    Case("latents-wrong-dim", ALL, _set(latents=torch.randn(16, 16)), ValueError),
    Case("latents-int-dtype", ALL, _call(lambda d: d.update(latents=torch.zeros(1, 16, 16, dtype=torch.long))),
         TypeError),
    Case("latents-numpy", ALL, _set(latents=np.zeros((1, 16, 16), dtype=np.float32)), TypeError),
    # --- prompt embeddings
    Case("prompt-embeds-list", FLUX1 + ("klein", "klein_kv"), _call(lambda d: d.update(prompt_embeds=[[0.0]])),
         TypeError),
    Case("prompt-embeds-2d", ALL, _call(lambda d: d.update(prompt_embeds=d["prompt_embeds"][0])), ValueError),
    Case("prompt-embeds-int", ALL, _call(lambda d: d.update(prompt_embeds=d["prompt_embeds"].long())), TypeError),
    Case("prompt-embeds-no-tokens", ALL, _call(lambda d: d.update(prompt_embeds=d["prompt_embeds"][:, :0])),
         ValueError),
    Case("prompt-embeds-batch-0", ALL, _call(lambda d: d.update(
        {k: v[:0] for k, v in d.items() if isinstance(v, torch.Tensor) and "prompt" in k})), ValueError),
    Case("prompt-embeds-wrong-width", ALL, _call(lambda d: d.update(prompt_embeds=torch.randn(1, 6, 7))), ValueError),
    Case("pooled-wrong-width", FLUX1, _set(pooled_prompt_embeds=torch.randn(1, 5)), ValueError),
    Case("embeds-mixed-dtypes", FLUX1, _call(lambda d: d.update(
        pooled_prompt_embeds=d["pooled_prompt_embeds"].bfloat16())), TypeError),
    Case("pooled-batch-mismatch", FLUX1, _call(lambda d: d.update(
        pooled_prompt_embeds=d["pooled_prompt_embeds"].repeat(2, 1))), ValueError),
    # --- sizes
    Case("height-negative", ALL, _set(height=-64), ValueError),
    Case("height-float", ALL, _set(height=64.5), TypeError),
    Case("width-too-small", tuple(p for p in ALL if p != "kontext"), _set(width=4), ValueError),
    Case("prompt-without-text-encoder", ALL, _call(_text_prompt), ValueError),
    # --- kwargs dicts and callbacks
    Case("callback-bad-tensor-input", ALL, _set(callback_on_step_end=lambda *a: {},
                                                callback_on_step_end_tensor_inputs=["nope"]), ValueError),
    # --- strength
    Case("strength-nan", STRENGTH, _set(strength=float("nan")), ValueError),
    Case("strength-negative", STRENGTH, _set(strength=-0.1), ValueError),
    Case("strength-above-one", STRENGTH, _set(strength=1.5), ValueError),
    Case("strength-string", STRENGTH, _set(strength="0.5"), TypeError),
    Case("strength-none", STRENGTH, _set(strength=None), TypeError),
    Case("strength-zero", STRENGTH, _set(strength=0.0), ValueError),
    # --- the image
    Case("image-missing", STRENGTH, _set(image=None), ValueError),
    Case("image-string", STRENGTH + ("kontext",), _set(image="cat.png"), TypeError),
    Case("image-2-channels", STRENGTH, _set(image=torch.rand(1, 2, S, S)), ValueError),
    Case("image-5d", STRENGTH, _set(image=torch.rand(1, 1, 3, S, S)), ValueError),
    Case("image-int-tensor", STRENGTH, _set(image=torch.zeros(1, 3, S, S, dtype=torch.long)), TypeError),
    Case("image-empty-list", STRENGTH + ("kontext", "klein", "klein_kv"), _set(image=[]), ValueError),
    Case("image-mixed-list", STRENGTH + ("kontext",), _set(image=[pil(), img()]), TypeError),
    Case("image-batch-3-for-2", STRENGTH, _call(lambda d: d.update(image=img(3), num_images_per_prompt=2,
                                                                   generator=None)), ValueError),
    # --- the mask
    Case("mask-missing", MASKED, _set(mask_image=None), ValueError),
    Case("mask-string", MASKED, _set(mask_image="mask.png"), TypeError),
    Case("mask-batch-mismatch", MASKED, _call(lambda d: d.update(image=img(2), mask_image=mask(3))), ValueError),
    Case("mask-3-channels-tensor", MASKED, _set(mask_image=torch.rand(1, 3, S, S)), ValueError),
    Case("mask-5d", MASKED, _set(mask_image=torch.rand(1, 1, 1, S, S)), ValueError),
    Case("masked-image-latents-wrong-shape", ("inpaint", "fill"), _set(masked_image_latents=torch.randn(1, 5, 5)),
         ValueError),
    Case("padding-mask-crop-negative", ("inpaint",), _set(padding_mask_crop=-4, output_type="pil"), ValueError),
    # --- references
    Case("reference-numpy", ("klein", "klein_kv"), _set(image=np.zeros((S, S, 3), dtype=np.uint8)), TypeError),
    Case("reference-tensor", ("klein", "klein_kv"), _set(image=img()), TypeError),
    Case("reference-tiny", ("klein", "klein_kv"), _set(image=[pil(8, 8)]), ValueError),
    Case("reference-string", ("klein", "klein_kv"), _set(image=["cat.png"]), TypeError),
    Case("reference-latent-odd", ("kontext",), _set(image=torch.randn(1, 4, 3, 5)), ValueError),
    Case("reference-too-small", ("kontext",), _set(image=pil(8, 8)), ValueError),
    Case("klein-cfg-without-negative-embeds", ("klein",), _set(negative_prompt_embeds=None), ValueError),
    Case("reference-tensor-wrong-channels", ("kontext",), _set(image=torch.rand(1, 2, S, S)), ValueError),
    Case("max-area-zero", ("kontext",), _set(max_area=0), ValueError),
    Case("max-area-negative", ("kontext",), _set(max_area=-4096), ValueError),
    # --- the control image
    Case("control-missing", ("controlnet",), _set(control_image=None), ValueError),
    Case("control-string", ("controlnet",), _set(control_image="edges.png"), TypeError),
    Case("control-size-not-multiple", ("controlnet",), _set(control_image=torch.rand(1, 3, 40, 56)), ValueError),
    Case("control-wrong-channels", ("controlnet",), _set(control_image=torch.rand(1, 1, S, S)), ValueError),
    Case("control-batch-3", ("controlnet",), _set(control_image=torch.rand(3, 3, S, S)), ValueError),
    Case("control-int", ("controlnet",), _set(control_image=torch.zeros(1, 3, S, S, dtype=torch.uint8)), TypeError),
    Case("control-scale-nan", ("controlnet",), _set(controlnet_conditioning_scale=float("nan")), TypeError),
    Case("control-window-reversed", ("controlnet",), _set(control_guidance_start=0.8, control_guidance_end=0.2),
         ValueError),
    Case("control-mode-for-plain-net", ("controlnet",), _set(control_mode="canny"), TypeError),
    # --- unsupported JiT configurations
    Case("token-bucket-controlnet", ("controlnet",), _set(), NotImplementedError,
         jit=JiTConfig.preset("7x").replace(token_bucket=8)),
    Case("token-bucket-qwen", ("qwen",), _set(), NotImplementedError,
         jit=JiTConfig.preset("7x").replace(token_bucket=8)),
    Case("token-bucket-kv-reference", ("klein_kv",), _set(), NotImplementedError,
         jit=JiTConfig.preset("7x").replace(token_bucket=8)),
    # --- Qwen text masks
    Case("qwen-mask-wrong-shape", ("qwen",), _call(lambda d: d.update(
        prompt_embeds_mask=d["prompt_embeds_mask"][:, :3])), ValueError),
    Case("qwen-mask-list", ("qwen",), _set(prompt_embeds_mask=[1, 1, 1]), TypeError),
    # --- guidance, true CFG and the negative branch
    Case("guidance-string", GUIDED, _set(guidance_scale="high"), TypeError),
    Case("guidance-none", FLUX1, _set(guidance_scale=None), TypeError),
    Case("guidance-nan", GUIDED, _set(guidance_scale=float("nan")), ValueError),
    Case("true-cfg-nan", TRUE_CFG, _call(lambda d: _negative(d, true_cfg_scale=float("nan"))), ValueError),
    Case("true-cfg-string", TRUE_CFG, _call(lambda d: _negative(d, true_cfg_scale="2")), TypeError),
    Case("negative-embeds-wrong-length", TRUE_CFG, _call(lambda d: _negative(
        d, negative_prompt_embeds=torch.randn(1, 3, 32))), ValueError),
    Case("negative-pooled-missing", TRUE_CFG, _call(lambda d: _negative(d, negative_pooled_prompt_embeds=None)),
         ValueError),
    Case("negative-embeds-int", TRUE_CFG, _call(lambda d: _negative(
        d, negative_prompt_embeds=torch.zeros(1, 6, 32, dtype=torch.long))), TypeError),
    Case("ip-adapter-not-loaded", TRUE_CFG, _set(ip_adapter_image=pil()), ValueError),
    # --- more schedules and text arguments
    Case("sigmas-increasing", ALL, _set(sigmas=[0.3, 0.6, 0.9]), ValueError),
    Case("sigmas-above-one", ALL, _set(sigmas=[2.0, 1.0, 0.5]), ValueError),
    Case("sigmas-negative", ALL, _set(sigmas=[1.0, 0.5, -0.5]), ValueError),
    Case("max-sequence-length-huge", FLUX1, _set(max_sequence_length=100000), ValueError),
    Case("max-sequence-length-negative", ALL, _set(max_sequence_length=-1), ValueError),
    Case("prompt-list-of-ints", ALL, _set(prompt=[1, 2]), ValueError),
    Case("callback-not-callable", ALL, _set(callback_on_step_end=3), TypeError),
    Case("attention-kwargs-list", ALL, _call(lambda d: d.update({_attention_key(d): [1]})), TypeError),
    # --- more pipeline-specific combinations
    Case("kontext-latent-reference-batch-3", ("kontext",), _set(image=torch.randn(3, 4, 8, 8)), ValueError),
    Case("fill-image-and-masked-latents", ("fill",), _set(masked_image_latents=torch.randn(1, 16, 272)),
         ValueError),
    Case("padding-mask-crop-tensor-image", ("inpaint",), _set(padding_mask_crop=4), ValueError),
    Case("control-guidance-start-list-length", ("controlnet",), _set(control_guidance_start=[0.0, 0.1]),
         ValueError),
]


def _params():
    for c in CASES:
        for name in c.pipes:
            yield pytest.param(name, c, id=f"{name}-{c.id}")


@pytest.mark.slow
@pytest.mark.parametrize("name, case", list(_params()))
def test_bad_input(name, case):
    pipe = get_pipe(name)
    kwargs = valid_kwargs(name)
    kwargs.setdefault("generator", gen(0))
    case.edit(kwargs)
    before = {k: snapshot(v) for k, v in kwargs.items()}
    with Spies(pipe) as spies:
        with pytest.raises(case.exc):
            pipe(**kwargs, jit=case.jit)
    assert spies.ran() == {}, f"models ran before the error: {spies.ran()}"
    assert_unchanged(before, kwargs)


# ---------------------------------------------------------------- what the stock pipeline does with the same inputs

#: ``jit=None`` on the bad inputs above, where it differs from the JiT call's exception: the
#: exception type it raises (a ``RuntimeError`` / ``AttributeError`` / ``IndexError`` /
#: ``ZeroDivisionError`` from deep inside diffusers or torch is a crash; some come after the VAE
#: or the transformer ran) or ``"accepts"`` (it runs, often to a silently wrong result: NaN
#: sigmas, integer latents, a 0-pixel image). A string holds for every pipeline of the case, a
#: dict names pipelines; every other (pipeline, case) raises the JiT call's type. Measured with
#: diffusers 0.42.1 (``num_inference_steps=2`` unless the case sets it).
STOCK: dict = {
    "steps-zero": "ZeroDivisionError",
    "sigmas-empty": {
        "controlnet": "accepts", "klein": "accepts", "klein_kv": "accepts", "kontext": "accepts",
        "qwen": "IndexError",
    },
    "sigmas-nan": "accepts",
    "sigmas-string": "ValueError",
    "images-per-prompt-zero": "RuntimeError",
    "images-per-prompt-negative": "RuntimeError",
    "images-per-prompt-float": {"kontext": "ValueError"},
    "generator-wrong-type": "AttributeError",
    "latents-wrong-shape": {
        "controlnet": "RuntimeError", "fill": "RuntimeError", "img2img": "RuntimeError", "inpaint": "RuntimeError",
        "kontext": "RuntimeError", "qwen": "RuntimeError",
    },
    "latents-wrong-dim": {
        "controlnet": "accepts", "fill": "IndexError", "img2img": "accepts", "inpaint": "accepts",
        "kontext": "RuntimeError", "qwen": "RuntimeError",
    },
    "latents-int-dtype": {
        "controlnet": "accepts", "fill": "accepts", "img2img": "accepts", "inpaint": "RuntimeError",
        "klein": "ValueError", "klein_kv": "ValueError", "kontext": "accepts", "qwen": "RuntimeError",
    },
    "latents-numpy": "AttributeError",
    "prompt-embeds-list": "AttributeError",
    "prompt-embeds-2d": {
        "controlnet": "RuntimeError", "fill": "RuntimeError", "img2img": "RuntimeError", "inpaint": "RuntimeError",
        "kontext": "RuntimeError",
    },
    "prompt-embeds-int": {
        "controlnet": "NotImplementedError", "fill": "RuntimeError", "img2img": "RuntimeError",
        "inpaint": "RuntimeError", "klein": "NotImplementedError", "klein_kv": "NotImplementedError",
        "kontext": "RuntimeError", "qwen": "NotImplementedError",
    },
    "prompt-embeds-no-tokens": {
        "controlnet": "accepts", "fill": "accepts", "img2img": "accepts", "inpaint": "accepts",
        "klein": "RuntimeError", "klein_kv": "RuntimeError", "kontext": "accepts", "qwen": "RuntimeError",
    },
    "prompt-embeds-batch-0": "RuntimeError",
    "prompt-embeds-wrong-width": "RuntimeError",
    "pooled-wrong-width": "RuntimeError",
    "embeds-mixed-dtypes": "RuntimeError",
    "pooled-batch-mismatch": {
        "controlnet": "accepts", "fill": "RuntimeError", "img2img": "accepts", "inpaint": "accepts",
        "kontext": "RuntimeError",
    },
    "height-negative": {
        "controlnet": "accepts", "fill": "RuntimeError", "img2img": "RuntimeError", "inpaint": "RuntimeError",
        "klein": "RuntimeError", "klein_kv": "RuntimeError", "kontext": "TypeError", "qwen": "RuntimeError",
    },
    "height-float": {"controlnet": "accepts", "klein": "accepts", "klein_kv": "accepts", "kontext": "accepts"},
    "width-too-small": {
        "controlnet": "accepts", "fill": "RuntimeError", "img2img": "RuntimeError", "inpaint": "RuntimeError",
        "klein": "accepts", "klein_kv": "RuntimeError", "qwen": "RuntimeError",
    },
    "prompt-without-text-encoder": {
        "controlnet": "TypeError", "fill": "AttributeError", "img2img": "TypeError", "inpaint": "TypeError",
        "klein": "AttributeError", "klein_kv": "AttributeError", "kontext": "AttributeError",
        "qwen": "AttributeError",
    },
    "image-string": {
        "fill": "ValueError", "img2img": "ValueError", "inpaint": "ValueError", "kontext": "AttributeError",
    },
    "image-2-channels": "RuntimeError",
    "image-int-tensor": "NotImplementedError",
    "image-empty-list": {
        "fill": "IndexError", "img2img": "IndexError", "inpaint": "IndexError", "kontext": "IndexError",
    },
    "image-mixed-list": "ValueError",
    "image-batch-3-for-2": "RuntimeError",
    "mask-string": "ValueError",
    "mask-batch-mismatch": "RuntimeError",
    "mask-3-channels-tensor": {"fill": "accepts", "inpaint": "RuntimeError"},
    "reference-numpy": "ValueError",
    "reference-tensor": "ValueError",
    "reference-string": "ValueError",
    "reference-latent-odd": "RuntimeError",
    "reference-too-small": "ZeroDivisionError",
    "klein-cfg-without-negative-embeds": "AttributeError",
    "reference-tensor-wrong-channels": "RuntimeError",
    "max-area-zero": "accepts",
    "max-area-negative": "TypeError",
    "control-string": "ValueError",
    "control-size-not-multiple": "RuntimeError",
    "control-wrong-channels": "RuntimeError",
    "control-batch-3": "RuntimeError",
    "control-int": "accepts",
    "control-scale-nan": "accepts",
    "control-window-reversed": "accepts",
    "control-mode-for-plain-net": "ValueError",
    "qwen-mask-wrong-shape": "RuntimeError",
    "guidance-string": {"controlnet": "ValueError", "qwen": "accepts"},
    "guidance-none": {"controlnet": "RuntimeError"},
    "guidance-nan": "accepts",
    "true-cfg-nan": "accepts",
    "negative-embeds-int": "RuntimeError",
    "ip-adapter-not-loaded": "AttributeError",
    "sigmas-increasing": "accepts",
    "sigmas-above-one": "accepts",
    "sigmas-negative": "accepts",
    "max-sequence-length-negative": "accepts",
    "attention-kwargs-list": {
        "controlnet": "AttributeError", "fill": "AttributeError", "img2img": "AttributeError",
        "inpaint": "AttributeError", "kontext": "AttributeError",
    },
    "kontext-latent-reference-batch-3": "RuntimeError",
    "control-guidance-start-list-length": "accepts",
}


STOCK_DIFFUSERS = "0.42.1"  # the diffusers release the STOCK table was recorded on


@pytest.mark.slow
@pytest.mark.parametrize("name, case", [p for p in _params() if p.values[1].jit == "7x"])
def test_stock_behaviour(name, case):
    """Keeps the :data:`STOCK` documentation honest: the stock call does what it says.

    The table describes diffusers' own pipelines, not this package: on another diffusers release it
    is out of date rather than wrong, so the check runs only on the release it was recorded on
    (the JiT cases above run on every release)."""
    import diffusers

    if diffusers.__version__ != STOCK_DIFFUSERS:
        pytest.skip(f"STOCK table recorded on diffusers {STOCK_DIFFUSERS}, installed {diffusers.__version__}")
    want = STOCK.get(case.id, case.exc.__name__)
    want = want.get(name, case.exc.__name__) if isinstance(want, dict) else want
    pipe = get_pipe(name)
    kwargs = valid_kwargs(name)
    kwargs.setdefault("generator", gen(0))
    case.edit(kwargs)
    kwargs.setdefault("num_inference_steps", 2)
    before = {k: snapshot(v) for k, v in kwargs.items()}
    try:
        pipe(**kwargs, jit=None)
        got = "accepts"
    except Exception as exc:  # noqa: BLE001 - recording what the stock pipeline raises
        got = type(exc).__name__
    assert got == want
    if got == "accepts":
        assert_unchanged(before, kwargs)


# ---------------------------------------------------------------- valid edge cases: reproducible, mutating nothing


def _batch2(name, d):
    """Two prompts, two images each (a generator per image)."""
    if name in ("klein", "klein_kv"):
        from tests._fixtures.flux2 import embeds

        d["prompt_embeds"] = embeds(2)
        if name == "klein":
            d["negative_prompt_embeds"] = embeds(2, seed=2)
    elif name == "qwen":
        from tests._fixtures.qwen import prompt_inputs as qwen_inputs

        d.update(qwen_inputs(2))
    else:
        d.update(prompt_inputs(2))
    d.update(num_images_per_prompt=2, generator=[gen(i) for i in range(4)])


def _tokens(name, h, w):
    """Packed tokens of an ``h x w`` output (FLUX.1 / Qwen latents) or the unpacked latent size (FLUX.2)."""
    if name in ("klein", "klein_kv"):
        return (2 * (h // 16), 2 * (w // 16))
    if name == "qwen":
        return ((h // 8) * (w // 8),)
    return ((h // 16) * (w // 16),)


EDGES = {
    # name: (edit(pipeline, kwargs), expected batch, expected output size h x w)
    "batch2-images2": (_batch2, 4, (S, S)),
    "odd-size-72x56": (lambda n, d: d.update(height=72, width=56), 1, (72, 56)),
    "rect-80x48": (lambda n, d: d.update(height=80, width=48), 1, (80, 48)),
    "strength-1": (lambda n, d: d.update(strength=1.0) if n in STRENGTH else None, 1, (S, S)),
    "one-step": (lambda n, d: d.update(num_inference_steps=1, **({"strength": 1.0} if n in STRENGTH else {})), 1,
                 (S, S)),
    "numpy-scalars": (lambda n, d: d.update(num_inference_steps=np.int64(3), height=np.int64(S),
                                            **({"strength": np.float32(1.0)} if n in STRENGTH else {})), 1, (S, S)),
    "attention-kwargs-and-config": (
        lambda n, d: d.update({"attention_kwargs" if n in ("klein", "klein_kv", "qwen") else
                               "joint_attention_kwargs": {"scale": 1.0}}), 1, (S, S)),
}


@pytest.mark.slow
@pytest.mark.parametrize("edge", list(EDGES))
@pytest.mark.parametrize("name", ALL)
def test_valid_edge_case(name, edge):
    edit, batch, (h, w) = EDGES[edge]
    if name == "controlnet":
        h = w = S  # the output follows the control image
    if name == "kontext" and (h, w) != (S, S):
        # max_area = 64 x 64 keeps the area and the aspect ratio: 72 x 56 -> 64 x 48 (multiples of 16)
        h, w = {(72, 56): (64, 48), (80, 48): (80, 48)}[(h, w)]
    pipe = get_pipe(name)
    cfg = JiTConfig.preset("7x")
    outs = []
    for _ in range(2):
        kwargs = valid_kwargs(name)
        kwargs.setdefault("generator", gen(0))
        edit(name, kwargs)
        before = {k: snapshot(v) for k, v in kwargs.items()}
        cfg_before = snapshot(cfg)
        with Spies(pipe) as spies:
            out = pipe(**kwargs, jit=cfg).images
        assert spies.counts["transformer"] >= 1
        assert_unchanged(before, kwargs)
        assert same(cfg_before, snapshot(cfg))
        outs.append(out)
    out = outs[0]
    assert out.shape[0] == batch
    tokens = _tokens(name, h, w)
    assert tuple(out.shape[1:1 + len(tokens)]) == tokens if name not in ("klein", "klein_kv") else \
        tuple(out.shape[2:]) == tokens
    assert torch.isfinite(out).all()
    assert torch.equal(outs[0], outs[1]), "same seed, same inputs: the output must be bit-identical"


# ---------------------------------------------------------------- enable_cache_dit: bad options change nothing


def _cache_state(pipe):
    tr = pipe.transformer
    mods = [tr, *tr.transformer_blocks, *tr.single_transformer_blocks]
    return (sorted(tr.__dict__), [m.__dict__.get("forward") for m in mods], pipe.__dict__.get("cache_dit"),
            tuple(pipe._call_contexts))


@pytest.mark.parametrize("options, exc", [
    (dict(cache_config="fast"), TypeError),
    (dict(foo=1), TypeError),
    (dict(calibrator_config=3), TypeError),  # cache_dit.enable_cache: AttributeError deep inside
    (dict(params_modifiers="x"), TypeError),  # idem
], ids=["config-string", "unknown-option", "calibrator-int", "params-modifiers-string"])
@pytest.mark.parametrize("name", ["img2img", "controlnet", "klein_kv"])
def test_enable_cache_dit_bad_options(name, options, exc):
    pytest.importorskip("cache_dit")
    from jit_sampler.pipelines.cache_dit import enable_cache_dit

    pipe = get_pipe(name)
    before = _cache_state(pipe)
    with pytest.raises(exc):
        enable_cache_dit(pipe, **options)
    assert _cache_state(pipe) == before


@pytest.mark.parametrize("name", ["img2img", "kontext", "klein_kv"])
def test_bad_call_under_cache_dit_leaves_the_cache_usable(name):
    """A refused call with cache-dit enabled runs no model, and the next call gives what a clean one gives."""
    cache_dit = pytest.importorskip("cache_dit")
    from jit_sampler.pipelines.cache_dit import disable_cache_dit, enable_cache_dit

    pipe = get_pipe(name)
    cfg = cache_dit.DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=1,
                                  residual_diff_threshold=0.12)
    enable_cache_dit(pipe, cfg)
    try:
        clean = pipe(**valid_kwargs(name), generator=gen(0), jit="7x").images
        with Spies(pipe) as spies, pytest.raises(ValueError):
            pipe(**valid_kwargs(name), generator=gen(0), num_images_per_prompt=0, jit="7x")
        assert spies.ran() == {}
        again = pipe(**valid_kwargs(name), generator=gen(0), jit="7x").images
    finally:
        disable_cache_dit(pipe)
    assert torch.equal(clean, again)


# ---------------------------------------------------------------- what a step callback hands back


def _callback(result):
    def callback(pipe, i, t, kwargs):
        return result
    return callback


@pytest.mark.parametrize("result, exc", [
    ({"prompt_embeds": torch.zeros(1, 2, 2)}, ValueError),  # was: a shape mismatch inside the transformer
    ({"latents": torch.zeros(1, 3, 3)}, ValueError),
    ([1], TypeError),  # was: list.pop(key, default)
], ids=["prompt-embeds-wrong-shape", "latents-wrong-shape", "not-a-dict"])
@pytest.mark.parametrize("name", ["img2img", "controlnet", "klein", "qwen"])
def test_bad_callback_output_is_a_clear_error(name, result, exc):
    """Replacements from ``callback_on_step_end`` are checked when they come back (after the step that
    made them: this cannot be refused before the first model call); the returned dict is not popped."""
    pipe = get_pipe(name)
    before = snapshot(result)
    with pytest.raises(exc, match="step 0"):
        pipe(**valid_kwargs(name), generator=gen(0), callback_on_step_end=_callback(result),
             callback_on_step_end_tensor_inputs=["latents"], jit="7x")
    assert same(before, snapshot(result))


@pytest.mark.parametrize("name", ["img2img", "klein_kv", "qwen"])
def test_callback_returning_none_or_the_same_tensors_changes_nothing(name):
    pipe = get_pipe(name)
    ref = pipe(**valid_kwargs(name), generator=gen(0), jit="7x").images
    for cb in (_callback(None), lambda p, i, t, kw: dict(kw)):
        out = pipe(**valid_kwargs(name), generator=gen(0), callback_on_step_end=cb,
                   callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], jit="7x").images
        assert torch.equal(out, ref)


def _mask_pil():
    m = np.zeros((S, S), np.uint8)
    m[16:48, 16:48] = 255
    return Image.fromarray(m)


VARIANTS = [
    # (pipeline, overrides, expected output shape) - the inputs the checks above must keep accepting
    ("inpaint", lambda: dict(image=pil(), mask_image=_mask_pil(), padding_mask_crop=4, output_type="pil"), None),
    ("inpaint", lambda: dict(masked_image_latents=img() * (1 - mask())), (1, 16, 16)),
    ("inpaint", lambda: dict(latents=torch.randn(1, 4, 8, 8, generator=gen(3))), (1, 16, 16)),
    ("inpaint", lambda: dict(mask_image=mask(1, 32, 48)), (1, 16, 16)),  # a mask of another size is resized
    ("fill", lambda: dict(mask_image=mask(1, 32, 48)), (1, 16, 16)),
    ("fill", lambda: dict(image=None, mask_image=None, masked_image_latents=torch.randn(1, 16, 272, generator=gen(3)),
                          latents=torch.randn(1, 16, 16, generator=gen(4))), (1, 16, 16)),
    ("img2img", lambda: dict(latents=torch.randn(1, 16, 16, generator=gen(3))), (1, 16, 16)),
    ("img2img", lambda: dict(image=torch.randn(1, 4, 8, 8, generator=gen(3))), (1, 16, 16)),  # latent image
    ("img2img", lambda: dict(sigmas=np.linspace(1.0, 0.1, 4)), (1, 16, 16)),
    ("img2img", lambda: dict(image=[pil(), pil(80, 48, seed=2)], **prompt_inputs(2)), (2, 16, 16)),
    ("kontext", lambda: dict(image=None), (1, 16, 16)),
    ("kontext", lambda: dict(image=torch.randn(1, 4, 8, 8, generator=gen(3))), (1, 16, 16)),  # latent reference
    ("kontext", lambda: dict(image=[pil(), pil(seed=1)], num_images_per_prompt=2), (2, 16, 16)),
    ("controlnet", lambda: dict(latents=torch.randn(1, 16, 16, generator=gen(3))), (1, 16, 16)),
    ("klein", lambda: dict(image=None), (1, 8, 8, 8)),
    ("klein", lambda: dict(latents=torch.randn(1, 32, 4, 4, generator=gen(3))), (1, 8, 8, 8)),
    ("klein_kv", lambda: dict(image=None, jit=JiTConfig.preset("7x").replace(token_bucket=8)), (1, 8, 8, 8)),
    ("qwen", lambda: dict(true_cfg_scale=2.0, negative_prompt_embeds=torch.randn(1, 7, 16, generator=gen(4)),
                          negative_prompt_embeds_mask=torch.ones(1, 7, dtype=torch.long)), (1, 64, 16)),
    ("qwen", lambda: dict(latents=torch.randn(1, 64, 16, generator=gen(3))), (1, 64, 16)),
    ("qwen", lambda: dict(sigmas=[1.0, 0.6, 0.3]), (1, 64, 16)),
]


@pytest.mark.parametrize("name, over, shape", VARIANTS,
                         ids=[f"{n}-{'-'.join(o())}" for n, o, _ in VARIANTS])
def test_valid_variants_still_run(name, over, shape):
    pipe = get_pipe(name)
    kwargs = valid_kwargs(name)
    kwargs.update(generator=gen(0), **over())
    jit = kwargs.pop("jit", "7x")
    before = {k: snapshot(v) for k, v in kwargs.items()}
    out = pipe(**kwargs, jit=jit).images
    assert_unchanged(before, kwargs)
    if shape is None:  # PIL output
        assert len(out) == 1 and out[0].size == (S, S)
    else:
        assert tuple(out.shape) == shape and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["img2img", "inpaint", "fill", "kontext", "klein", "klein_kv"])
def test_token_bucket_leaves_the_attention_kwargs_alone(name):
    """token_bucket adds a padding mask to the transformer's attention kwargs: on a copy, never the caller's dict."""
    pipe = get_pipe(name)
    kwargs = valid_kwargs(name)
    if name == "klein_kv":
        kwargs["image"] = None  # token_bucket is refused with KV-cached references
    key = "attention_kwargs" if name in ("klein", "klein_kv") else "joint_attention_kwargs"
    kwargs.update({key: {"scale": 1.0}}, generator=gen(0))
    before = {k: snapshot(v) for k, v in kwargs.items()}
    cfg = JiTConfig.preset("7x").replace(token_bucket=8)
    out = pipe(**kwargs, jit=cfg).images
    assert_unchanged(before, kwargs)
    assert kwargs[key] == {"scale": 1.0} and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_unsplittable_context_parallel_run_is_refused_before_any_model(name):
    """A transformer set up for context parallelism over 2 ranks (what diffusers' ``enable_parallelism``
    leaves on it) cannot split JiT's 5- and 9-token stages of a 4 x 4 grid: refused before the VAE
    encodes anything (the image pipelines used to find out only before the first transformer call)."""
    from diffusers import ContextParallelConfig, ParallelConfig

    pipe = get_pipe(name)
    pipe.transformer._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    try:
        with Spies(pipe) as spies, pytest.raises(ValueError, match="context parallelism over 2 ranks"):
            pipe(**valid_kwargs(name), generator=gen(0), jit="7x")
    finally:
        del pipe.transformer._parallel_config
    assert spies.ran() == {}
