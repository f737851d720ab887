"""One rank of tests/pipelines/test_context_parallel.py (run by torchrun with 2 gloo ranks on CPU).

JiT on the tiny FLUX.1 and FLUX.2-klein pipelines, once in this process without parallelism
(the reference) and once with diffusers' Ulysses context parallelism over the 2 ranks
(``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))``), same
seed, same config. Writes ``rank<r>.json`` (the max abs differences, the stage token counts,
the transformer calls, the error messages of the refused configurations) into the directory
given as the first argument.

CPU-only workaround: diffusers places rank ``r`` on device ``r % torch.accelerator.device_count()``,
which is ``r % 0`` without an accelerator, so this worker makes ``device_count`` return 1 (every
rank runs on the CPU). Nothing in the library does this.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))  # the repo root

from tests._fixtures.flux2 import build_klein  # noqa: E402
from tests._fixtures.flux import build_pipe, prompt_inputs  # noqa: E402  (sets one torch thread)

H, W = 128, 192  # an 8 x 12 token grid: 96 tokens, 7x stages 30 / 57 / 96 (57 is odd)


def _flux1(cfg, cp, negative=False, **extra):
    from jit_sampler.pipelines.flux import JiTFluxPipeline

    pipe = build_pipe(JiTFluxPipeline)
    if cp is not None:
        pipe.transformer.enable_parallelism(config=cp)
    kw = dict(prompt_inputs(), height=H, width=W, output_type="latent", generator=torch.Generator().manual_seed(0))
    if negative:
        kw.update(prompt_inputs(seed=2, prefix="negative_"), true_cfg_scale=3.0)
    kw.update(extra)
    return pipe, kw, lambda: pipe(jit=cfg, **kw).images


def _flux2(cfg, cp, text=6, **extra):
    from jit_sampler.pipelines.flux2_klein import JiTFlux2KleinPipeline

    pipe = build_klein(JiTFlux2KleinPipeline)
    if cp is not None:
        pipe.transformer.enable_parallelism(config=cp)
    g = torch.Generator().manual_seed(1)
    kw = dict(prompt_embeds=torch.randn(1, text, 32, generator=g),
              negative_prompt_embeds=torch.randn(1, text, 32, generator=g), guidance_scale=4.0, height=H, width=W,
              output_type="latent", generator=torch.Generator().manual_seed(0))
    kw.update(extra)
    return pipe, kw, lambda: pipe(jit=cfg, **kw).images


def _counted(pipe):
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.accelerator.device_count = lambda: 1  # see the module docstring
    from diffusers import ContextParallelConfig

    from jit_sampler import JiTConfig

    ulysses = ContextParallelConfig(ulysses_degree=2)
    res = {}
    cases = {
        "flux1_token_multiple": (_flux1, JiTConfig.preset("7x", token_multiple=2), {}),
        # bucket 64: the 30-token stage is padded by 34, more than the last rank's chunk of 32
        "flux1_token_bucket": (_flux1, JiTConfig.preset("7x", token_bucket=64), {"negative": True}),
        "flux1_per_sample": (_flux1, JiTConfig.preset("7x", token_multiple=2, anchor_policy="per_sample"),
                             {"num_images_per_prompt": 2}),
        "flux2_token_multiple": (_flux2, JiTConfig.preset("7x", token_multiple=2), {}),
        "flux2_token_bucket": (_flux2, JiTConfig.preset("7x", token_bucket=64), {}),
    }
    with torch.no_grad():
        for name, (build, cfg, extra) in cases.items():
            ref = build(cfg, None, **extra)[2]()
            pipe, _, run = build(cfg, ulysses, **extra)
            calls = _counted(pipe)
            out = run()
            res[name] = {"diff": (out - ref).abs().max().item(), "scale": ref.abs().max().item(),
                         "tokens": pipe.last_jit_report.active_tokens, "calls": len(calls),
                         "finite": bool(torch.isfinite(out).all())}

        # Refused before the first transformer call.
        for name, (build, cfg, extra) in {
            "bad_flux1_counts": (_flux1, JiTConfig.preset("7x"), {}),
            "bad_flux1_bucket": (_flux1, JiTConfig.preset("7x", token_bucket=7), {}),
            "bad_flux2_text": (_flux2, JiTConfig.preset("7x", token_multiple=2), {"text": 5}),
        }.items():
            pipe, _, run = build(cfg, ulysses, **extra)
            calls = _counted(pipe)
            try:
                run()
                res[name] = {"error": "", "calls": len(calls)}
            except ValueError as exc:
                res[name] = {"error": str(exc), "calls": len(calls)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
