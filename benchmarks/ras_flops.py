"""FLOP ratios of RAS, JiT and RAS inside JiT's final dense stage at real scale (SD3.5 Large, FLUX.1-dev, 1024^2).

    python -m benchmarks.ras_flops            # -> benchmarks/results/ras_flops.{json,md}

FLOPs do not depend on weights, so no model is loaded: on a 64 x 64 token grid (1024^2 pixels)
the samplers choose the tokens of every step themselves: :func:`jit_sampler.ras.ras_sample`
(the published defaults, a seeded random velocity: RAS's *which* tokens depends on the values,
its *how many* does not) and :func:`jit_sampler.jit_sample` (zero velocity, as
``benchmarks.reach_flops``). FLOPs come from :func:`jit_sampler.report.flop_summary` at each
model's dimensions: FLUX.1-dev (512 text tokens, guidance-distilled: one call per step) and
SD3.5 Large (``sd3_flop_config``; 77 + 256 text tokens, CFG: two calls per step).

RAS's K/V cache changes the attention term: a computed token attends to all ``N`` image tokens
(and the text), so a step with ``M`` computed tokens costs ``(M + T)(N + T)`` per block in
``QK^T`` and ``AV``, not ``(M + T)^2``; the ``total`` column adds that difference.

The composition rowss ("RAS in JiT's final stage") run :func:`jit_sample` with
:class:`jit_sampler.ras.RASFinalStage`: JiT's stages, and on the final dense stage RAS (its first
step dense, then ``sample_ratio`` 0.5 of the tokens).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.env import command_line, environment, write_results
from jit_sampler import JiTConfig, beta_sigmas, jit_sample, linear_sigmas
from jit_sampler.pipelines.sd3 import sd3_flop_config
from jit_sampler.ras import RASConfig, RASFinalStage, ras_sample
from jit_sampler.report import FLUX1_DEV_CONFIG, flop_summary

RESULTS = Path(__file__).resolve().parent / "results"
GRID = 64
N = GRID * GRID

#: SD3.5 Large's transformer (diffusers config keys of stabilityai/stable-diffusion-3.5-large).
SD35_LARGE_CONFIG = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                         num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")


def ras_tokens(cfg: RASConfig) -> list[int]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, N, 64, generator=g)
    _, rep = ras_sample(lambda x_act, idx, sigma, step: torch.randn(x_act.shape, generator=g), x, GRID, GRID,
                        linear_sigmas(cfg.num_steps), cfg.replace(kv_cache=False))
    return rep.active_tokens


def jit_tokens(cfg: JiTConfig) -> list[int]:
    x = torch.zeros(1, N, 64)
    _, rep = jit_sample(lambda x_act, idx, sigma, step: torch.zeros_like(x_act), x, GRID, GRID,
                        beta_sigmas(cfg.total_steps), cfg, torch.Generator().manual_seed(0))
    return rep.active_tokens


def composed_tokens(jit_cfg: JiTConfig, ratio: float = 0.5) -> list[int]:
    """Tokens computed per step by jit_sample with RAS in its final stage (RASFinalStage), seeded random velocity."""
    g = torch.Generator().manual_seed(0)
    sig = beta_sigmas(jit_cfg.total_steps)
    stage = RASFinalStage(lambda x_act, idx, sigma, step: torch.randn(x_act.shape, generator=g),
                          RASConfig(sample_ratio=ratio, kv_cache=False), jit_cfg, sig, GRID, GRID)
    jit_sample(stage, torch.randn(1, N, 64, generator=g), GRID, GRID, sig, jit_cfg, torch.Generator().manual_seed(0))
    return stage.active_tokens


def kv_attention_extra(config: dict, tokens: list[int], text: int, calls: int) -> float:
    """FLOPs RAS's K/V cache adds to flux_transformer_flops' attention: ``(M+T)(N+T) - (M+T)^2`` per block."""
    d = config["num_attention_heads"] * config["attention_head_dim"]
    blocks = config["num_layers"] + config["num_single_layers"]
    return sum(calls * blocks * 2.0 * 2 * d * ((m + text) * (N + text) - (m + text) ** 2) for m in tokens)


def rows() -> list[dict]:
    models = [("FLUX.1-dev", FLUX1_DEV_CONFIG, 512, 1), ("SD3.5 Large", sd3_flop_config(SD35_LARGE_CONFIG), 333, 2)]
    p7, p4 = JiTConfig.preset("7x"), JiTConfig.preset("4x")
    methods = [
        ("RAS (published defaults: 30 steps, ratio 0.5, start 4, resets 12, 22)", "ras", ras_tokens(RASConfig())),
        ("RAS, ratio 0.25", "ras", ras_tokens(RASConfig(sample_ratio=0.25))),
        ("JiT 4x", "jit", jit_tokens(p4)),
        ("JiT 7x", "jit", jit_tokens(p7)),
        ("JiT 7x + RAS 0.5 in the final stage", "ras", composed_tokens(p7)),
        ("JiT 4x + RAS 0.5 in the final stage", "ras", composed_tokens(p4)),
    ]
    out = []
    for model, config, text, calls in models:
        for name, kind, tokens in methods:
            f = flop_summary(config, tokens, N, text_tokens=text, calls_per_step=calls)
            extra = kv_attention_extra(config, tokens, text, calls) if kind == "ras" else 0.0
            total = f["jit"]["total"] + extra
            out.append({
                "model": model, "method": name, "steps": len(tokens),
                "full_step_equivalents": round(sum(tokens) / N, 2),
                "image_linear_vs_same_steps": round(f["speedup_vs_same_steps"]["image_linear"], 3),
                "total_vs_same_steps": round(f["dense_same_steps"]["total"] / total, 3),
                "image_linear_vs_dense50": round(f["speedup_vs_baseline"]["image_linear"], 2),
                "total_vs_dense50": round(f["dense_baseline"]["total"] / total, 2),
                "tflops_per_image": round(total / 1e12, 1),
            })
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(RESULTS / "ras_flops"), help="results stem (.json and .md are written)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    env = environment()
    env["command"] = command_line("benchmarks.ras_flops", argv)
    cols = ["model", "method", "steps", "full_step_equivalents", "image_linear_vs_same_steps", "total_vs_same_steps",
            "image_linear_vs_dense50", "total_vs_dense50", "tflops_per_image"]
    write_results(args.out, "RAS, JiT and RAS in JiT's final stage: FLOP ratios at 1024^2 (64 x 64 tokens)", env,
                  rows(), cols,
                  "Tokens per step chosen by ras_sample / jit_sample on the 64 x 64 grid; FLOPs from flop_summary at "
                  "the real dimensions (per image; CFG counted for SD3.5 Large). `total` includes attention, with "
                  "RAS's "
                  "K/V cache (computed tokens attend to all tokens). `vs dense50`: 50 dense steps of the same model. "
                  "`+ RAS in the final stage`: jit_sample with RASFinalStage. Quality is not measured here.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
