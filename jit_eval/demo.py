"""The main job on the embedded tiny FLUX: dense 50 steps vs JiT presets, same seeds.

    jit-flux --out out                     (what README's first command runs)
    python -m jit_eval.demo --out out --seeds 3 --repeats 3

For each digit 0-9 and each seed, the same initial noise is integrated by the
dense 50-step Euler sampler (the reference output) and by JiT with each preset.
Wall times are medians over interleaved repeats in one process; fidelity is
PSNR / SSIM of each JiT image against the dense-50 image of the same seed and
digit. Writes ``<out>/jit_demo.png`` (one row per method, named on the left: dense-50,
then each preset; columns: digits x seeds), ``jit_demo.json`` and ``jit_demo.md``.
``--model tiny-subsets`` runs the checkpoint that also saw token subsets in training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from jit_sampler import JiTConfig, linear_sigmas
from jit_sampler.report import flux_run_flops

from .metrics import psnr, ssim
from .tiny_flux import CHECKPOINTS, load_tiny_flux, sample_tiny, unpack_tokens
from .tiny_flux.scenes import prompts_for

__all__ = ["run_demo", "main"]


def run_demo(out_dir: str, presets=("4x", "7x"), seeds: int = 2, repeats: int = 3, cfg_scale: float = 3.0,
             model=None, dense_steps: int = 50, device: str = "cpu", log=print, checkpoint: str = "tiny") -> dict:
    os.makedirs(out_dir, exist_ok=True)
    model_name = checkpoint if model is None else "custom"
    model = model or load_tiny_flux(checkpoint, device=device)
    prompts = prompts_for(model, 10).to(device)  # digits 0-9, or ten scene prompts (tiny-scenes)
    labels = prompts.repeat(seeds, *([1] * (prompts.dim() - 1)))  # prompt-major within each seed
    tokens = model.height * model.width
    noise = torch.cat([torch.randn(10, tokens, 4, generator=torch.Generator().manual_seed(s)) for s in range(seeds)])
    noise = noise.to(device)
    runs = {f"dense-{dense_steps}": (JiTConfig.dense(dense_steps), linear_sigmas(dense_steps))}
    for p in presets:
        cfg = JiTConfig.preset(p)
        runs[f"JiT {p}"] = (cfg, None)
    times = {k: [] for k in runs}
    outputs, reports = {}, {}
    for r in range(repeats):  # interleaved, so machine drift hits every method alike
        for name, (cfg, sig) in runs.items():
            t0 = time.perf_counter()
            y, rep = sample_tiny(model, labels, noise, cfg, sigmas=sig, seed=1000, cfg_scale=cfg_scale)
            times[name].append(time.perf_counter() - t0)
            outputs[name], reports[name] = y, rep
        log(f"round {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    ref_name = f"dense-{dense_steps}"
    size = model.image_size
    ref_img = unpack_tokens(outputs[ref_name], size, size).clamp(-1, 1)
    tcfg = model.transformer.config
    cond_tokens = model.config["cond_tokens"] * (model.slots or 1)
    dense_flops = flux_run_flops(tcfg, [tokens] * dense_steps, cond_tokens).total
    rows = []
    for name in runs:
        img = unpack_tokens(outputs[name], size, size).clamp(-1, 1)
        rep = reports[name]
        med = statistics.median(times[name])
        fl = flux_run_flops(tcfg, rep.active_tokens, cond_tokens).total
        row = {
            "method": name,
            "steps": len(rep.active_tokens),
            "model_calls": rep.model_calls,
            "full_step_equivalents": round(sum(rep.active_tokens) / tokens, 2),
            "time_s": round(med, 3),
            "speedup_vs_dense50": round(statistics.median(times[ref_name]) / med, 2),
            "flop_ratio_vs_dense50": round(dense_flops / fl, 2),
            "model_time_share": round(rep.time_model_s / max(rep.time_total_s, 1e-9), 3),
        }
        if name != ref_name:
            row["psnr_db"] = round(float(psnr(img, ref_img).mean()), 2)
            row["ssim"] = round(float(ssim(img, ref_img).mean()), 4)
        rows.append(row)
    _save_grid(os.path.join(out_dir, "jit_demo.png"), [unpack_tokens(outputs[k], size, size) for k in runs], list(runs))
    result = {
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "images": f"{len(labels)} ({'scene prompts' if model.slots else 'digits 0-9'} x {seeds} seeds)",
        "model": model_name,
        "cfg_scale": cfg_scale,
        "repeats": repeats,
        "rows": rows,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    with open(os.path.join(out_dir, "jit_demo.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = _markdown(result)
    with open(os.path.join(out_dir, "jit_demo.md"), "w") as f:
        f.write(md)
    log(md)
    return result


def _markdown(result: dict) -> str:
    cols = ["method", "steps", "model_calls", "full_step_equivalents", "time_s", "speedup_vs_dense50",
            "flop_ratio_vs_dense50", "psnr_db", "ssim"]
    lines = [f"JiT on the embedded tiny FLUX: {result['images']}, median of {result['repeats']} interleaved runs",
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        lines.append("| " + " | ".join(str(r.get(c, "ref")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _save_grid(path: str, images: list[torch.Tensor], names: list[str]) -> None:
    """One row per method (its name in a strip on the left), one column per image."""
    from PIL import Image, ImageDraw

    pad, scale, label_w = 2, 2, 84
    n = images[0].shape[0]
    h = w = images[0].shape[-1]
    canvas = torch.ones(len(images) * (h + pad) + pad, n * (w + pad) + pad)
    for r, img in enumerate(images):
        img = ((img.clamp(-1, 1) + 1) / 2)[:, 0]
        for j in range(n):
            y0, x0 = pad + r * (h + pad), pad + j * (w + pad)
            canvas[y0:y0 + h, x0:x0 + w] = img[j]
    arr = (canvas * 255).round().to(torch.uint8).numpy()
    grid = Image.fromarray(arr, mode="L").resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    out = Image.new("L", (label_w + grid.width, grid.height), 255)
    out.paste(grid, (label_w, 0))
    draw = ImageDraw.Draw(out)
    for r, name in enumerate(names):
        draw.text((4, scale * (pad + r * (h + pad)) + scale * h // 2 - 5), name, fill=0)
    out.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="JiT vs dense sampling on the embedded tiny FLUX")
    p.add_argument("--out", default="out")
    p.add_argument("--presets", nargs="+", default=["4x", "7x"])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cfg-scale", type=float, default=3.0, help="true CFG scale (null label as negative; 1 = off)")
    p.add_argument("--model", default="tiny", choices=sorted(CHECKPOINTS),
                   help="committed checkpoint: 'tiny' (full grids only), 'tiny-subsets' (also token subsets) or "
                        "'tiny-scenes' (64 x 64 scenes of four digits, 1,024 tokens)")
    args = p.parse_args(argv)
    run_demo(args.out, tuple(args.presets), args.seeds, args.repeats, args.cfg_scale, checkpoint=args.model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
