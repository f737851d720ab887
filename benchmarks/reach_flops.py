"""What the reach workflows (references, img2img, few steps, KV, Qwen-Image) do to JiT's FLOP saving.

    python -m benchmarks.reach_flops            # -> benchmarks/results/reach_flops.{json,md}

FLOPs do not depend on weights, so this needs no model: every row runs :func:`jit_sample` on a
64 x 64 token grid (1024^2 pixels) with a zero velocity, so that the sampler itself decides the
active tokens of every step (stage layout, few-step rule, budgets), and counts the transformer's
FLOPs for those steps with :func:`jit_sampler.report.flop_summary` at the real model's dimensions
(FLUX.1-dev, 512 text tokens; Qwen-Image's default config, 128 text tokens, true CFG). The
pipeline tests check that each pipeline hands the sampler exactly these configurations (the
token counts per transformer call in ``tests/pipelines/test_flux_img2img.py``, ``test_flux_kontext.py``,
``test_flux2_reference.py``, ``test_flux_controlnet.py``, ``test_qwen_image.py`` and
``tests/sampler/test_few_steps.py``).

Beside each counted ratio stands the prediction of the linear cost model of docs/method.md
section 7 (work per step linear in the tokens a call carries): for a run with ``S`` steps of
token shares ``r_i`` and ``R`` dense reference tokens (as a share of the ``N`` target tokens),
``(S * (1 + R)) / (sum(r_i) + S * R)`` against dense at the same steps.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import torch

from benchmarks.env import command_line, environment, write_results
from jit_sampler import JiTConfig, beta_sigmas, jit_sample
from jit_sampler.report import FLUX1_DEV_CONFIG, flop_summary

RESULTS = Path(__file__).resolve().parent / "results"
GRID = 64
N = GRID * GRID


def active_tokens(cfg: JiTConfig) -> list[int]:
    """The active tokens of every step, as the sampler chooses them (zero velocity, seeded)."""
    x = torch.zeros(1, N, 4)
    _, report = jit_sample(lambda x_act, idx, sigma, step: torch.zeros_like(x_act), x, GRID, GRID,
                           beta_sigmas(cfg.total_steps), cfg, torch.Generator().manual_seed(0))
    return report.active_tokens


def qwen_config() -> dict:
    """Qwen-Image's transformer dimensions: diffusers' defaults of ``QwenImageTransformer2DModel``."""
    from diffusers import QwenImageTransformer2DModel

    from jit_sampler.pipelines.qwen_image import qwen_flop_config

    params = inspect.signature(QwenImageTransformer2DModel.__init__).parameters
    return qwen_flop_config({k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty})


def img2img_steps(total: int, strength: float) -> int:
    """The steps an img2img run keeps of ``total`` (diffusers' ``get_timesteps``)."""
    return total - int(total - min(total * strength, total))


def predicted(tokens: list[int], extra: list[int]) -> float:
    s = len(tokens)
    return sum(N + e for e in extra) / sum(t + e for t, e in zip(tokens, extra)) if s else float("nan")


def cases() -> list[dict]:
    p7, p4 = JiTConfig.preset("7x"), JiTConfig.preset("4x")
    flux, qwen = (FLUX1_DEV_CONFIG, 512, 1), (qwen_config(), 128, 2)
    rows = [
        ("text-to-image", "7x", p7, 0, flux),
        ("text-to-image", "4x", p4, 0, flux),
        ("Kontext / FLUX.2 image=, one 1024^2 reference", "7x", p7, N, flux),
        ("Kontext / FLUX.2 image=, one 1024^2 reference", "4x", p4, N, flux),
        ("FLUX.2-klein KV, one 1024^2 reference (first call only)", "7x", p7, "kv", flux),
        ("img2img / inpaint / Fill, strength 0.6", "7x", p7.replace(total_steps=img2img_steps(11, 0.6)), 0, flux),
        ("img2img / inpaint / Fill, strength 0.6", "4x", p4.replace(total_steps=img2img_steps(18, 0.6)), 0, flux),
        ("img2img, strength 0.2", "7x", p7.replace(total_steps=img2img_steps(11, 0.2)), 0, flux),
        ("few steps (schnell, distilled klein), 4 steps", "7x", p7.replace(total_steps=4), 0, flux),
        ("few steps, 4 steps", "4x", p4.replace(total_steps=4), 0, flux),
        ("few steps, 2 steps", "7x", p7.replace(total_steps=2), 0, flux),
        ("Qwen-Image, true CFG", "7x", p7, 0, qwen),
        ("Qwen-Image, true CFG", "4x", p4, 0, qwen),
    ]
    out = []
    for case, preset, cfg, ref, (model, text, calls) in rows:
        tokens = active_tokens(cfg)
        extra = [N] + [0] * (len(tokens) - 1) if ref == "kv" else [int(ref)] * len(tokens)
        f = flop_summary(model, tokens, N, text_tokens=text, calls_per_step=calls, extra_tokens=extra)
        same, base = f["speedup_vs_same_steps"], f["speedup_vs_baseline"]
        out.append({
            "case": case, "preset": preset, "steps": cfg.total_steps,
            "steps_per_stage": " / ".join(map(str, cfg.stage_steps)),
            "tokens_per_stage": " / ".join(map(str, cfg.token_counts(N))),
            "reference_tokens": "4096 (call 1)" if ref == "kv" else int(ref),
            "predicted_vs_same_steps": round(predicted(tokens, extra), 3),
            "image_linear_vs_same_steps": round(same["image_linear"], 3),
            "total_vs_same_steps": round(same["total"], 3),
            "image_linear_vs_dense50": round(base["image_linear"], 2),
            "total_vs_dense50": round(base["total"], 2),
        })
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(RESULTS / "reach_flops"), help="results stem (.json and .md are written)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    env = environment()
    env["command"] = command_line("benchmarks.reach_flops", argv)
    rows = cases()
    cols = ["case", "preset", "steps", "steps_per_stage", "tokens_per_stage", "reference_tokens",
            "predicted_vs_same_steps", "image_linear_vs_same_steps", "total_vs_same_steps",
            "image_linear_vs_dense50", "total_vs_dense50"]
    write_results(args.out, "JiT's FLOP saving across the reach workflows (64 x 64 tokens, real model dimensions)",
                  env, rows, cols,
                  "Active tokens per step chosen by jit_sample itself; FLOPs from flop_summary at FLUX.1-dev's "
                  "dimensions (512 text tokens) or Qwen-Image's (128 text tokens, 2 calls per step). `predicted`: "
                  "the linear cost model of docs/method.md section 7. `vs dense50`: against 50 dense steps of the "
                  "same workflow (for img2img and few steps this is not what users run; the same-steps column is "
                  "the spatial saving).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
