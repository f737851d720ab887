"""Data parallelism on the embedded tiny FLUX: (digit, seed) jobs sharded over ``torchrun`` ranks.

    torchrun --nproc_per_node 2 -m jit_eval.distributed --digits 0 1 2 3 --seeds 0 1 --out out/dp
    python -m jit_eval.distributed --digits 0 1 2 3 --seeds 0 1 --out out/sp   # same images

Uses :func:`jit_sampler.distributed.run_sharded`; each job is one image from its own seed,
so the images equal a single process's, bit for bit on CPU with the same thread count.
Writes ``images.pt`` and ``manifest.json`` (per-job SHA-256 prefixes) on rank 0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os

import torch
import torch.distributed as dist

from jit_sampler import JiTConfig, available_presets
from jit_sampler.distributed import init_distributed, run_sharded

from .tiny_flux import load_tiny_flux, sample_tiny, unpack_tokens

__all__ = ["generate_tiny", "main"]


def generate_tiny(model, digit: int, seed: int, config, cfg_scale: float = 1.0) -> torch.Tensor:
    """One digit image ``[1, 32, 32]`` in ``[-1, 1]`` from the tiny FLUX: noise and every JiT draw from ``seed``."""
    noise = torch.randn(1, 256, 4, generator=torch.Generator().manual_seed(seed))
    y, _ = sample_tiny(model, torch.tensor([digit]), noise, config, seed=seed, cfg_scale=cfg_scale)
    return unpack_tokens(y)[0].clamp(-1, 1)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="JiT on the tiny FLUX, (digit, seed) jobs sharded over torchrun ranks")
    p.add_argument("--digits", type=int, nargs="+", default=list(range(10)))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--preset", default="4x", choices=available_presets())
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (results depend on it)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    bad = [d for d in args.digits if not 0 <= d <= 9]
    if bad:
        p.error(f"--digits must be 0-9, got {bad}")
    torch.set_num_threads(args.threads)
    rank, world = init_distributed()
    model = load_tiny_flux()
    cfg = JiTConfig.preset(args.preset)
    jobs = [(d, s) for d in args.digits for s in args.seeds]
    images = run_sharded(lambda job: generate_tiny(model, job[0], job[1], cfg, args.cfg_scale), jobs)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        stack = torch.stack(images)
        torch.save(stack, os.path.join(args.out, "images.pt"))
        manifest = {"world_size": world, "preset": args.preset, "threads": args.threads,
                    "jobs": [{"digit": d, "seed": s, "sha256_16": _digest(img)} for (d, s), img in zip(jobs, images)]}
        with open(os.path.join(args.out, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        print(f"rank 0 of {world}: wrote {len(jobs)} images to {args.out}")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
