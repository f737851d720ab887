"""``jit-flux``: generate images with the JiT sampler from the command line.

With ``--model`` (a local diffusers folder or a hub id, e.g. ``black-forest-labs/FLUX.1-dev``)
it drives :class:`~jit_sampler.JiTFluxPipeline`; ``--prompt`` is text. Without ``--model``
it runs the embedded tiny class-conditional FLUX (:mod:`jit_eval.tiny_flux`, 32 x 32
MNIST digits, a 16 x 16 token grid) through the same sampler core; ``--prompt`` is then a
digit 0-9. ``--model tiny:random`` uses a randomly initialised tiny model (smoke tests).

The embedded model lives in the evaluation bench (``jit_eval/``, source tree only): the
console script finds it in the checkout an editable install (README's) points at, or on
``sys.path`` when run from a checkout; a wheel install needs ``--model``.

FLUX memory options: ``--offload model|sequential|group`` (diffusers' offload hooks, for an
accelerator ``--device``), ``--gguf FILE`` (the transformer from a GGUF file, e.g. Q8_0 /
Q4_0) or ``--transformer PATH`` (from another diffusers folder or hub id, e.g. a
pre-quantized nf4 / torchao / quanto checkpoint). A ``--model`` folder without the text
encoders or tokenizers is refused before loading.

``--compare`` also runs the dense sampler (``--dense-steps``, default 50) with the same seed
and writes both images side by side with both timings; a JSON report is written next to
``--out``.

Every argument is checked before a model is loaded: a bad one prints the usage and a one-line
``jit-flux: error: ...`` and exits with status 2 (as argparse's own errors do).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import io
import json
import math
import os
import sys
import time

import torch

from .config import JiTConfig, available_presets

__all__ = ["main", "build_parser"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


_OFFLOADS = ("none", "model", "sequential", "group")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jit-flux", description="Generate images with the JiT sampler (arXiv 2603.10744).")
    p.add_argument("--model", default=None,
                   help="diffusers FLUX.1 folder or hub id; default: the embedded tiny MNIST FLUX "
                        "('tiny:random' = untrained tiny model)")
    p.add_argument("--prompt", default=None, help="text prompt (FLUX) or a digit 0-9 (tiny model; default 7)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt for true CFG (FLUX; needs --cfg-scale > 1)")
    p.add_argument("--preset", default="4x", choices=available_presets(), help="JiT preset (default 4x)")
    p.add_argument("--steps", type=int, default=None, help="override the preset's total steps")
    p.add_argument("--dmf", default=None, choices=["assign", "blend", "substeps"], help="override the DMF mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None, help="image height (multiple of 16; FLUX default 1024)")
    p.add_argument("--width", type=int, default=None, help="image width (multiple of 16; FLUX default 1024)")
    p.add_argument("--guidance", type=float, default=3.5, help="embedded guidance (FLUX.1-dev)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="true CFG scale (> 1 enables two passes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="default: bfloat16 on CUDA, else float32")
    p.add_argument("--offload", default="none", choices=_OFFLOADS,
                   help="FLUX: where the weights wait between uses (needs an accelerator --device): none = the whole "
                        "pipeline on --device (default); model = each model moved to --device while it runs; "
                        "sequential = each submodule (least memory, slowest); group = the models' layers streamed "
                        "to --device (diffusers' enable_*_offload)")
    p.add_argument("--gguf", default=None, metavar="FILE",
                   help="FLUX: load the transformer from a GGUF file (Q8_0, Q4_0, ...; needs the gguf package), "
                        "its config and every other component from --model")
    p.add_argument("--transformer", default=None, metavar="PATH",
                   help="FLUX: load the transformer from this diffusers transformer folder or hub id (or a local "
                        "pipeline folder's transformer/) instead of --model's, e.g. a pre-quantized checkpoint "
                        "(nf4, torchao, quanto: its quantization_config is applied)")
    p.add_argument("--out", default="jit.png", help="output image path (a .json report is written beside it)")
    p.add_argument("--compare", action="store_true", help="also run the dense sampler and write both side by side")
    p.add_argument("--dense-steps", type=int, default=50, help="steps of the dense run for --compare (default 50)")
    return p


def _config(args) -> JiTConfig:
    over = {}
    if args.steps is not None:
        over["total_steps"] = args.steps
    if args.dmf is not None:
        over["dmf_mode"] = args.dmf
    return JiTConfig.preset(args.preset, **over)


def _side_by_side(left, right, captions):
    """Two PIL images next to each other with a caption strip under each."""
    from PIL import Image, ImageDraw

    w, h = left.width + right.width, max(left.height, right.height)
    canvas = Image.new("RGB", (w, h + 14), "white")
    canvas.paste(left.convert("RGB"), (0, 0))
    canvas.paste(right.convert("RGB"), (left.width, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, h + 1), captions[0], fill="black")
    draw.text((left.width + 2, h + 1), captions[1], fill="black")
    return canvas


# ----------------------------------------------------------------------------- tiny model
def _tiny_image(tokens: torch.Tensor, unpack, scale: int = 4):
    from PIL import Image

    img = unpack(tokens.float().cpu(), 32, 32)[0, 0]
    arr = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    pil = Image.fromarray(arr, mode="L")
    return pil.resize((32 * scale, 32 * scale), Image.NEAREST)


def _checkout_jit_eval():
    """``jit_eval`` from the source checkout this package lives in, or ``None`` outside a checkout.

    An editable install (README's) maps only the library packages, and a console script does
    not put the working directory on ``sys.path``; the checkout is the folder above this
    package. Imported from its exact location (nothing is added to ``sys.path``).
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    init = os.path.join(root, "jit_eval", "__init__.py")
    if not os.path.isfile(init):
        return None
    spec = importlib.util.spec_from_file_location("jit_eval", init, submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["jit_eval"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["jit_eval"]
        raise
    return module


def _tiny_flux_module():
    """:mod:`jit_eval.tiny_flux`: importable (run from a checkout) or found beside this package."""
    try:
        return importlib.import_module("jit_eval.tiny_flux")
    except ModuleNotFoundError as exc:
        if exc.name != "jit_eval" or _checkout_jit_eval() is None:
            raise
        return importlib.import_module("jit_eval.tiny_flux")


def _run_tiny(args, device, dtype) -> dict:
    # The embedded model belongs to the evaluation bench (jit_eval), which ships in the source
    # tree, not in the wheel: the one place the library reaches it, lazily.
    try:
        tf = _tiny_flux_module()
    except ImportError as exc:
        raise SystemExit(f"jit-flux: the embedded default model lives in the evaluation bench (jit_eval/ in a "
                         f"source checkout), which is not installed here ({exc}); install jit-diffusion from a "
                         f"checkout (pip install -e .) or pass --model <FLUX.1 folder or hub id>")
    TinyVelocity, build_tiny_flux, config_sigmas = tf.TinyVelocity, tf.build_tiny_flux, tf.config_sigmas
    load_tiny_flux, pack_images, unpack_tokens = tf.load_tiny_flux, tf.pack_images, tf.unpack_tokens
    if args.model == "tiny:random":
        m = build_tiny_flux().to(device=device, dtype=dtype).eval().requires_grad_(False)
    else:
        try:
            m = load_tiny_flux(device=device, dtype=dtype)
        except (FileNotFoundError, OSError) as exc:
            raise SystemExit(f"jit-flux: the embedded default model has no trained checkpoint ({exc}); "
                             f"pass --model <FLUX.1 folder or hub id> or --model tiny:random")
    prompt = "7" if args.prompt is None else args.prompt  # a digit 0-9 (checked by _check_args)
    from .report import flop_summary
    from .sampler import jit_sample

    labels = torch.tensor([int(prompt)], device=device)
    cfg_scale = args.cfg_scale if args.cfg_scale > 1 else 1.0  # true CFG only above 1

    def sample(cfg: JiTConfig):
        gen = torch.Generator().manual_seed(args.seed)
        noise = torch.randn(1, 1, 32, 32, generator=gen).to(device=device, dtype=dtype)
        vel = TinyVelocity(m, labels, cfg_scale, backend=cfg.backend, token_bucket=cfg.token_bucket)
        t = time.perf_counter()
        with torch.no_grad():
            y, rep = jit_sample(vel, pack_images(noise), m.height, m.width, config_sigmas(cfg), cfg, gen)
        secs = time.perf_counter() - t
        rep.flops = flop_summary(m.transformer.config, rep.active_tokens, m.height * m.width,
                                 text_tokens=m.config["cond_tokens"], calls_per_step=2 if cfg_scale != 1 else 1)
        return y, rep, secs

    cfg = _config(args)
    y, rep, secs = sample(cfg)
    result = {"model": "tiny:random" if args.model == "tiny:random" else "tiny_flux", "label": int(prompt),
              "jit": {"seconds": secs, "report": rep.as_dict()}}
    img = _tiny_image(y, unpack_tokens)
    print(rep.summary())
    if args.compare:
        dcfg = JiTConfig.dense(args.dense_steps, sigma_schedule=cfg.sigma_schedule, beta_alpha=cfg.beta_alpha,
                               beta_beta=cfg.beta_beta, backend=cfg.backend)
        yd, repd, dsecs = sample(dcfg)
        result["dense"] = {"seconds": dsecs, "steps": args.dense_steps, "report": repd.as_dict()}
        img = _side_by_side(_tiny_image(yd, unpack_tokens), img,
                            [f"dense {args.dense_steps}: {dsecs:.2f}s", f"JiT {cfg.name}: {secs:.2f}s"])
    img.save(args.out)
    return result


# ----------------------------------------------------------------------------- FLUX
def _dtype_kwarg(dtype) -> dict:
    """``dtype=`` for diffusers that renamed ``torch_dtype`` (0.42+, where the old name warns), else ``torch_dtype=``."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (present since the rename)
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def _load_transformer(args, dtype):
    """The ``--gguf`` / ``--transformer`` transformer (``None``: the one in ``--model``)."""
    from diffusers import FluxTransformer2DModel

    if args.gguf is not None:
        from diffusers import GGUFQuantizationConfig

        return FluxTransformer2DModel.from_single_file(
            args.gguf, quantization_config=GGUFQuantizationConfig(compute_dtype=dtype), config=args.model,
            subfolder="transformer", **_dtype_kwarg(dtype))
    if args.transformer is not None:
        sub = {"subfolder": "transformer"} if os.path.isdir(os.path.join(args.transformer, "transformer")) else {}
        return FluxTransformer2DModel.from_pretrained(args.transformer, **sub, **_dtype_kwarg(dtype))
    return None


def _place(pipe, offload: str, device) -> None:
    """Put ``pipe`` on ``device`` (``offload="none"``) or install diffusers' offload hooks onto it."""
    if offload == "none":
        pipe.to(device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:  # group: leaf level, with a side stream to prefetch on CUDA
        dev = torch.device(device)
        pipe.enable_group_offload(onload_device=dev, offload_device=torch.device("cpu"), offload_type="leaf_level",
                                  use_stream=dev.type == "cuda")


def _load_flux(args, device, dtype):
    """The JiT FLUX pipeline of ``--model`` (with ``--gguf`` / ``--transformer``), placed per ``--offload``.

    A failure to load (a hub id not reachable, a file that is not a checkpoint, a missing
    package) is a one-line ``jit-flux: error: ...`` (SystemExit), not a traceback."""
    from .pipelines import JiTFluxPipeline

    what = args.gguf or args.transformer or args.model
    try:
        transformer = _load_transformer(args, dtype)
        extra = {} if transformer is None else {"transformer": transformer}
        what = args.model
        pipe = JiTFluxPipeline.from_pretrained(args.model, **extra, **_dtype_kwarg(dtype))
    except (OSError, ValueError, ImportError, RuntimeError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SystemExit(f"jit-flux: error: cannot load {what!r}: {first}") from exc
    _place(pipe, args.offload, device)
    return pipe


def _quantization(model) -> str | None:
    """The quantization method of a loaded diffusers model (``"gguf"``, ``"torchao"``, ...), or ``None``."""
    q = getattr(model.config, "quantization_config", None) or getattr(getattr(model, "hf_quantizer", None),
                                                                      "quantization_config", None)
    if q is None:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return str(getattr(method, "value", method))


def _run_flux(args, device, dtype) -> dict:
    height, width = args.height or 1024, args.width or 1024  # checked by _check_args
    pipe = _load_flux(args, device, dtype)
    common = dict(prompt=args.prompt, height=height, width=width, guidance_scale=args.guidance)
    if args.negative_prompt is not None:
        common.update(negative_prompt=args.negative_prompt, true_cfg_scale=args.cfg_scale)
    cfg = _config(args)

    def run(**kw):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        img = pipe(generator=torch.Generator("cpu").manual_seed(args.seed), **common, **kw).images[0]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return img, time.perf_counter() - t

    img, secs = run(jit=cfg)
    rep = pipe.last_jit_report
    print(rep.summary())
    result = {"model": args.model, "prompt": args.prompt, "offload": args.offload,
              "transformer": {"from": args.gguf or args.transformer or args.model,
                              "quantization": _quantization(pipe.transformer)},
              "jit": {"seconds": secs, "report": rep.as_dict()}}
    if args.compare:
        dimg, dsecs = run(jit=None, num_inference_steps=args.dense_steps)
        result["dense"] = {"seconds": dsecs, "steps": args.dense_steps}
        img = _side_by_side(dimg, img, [f"dense {args.dense_steps}: {dsecs:.1f}s", f"JiT {cfg.name}: {secs:.1f}s"])
    img.save(args.out)
    return result


_DIGITS = tuple("0123456789")


def _is_tiny(args) -> bool:
    return args.model is None or args.model == "tiny:random"


def _check_device(spec: str) -> str | None:
    """Why ``--device spec`` cannot be used here (``None`` if it can)."""
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        return f"--device: unknown device {spec!r} (expected cpu, cuda, cuda:<index>, mps, ...)"
    if dev.type == "cpu":
        return None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {spec}: no CUDA GPU is available here; use --device cpu"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here"
        return None
    if dev.type == "mps":
        ok = torch.backends.mps.is_available()
    else:  # xpu, ...: a torch submodule with is_available()
        avail = getattr(getattr(torch, dev.type, None), "is_available", None)
        ok = callable(avail) and bool(avail())
    return None if ok else f"--device {spec}: device type {dev.type!r} is not available here"


def _check_out(out: str, mode: str) -> str | None:
    """Why the image (in PIL ``mode``) and its ``.json`` report cannot be written at ``out`` (``None`` if they can)."""
    from PIL import Image

    if os.path.isdir(out):
        return f"--out {out!r} is a directory; give an image file path such as {os.path.join(out, 'jit.png')!r}"
    ext = os.path.splitext(out)[1].lower()
    Image.init()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        return f"--out {out!r}: unknown image file extension {ext or '(none)'!r} (use e.g. .png, .jpg or .webp)"
    try:  # a plugin may be registered for saving but refuse this image mode (or lack its encoder)
        Image.new(mode, (8, 8)).save(io.BytesIO(), format=fmt)
    except Exception as exc:  # noqa: BLE001  (PIL raises OSError, KeyError, ValueError, ...)
        return f"--out {out!r}: cannot write {mode} images as {fmt} ({exc}); use e.g. .png"
    report = os.path.splitext(out)[0] + ".json"
    if os.path.isdir(report):
        return f"--out {out!r}: the report path {report!r} is a directory"
    for path in (out, report):
        if os.path.exists(path) and not os.access(path, os.W_OK):
            return f"--out {out!r}: {path!r} exists and is not writable"
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.exists(parent):  # the nearest existing ancestor must be a writable directory
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"--out {out!r}: {parent!r} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"--out {out!r}: the directory {parent!r} is not writable"
    return None


# What FluxPipeline needs to turn --prompt into embeddings, and the transformer unless given apart.
_TEXT_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


def _check_flux_sources(args) -> str | None:
    """Why the FLUX ``--model`` / ``--gguf`` / ``--transformer`` / ``--offload`` cannot work (``None``
    if they may): checked from the files alone, before anything is loaded."""
    if args.gguf is not None and args.transformer is not None:
        return "give one of --gguf and --transformer (both replace the transformer)"
    if args.gguf is not None:
        if not os.path.isfile(args.gguf):
            return f"--gguf {args.gguf!r}: no such file"
        if importlib.util.find_spec("gguf") is None:
            return "--gguf needs the gguf package (pip install gguf)"
    if args.offload != "none" and torch.device(args.device).type == "cpu":
        return (f"--offload {args.offload} moves weights between the CPU and an accelerator; with --device "
                f"{args.device} everything already is on the CPU: use --offload none (the default)")
    if not os.path.isdir(args.model):
        return None  # a hub id: diffusers resolves it (errors while loading are one line too)
    index = os.path.join(args.model, "model_index.json")
    try:
        with open(index) as f:
            parts = json.load(f)
    except (OSError, ValueError) as exc:
        return f"--model {args.model!r} is not a diffusers pipeline folder (model_index.json: {exc})"
    def missing(name):
        entry = parts.get(name)
        return not (isinstance(entry, list) and entry and entry[0] is not None) or \
            not os.path.isdir(os.path.join(args.model, name))
    lacking = [name for name in _TEXT_PARTS if missing(name)]
    if lacking:
        return (f"--model {args.model!r} has no {' / '.join(lacking)}: jit-flux encodes --prompt with FLUX's CLIP "
                f"and T5 text encoders; use a complete FLUX.1 folder (or, in Python, pass prompt_embeds to "
                f"JiTFluxPipeline)")
    if args.gguf is None and args.transformer is None and missing("transformer"):
        return f"--model {args.model!r} has no transformer: add one, or give --gguf FILE or --transformer PATH"
    return None


def _check_args(args) -> str | None:
    """Every argument check that needs no model: the first problem found, or ``None``."""
    try:
        _config(args)  # the preset overrides
    except ValueError as exc:
        return str(exc)
    for flag, v in (("--guidance", args.guidance), ("--cfg-scale", args.cfg_scale)):
        if not (math.isfinite(v) and v >= 0):
            return f"{flag} must be a finite number >= 0, got {v}"
    if args.dense_steps < 1:
        return f"--dense-steps must be >= 1, got {args.dense_steps}"
    if not -(2 ** 63) <= args.seed < 2 ** 64:
        return f"--seed must fit in 64 bits (-2**63 <= seed < 2**64), got {args.seed}"
    bad_device = _check_device(args.device)
    if bad_device:
        return bad_device
    flux_only = [flag for flag, given in (("--offload", args.offload != "none"), ("--gguf", args.gguf is not None),
                                          ("--transformer", args.transformer is not None)) if given]
    if _is_tiny(args):
        if flux_only:
            return f"{' / '.join(flux_only)} apply to a FLUX.1 --model, not to the embedded tiny model"
        if args.prompt is not None and args.prompt not in _DIGITS:
            return f"the tiny model's --prompt is a digit 0-9, got {args.prompt!r}"
        if args.height not in (None, 32) or args.width not in (None, 32):
            return "the tiny model generates 32 x 32 images only (--height / --width 32 or unset)"
    else:
        if args.prompt is None:
            return "--prompt is required with --model"
        try:
            args.prompt.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes on the command line (surrogate escapes)
            return f"--prompt is not valid text (undecodable bytes): {args.prompt!r}"
        for flag, v in (("--height", args.height), ("--width", args.width)):
            if v is not None and (v <= 0 or v % 16):
                return f"{flag} must be a positive multiple of 16, got {v}"
        problem = _check_flux_sources(args)
        if problem:
            return problem
    mode = "L" if _is_tiny(args) and not args.compare else "RGB"
    return _check_out(args.out, mode)


def _usage_error(parser: argparse.ArgumentParser, message: str) -> int:
    """``parser.error``'s output (usage, then ``jit-flux: error: message``), returning 2 instead of exiting."""
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    """Entry point of the ``jit-flux`` console script; returns the exit status.

    Bad arguments (those argparse itself rejects, and the checks of :func:`_check_args`: preset
    overrides, non-finite or negative numbers, ``--dense-steps``, the seed range, the device,
    the prompt, the image size, the output path, the FLUX folder's parts, ``--gguf`` /
    ``--transformer`` / ``--offload``) print argparse's usage and a one-line ``jit-flux: error: ...``
    and give exit status 2 before any model is loaded; a model that fails to load gives a
    one-line ``jit-flux: error: cannot load ...`` and status 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = _check_args(args)
    if problem:
        return _usage_error(parser, problem)
    device = args.device
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        return _usage_error(parser, f"--out {args.out!r}: cannot create {out_dir!r} ({exc.strerror or exc})")
    try:
        if _is_tiny(args):
            result = _run_tiny(args, device, dtype)
        else:
            result = _run_flux(args, device, dtype)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        return int(exc.code or 0)
    if "dense" in result:
        speed = result["dense"]["seconds"] / result["jit"]["seconds"]
        result["speedup_wall"] = speed
        print(f"dense {result['dense']['steps']} steps: {result['dense']['seconds']:.3f}s; "
              f"JiT: {result['jit']['seconds']:.3f}s; wall-clock speed-up {speed:.2f}x")
    report_path = os.path.splitext(args.out)[0] + ".json"
    with open(report_path, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {args.out} and {report_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
