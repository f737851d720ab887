"""Faithful RAS vs JiT vs JiT with RAS in its final stage, on the embedded tiny FLUX, scored by the quality suite.

    python -m benchmarks.ras_quality                 # 10 seeds x 10 digits -> benchmarks/results/ras_quality.{json,md}

The suite of :mod:`benchmarks.quality` (``run_quality``: same noise, true CFG 3, KID / FD /
precision / recall in the digit classifier's feature space against real held-out digits, ink
bias and PSNR to dense-50, block-by-block FLOPs) with this method list instead of its own:
dense references, JiT 4x / 7x, RAS as published (``jit_sampler.ras``; the 30-step defaults and
shorter runs whose FLOPs sit near JiT's) and JiT with RAS inside its final dense stage
(``jit_eval.rivals.jit_ras_sample``). RAS runs with its per-layer K/V cache; its score is taken
over a token's four values (the tiny model's latent has one channel, ``docs/ras.md``). The
suite's FLOP count sizes attention by the tokens a forward carries, so it under-counts a RAS
step's attention (its queries see all 256 image keys); the linear layers, most of the work, are
exact. The verdict lines are the suite's own (``fidelity_verdicts``: JiT vs the nearest-FLOP
``ras`` row on KID).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.env import command_line, environment, write_results
from benchmarks.quality import REF, Method, _jit_ras_runner, _jit_runner, fidelity_verdicts, run_quality, verdicts
from jit_eval.tiny_flux import TinyVelocity
from jit_sampler import JiTConfig
from jit_sampler.pipelines.ras_attention import use_ras_attention
from jit_sampler.pipelines.ras_pipelines import _ras_class
from jit_sampler.ras import RASConfig, ras_sample
from jit_sampler.schedule import linear_sigmas

RESULTS = Path(__file__).resolve().parent / "results"


def _ras_runner(cfg: RASConfig):
    def run(model, labels, noise, seed, cfg_scale):
        fn = _ras_class(TinyVelocity)(model, labels, cfg_scale)
        with use_ras_attention(model.transformer):
            y, _ = ras_sample(fn, noise, model.height, model.width, linear_sigmas(cfg.num_steps), cfg)
        return y, cfg.num_steps
    return run


def methods() -> list[Method]:
    tiny = dict(pixels_per_token=1)
    ms = [Method(REF, "dense", _jit_runner(JiTConfig.dense(50), linear_sigmas(50)), note="reference")]
    for n in (7, 12, 18):
        ms.append(Method(f"dense-{n}", "dense", _jit_runner(JiTConfig.dense(n), linear_sigmas(n))))
    for p in ("4x", "7x"):
        ms.append(Method(f"JiT {p} assign/independent", "jit",
                         _jit_runner(JiTConfig.preset(p, dmf_mode="assign", dmf_noise="independent"))))
    ras = [("RAS 30 steps, 0.5 (published defaults)", RASConfig(**tiny)),
           ("RAS 20 steps, 0.5, start 4, reset 12", RASConfig(num_steps=20, error_reset_steps=(12,), **tiny)),
           ("RAS 12 steps, 0.5, start 3, reset 7",
            RASConfig(num_steps=12, scheduler_start_step=3, error_reset_steps=(7,), **tiny)),
           ("RAS 12 steps, 0.25, start 3, reset 7",
            RASConfig(num_steps=12, sample_ratio=0.25, scheduler_start_step=3, error_reset_steps=(7,), **tiny))]
    for name, cfg in ras:
        ms.append(Method(name, "ras", _ras_runner(cfg), note="jit_sampler.ras, K/V cache"))
    for p in ("4x", "7x"):
        cfg = JiTConfig.preset(p, dmf_mode="assign", dmf_noise="independent")
        ms.append(Method(f"JiT {p} + RAS 0.5 in the final stage", "jit+ras", _jit_ras_runner(cfg, 0.5)))
    return ms


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=10, help="seeds per method (x 10 digits)")
    p.add_argument("--repeats", type=int, default=1, help="timing repeats of the seed-0 batch")
    p.add_argument("--model", default="tiny", help="embedded checkpoint: tiny | tiny-subsets")
    p.add_argument("--out", default=str(RESULTS / "ras_quality"), help="results stem (.json and .md are written)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from jit_eval.tiny_flux import load_tiny_flux

    model = load_tiny_flux(args.model) if args.model != "tiny" else load_tiny_flux()
    res = run_quality(seeds=args.seeds, repeats=args.repeats, model=model, methods=methods())
    env = environment()
    env["command"] = command_line("benchmarks.ras_quality", argv)
    env["model"] = args.model
    rows = [r for r in res["rows"]]
    cols = ["method", "family", "steps", "images", "flop_ratio", "speedup", "accuracy", "kid", "kid_std", "fd",
            "precision", "recall", "ink_bias_pct", "psnr_db"]
    lines = verdicts(rows) + fidelity_verdicts(rows)
    write_results(args.out, f"Faithful RAS vs JiT vs JiT + RAS on the tiny FLUX ({args.model}, "
                            f"{res['images']} images per row)", env, rows, cols,
                  "Scores as in benchmarks.quality (KID x 1e-3 scale as printed there: lower is closer to the real "
                  "digits; `flop_ratio` and `speedup` vs dense-50 in this process). Verdicts:\n\n"
                  + "\n".join(f"- {v}" for v in lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
