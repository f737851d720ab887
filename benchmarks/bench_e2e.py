"""End-to-end speed of JiT vs dense sampling with the tiny FLUX architecture at the FLUX 1024^2 token count.

    python -m benchmarks.bench_e2e                    # 64 x 64 grid, random weights, CPU
    python -m benchmarks.bench_e2e --grid 32 --repeats 5

Speed does not depend on the weights, so the tiny architecture (2 double + 4 single
blocks, 4 heads x 32) runs randomly initialised at a 64 x 64 token grid (4096 image
tokens + 4 text tokens). Methods run interleaved, ``--repeats`` rounds, medians reported:

- dense 50 / 18 / 11 steps (plain Euler on the same loop, every token every step);
- JiT 4x and 7x (cpp kernels).

For each JiT preset: wall-clock speed-up over dense 50 and over dense at the same number
of steps, beside the FLOP ratio (linear + attention, text tokens included) and the
transformer-time ratio (dense model time / JiT model time); ``realised`` is the wall
speed-up as a fraction of the transformer-time ratio (what the sampler's own work and
Python overhead cost). ``sampler_overhead`` is the share of loop time spent outside the
transformer (the sampler's target: under 3 % of loop time). Results: benchmarks/results/e2e_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.env import command_line, environment, write_results
from jit_eval.tiny_flux import TinyVelocity, build_tiny_flux
from jit_sampler import JiTConfig, beta_sigmas, jit_sample, linear_sigmas, use_anchor_attention
from jit_sampler.report import flux_run_flops

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = build_tiny_flux(seed=0).eval().requires_grad_(False)
    h = w = args.grid
    text_tokens = model.config["cond_tokens"]
    vel = TinyVelocity(model, torch.tensor([3]), grid=(h, w))
    x = torch.randn(1, h * w, 4, generator=torch.Generator().manual_seed(0))
    runs = {
        "dense-50": (JiTConfig.dense(50, backend=args.backend), linear_sigmas(50)),
        "dense-18": (JiTConfig.dense(18, backend=args.backend), linear_sigmas(18)),
        "dense-11": (JiTConfig.dense(11, backend=args.backend), linear_sigmas(11)),
        "JiT 4x": (JiTConfig.preset("4x", backend=args.backend), beta_sigmas(18)),
        "JiT 7x": (JiTConfig.preset("7x", backend=args.backend), beta_sigmas(11)),
        # The same presets with the fused rotary + attention processor (jit_kernels.anchor_attention via AnchorAttnProcessor).
        "JiT 4x + anchor attn": (JiTConfig.preset("4x", backend=args.backend), beta_sigmas(18)),
        "JiT 7x + anchor attn": (JiTConfig.preset("7x", backend=args.backend), beta_sigmas(11)),
    }
    samples = {k: {"wall": [], "model": [], "sampler": []} for k in runs}
    reports = {}
    with torch.no_grad():
        jit_sample(vel, x, h, w, beta_sigmas(11), JiTConfig.preset("7x", backend=args.backend),
                   torch.Generator().manual_seed(0))  # warm-up
        for r in range(args.repeats):
            for name, (cfg, sig) in runs.items():
                with use_anchor_attention(model.transformer, enabled=name.endswith("anchor attn")):
                    _, rep = jit_sample(vel, x, h, w, sig, cfg, torch.Generator().manual_seed(0))
                samples[name]["wall"].append(rep.time_total_s)
                samples[name]["model"].append(rep.time_model_s)
                samples[name]["sampler"].append(rep.time_sampler_s)
                reports[name] = rep
            print(f"round {r + 1}/{args.repeats}: " +
                  ", ".join(f"{k} {v['wall'][-1]:.2f}s" for k, v in samples.items()), flush=True)

    med = {k: {q: statistics.median(v[q]) for q in v} for k, v in samples.items()}
    tcfg = model.transformer.config
    flops = {k: flux_run_flops(tcfg, reports[k].active_tokens, text_tokens) for k in runs}
    rows = []
    for name in runs:
        m = med[name]
        row = {
            "method": name,
            "steps": len(reports[name].active_tokens),
            "wall_s": round(m["wall"], 3),
            "model_s": round(m["model"], 3),
            "sampler_overhead": round(m["sampler"] / m["wall"], 4),
            "linear_share_of_flops": round(flops[name].linear / flops[name].total, 3),
        }
        if name.startswith("JiT"):
            same = f"dense-{row['steps']}"  # the dense baselines run the stock processor
            for ref in ("dense-50", same):
                tag = "dense50" if ref == "dense-50" else "dense_same_steps"
                wall_x = med[ref]["wall"] / m["wall"]
                model_x = med[ref]["model"] / m["model"]
                row[f"speedup_vs_{tag}"] = round(wall_x, 2)
                row[f"flop_ratio_vs_{tag}"] = round(flops[ref].total / flops[name].total, 2)
                row[f"model_time_ratio_vs_{tag}"] = round(model_x, 2)
                row[f"realised_vs_{tag}"] = round(wall_x / model_x, 3)
        rows.append(row)
        print(json.dumps(row), flush=True)

    env = environment()
    env.update(command=command_line("benchmarks.bench_e2e", argv if argv is not None else sys.argv[1:]),
               model="tiny FLUX architecture, random weights (speed does not depend on weights)",
               grid=f"{h} x {w} = {h * w} image tokens + {text_tokens} text tokens")
    stem = Path(args.out) if args.out else RESULTS / "e2e_cpu"
    cols = ["method", "steps", "wall_s", "model_s", "sampler_overhead", "speedup_vs_dense50", "flop_ratio_vs_dense50",
            "model_time_ratio_vs_dense50", "realised_vs_dense50", "speedup_vs_dense_same_steps",
            "flop_ratio_vs_dense_same_steps", "model_time_ratio_vs_dense_same_steps", "realised_vs_dense_same_steps"]
    write_results(stem, "JiT end-to-end speed, tiny FLUX architecture", env, rows, cols,
                  f"Medians of {args.repeats} interleaved rounds.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
