"""anchor_attention vs the stock FLUX path (diffusers' apply_rotary_emb on q and k, then SDPA).

    python -m benchmarks.bench_attention                     # CPU, fp32: op rows + tiny-Flux forwards
    python -m benchmarks.bench_attention --device cuda       # GPU, bf16, timed with triton.testing.do_bench
    python -m benchmarks.bench_attention --device cuda --no-flux --variants   # + both Triton kernels (v1, v2)
    python -m benchmarks.bench_attention --device cuda --sweep   # + v2 with every tile config of V2_SWEEP

Op rows: 512 text tokens + 1310 / 2457 / 4096 anchor tokens (the JiT stage sizes of a
64 x 64 FLUX grid), with 4 heads x 32 (the tiny model) and 24 heads x 128 (FLUX.1), batch 1.
"stock" is exactly what diffusers' FluxAttnProcessor does between the q/k norms and the
output projection: ``apply_rotary_emb(q)``, ``apply_rotary_emb(k)``, then
``scaled_dot_product_attention`` on [B, H, L, D] views (its native backend). "ours" is
``jit_kernels.anchor_attention`` on the backend ``--backend`` picks (auto: the C++ kernel on
CPU, Triton on CUDA). Forward rows: the tiny FLUX transformer (2 + 2 blocks, 4 x 32 heads,
4 text tokens) on a full 64 x 64 grid (4096 tokens) and on 1310 scattered anchors, with the
stock processors and with ``AnchorAttnProcessor``. CPU times are medians of interleaved
rounds (every implementation runs once per round). Results go to
benchmarks/results/attention_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import jit_kernels as jk
from benchmarks.bench_ops import time_interleaved
from benchmarks.env import command_line, environment, write_results

RESULTS = Path(__file__).resolve().parent / "results"
TEXT = 512
IMAGES = (1310, 2457, 4096)
AXES = {32: (8, 12, 12), 128: (16, 56, 56)}


def rope_tables(ids: torch.Tensor, axes, theta: float = 10000.0):
    """FluxPosEmbed's (cos, sin) ``[L, D]`` for ``ids [L, 3]`` (float64 frequencies, interleaved pairs)."""
    cos, sin = [], []
    for i, a in enumerate(axes):
        freqs = 1.0 / theta ** (torch.arange(0, a, 2, dtype=torch.float64) / a)
        ang = ids[:, i].double()[:, None] * freqs[None, :]
        cos.append(ang.cos().repeat_interleave(2, dim=1).float())
        sin.append(ang.sin().repeat_interleave(2, dim=1).float())
    return torch.cat(cos, 1), torch.cat(sin, 1)


def anchor_ids(text: int, anchors: int, grid: int = 64, seed: int = 0) -> torch.Tensor:
    ids = torch.zeros(text + anchors, 3)
    cells = torch.randperm(grid * grid, generator=torch.Generator().manual_seed(seed))[:anchors]
    ids[text:, 1] = (cells // grid).float()
    ids[text:, 2] = (cells % grid).float()
    return ids


def _apply_rotary(x, cos, sin):
    try:
        from diffusers.models.embeddings import apply_rotary_emb

        return apply_rotary_emb(x, (cos, sin), sequence_dim=1)
    except ImportError:  # the same math (diffusers 0.42 use_real_unbind_dim=-1)
        xr, xi = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
        rot = torch.stack([-xi, xr], dim=-1).flatten(3)
        return (x.float() * cos[None, :, None] + rot.float() * sin[None, :, None]).to(x.dtype)


def stock_attention(q, k, v, cos, sin):
    """FluxAttnProcessor's rotary + native SDPA, ``[B, L, H, D]`` in and out."""
    q = _apply_rotary(q, cos, sin)
    k = _apply_rotary(k, cos, sin)
    q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3)


# Tile configs (BLOCK_M, BLOCK_N, num_warps, num_stages) of the v2 kernel timed by ``--sweep`` and by
# the GPU kit; all lower for sm_90 without spills (``python -m jit_kernels.triton.aot`` style check:
# 80-224 KB of shared memory, 156-246 registers at 24 x 128 bf16). Stage 1 rows: the v1 lesson
# (benchmarks/NOTES.md), in case pipelining hurts here too.
V2_SWEEP = ((128, 64, 8, 3), (128, 64, 8, 2), (128, 64, 8, 4), (128, 128, 8, 2), (128, 128, 8, 3),
            (64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 4, 3), (128, 64, 8, 1), (64, 64, 4, 1))


def variant_fns(q, k, v, cos, sin, sweep: bool = False) -> dict:
    """Callables timing the Triton kernels directly (no public-op checks): ``triton_v1``,
    ``triton_v2`` (heuristic tiles) and, with ``sweep``, ``v2_<BM>x<BN>w<warps>s<stages>``
    for every config of :data:`V2_SWEEP`. CUDA tensors (or CPU ones under ``TRITON_INTERPRET=1``)."""
    from jit_kernels.triton.attention import anchor_attention_forward

    scale = q.shape[-1] ** -0.5
    fns = {f"triton_{var}": (lambda var=var: anchor_attention_forward(q, k, v, cos, sin, None, scale, variant=var))
           for var in ("v1", "v2")}
    if sweep:
        for bm, bn, w, st in V2_SWEEP:
            fns[f"v2_{bm}x{bn}w{w}s{st}"] = (lambda c=(bm, bn, w, st): anchor_attention_forward(
                q, k, v, cos, sin, None, scale, variant="v2", blocks=c))
    return fns


def op_rows(device, dtype, configs, backend, rounds, variants: bool = False, sweep: bool = False) -> list[dict]:
    rows = []
    for heads, dim, batch, r in configs:
        for m in IMAGES:
            n = TEXT + m
            g = torch.Generator().manual_seed(m)
            q, k, v = (torch.randn(batch, n, heads, dim, generator=g).to(device=device, dtype=dtype) for _ in range(3))
            cos, sin = (t.to(device) for t in rope_tables(anchor_ids(TEXT, m), AXES[dim]))
            fns = {
                "stock": lambda: stock_attention(q, k, v, cos, sin),
                "ours": lambda: jk.anchor_attention(q, k, v, cos, sin, backend=backend),
            }
            extra = variant_fns(q, k, v, cos, sin, sweep) if variants or sweep else {}
            fns.update(extra)
            err = (fns["ours"]().float() - fns["stock"]().float()).abs().max().item()
            t = time_interleaved(fns, device, r if device == "cpu" else 1, 1)
            flops = 4.0 * batch * heads * n * n * dim
            row = {"case": f"{heads}x{dim}", "tokens": f"{TEXT}+{m}", "batch": batch, "dtype": str(dtype)[6:],
                   "stock_ms": round(t["stock"] * 1e3, 2), "ours_ms": round(t["ours"] * 1e3, 2),
                   "x_vs_stock": round(t["stock"] / t["ours"], 2),
                   "ours_GFLOPs": round(flops / t["ours"] / 1e9, 1), "stock_GFLOPs": round(flops / t["stock"] / 1e9, 1),
                   "max_abs_diff": f"{err:.1e}"}
            for name in extra:  # per-variant / per-config times and their speed against stock
                row[f"{name}_ms"] = round(t[name] * 1e3, 3)
                row[f"x_vs_stock_{name}"] = round(t["stock"] / t[name], 2)
            if sweep:
                best = min((name for name in extra if name.startswith("v2_")), key=lambda name: t[name])
                row["best_v2_config"], row["best_v2_x_vs_stock"] = best, round(t["stock"] / t[best], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def forward_rows(device, dtype, backend, rounds) -> list[dict]:
    try:
        from jit_sampler.pipelines.attention_processor import install_anchor_attention, remove_anchor_attention
        from jit_eval.tiny_flux import image_ids, load_tiny_flux
    except ImportError as exc:  # no diffusers on this machine
        print(f"skipping the tiny-Flux forwards: {exc}")
        return []
    model = load_tiny_flux(device=device, dtype=dtype)
    tr = model.transformer
    rows = []
    full = image_ids(64, 64, device)
    for label, ids in (("64x64 grid (4096 tokens)", full),
                       ("1310 anchors of 64x64", full[torch.randperm(4096, generator=torch.Generator().manual_seed(1))[:1310]])):
        x = torch.randn(1, ids.shape[0], 4, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
        lab = torch.tensor([3], device=device)

        def stock():
            return model.velocity(x, 0.7, lab, ids)

        def ours():
            install_anchor_attention(tr, backend=backend, devices=(torch.device(device).type,))
            try:
                return model.velocity(x, 0.7, lab, ids)
            finally:
                remove_anchor_attention(tr)

        with torch.no_grad():
            err = (ours().float() - stock().float()).abs().max().item()
            t = time_interleaved({"stock": stock, "ours": ours}, device, rounds if device == "cpu" else 1, 1)
        row = {"case": "tiny-Flux forward", "tokens": f"4+{label}", "batch": 1, "dtype": str(dtype)[6:],
               "stock_ms": round(t["stock"] * 1e3, 2), "ours_ms": round(t["ours"] * 1e3, 2),
               "x_vs_stock": round(t["stock"] / t["ours"], 2), "max_abs_diff": f"{err:.1e}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds for the tiny shapes (CPU)")
    p.add_argument("--flux-rounds", type=int, default=3, help="rounds for the 24 x 128 shapes (CPU)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--no-flux", action="store_true", help="skip the 24 x 128 op rows")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    p.add_argument("--variants", action="store_true",
                   help="also time both Triton kernels (v1, v2) directly (CUDA, or CPU under TRITON_INTERPRET=1)")
    p.add_argument("--sweep", action="store_true", help="also time v2 with every tile config of V2_SWEEP (implies --variants)")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/attention_<device>)")
    args = p.parse_args(argv)
    if (args.variants or args.sweep) and args.device == "cpu":
        from jit_kernels.triton.common import INTERPRET

        if not INTERPRET:
            p.error("--variants / --sweep launch the Triton kernels: use --device cuda, or TRITON_INTERPRET=1 on CPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if args.device == "cpu" else torch.bfloat16)
    configs = [(4, 32, 1, args.rounds)] + ([] if args.no_flux else [(24, 128, 1, args.flux_rounds)])
    with torch.no_grad():
        rows = op_rows(args.device, dtype, configs, args.backend, args.rounds, args.variants, args.sweep)
        rows += forward_rows(args.device, dtype, args.backend, args.rounds)
    env = environment()
    env.update(command=command_line("benchmarks.bench_attention", argv if argv is not None else sys.argv[1:]),
               backend=args.backend,
               resolved_backend=jk._backends.resolve("anchor_attention", torch.device(args.device), args.backend))
    stem = Path(args.out) if args.out else RESULTS / f"attention_{args.device}"
    cols = ["case", "tokens", "batch", "dtype", "stock_ms", "ours_ms", "x_vs_stock", "ours_GFLOPs", "stock_GFLOPs",
            "max_abs_diff"]
    if args.variants or args.sweep:
        cols += ["triton_v1_ms", "x_vs_stock_triton_v1", "triton_v2_ms", "x_vs_stock_triton_v2"]
    if args.sweep:
        cols += ["best_v2_config", "best_v2_x_vs_stock"]
    write_results(stem, "anchor_attention vs rotary + SDPA (stock FLUX processor)", env, rows, cols,
                  "Times are medians (ms); x_vs_stock = stock / ours; GFLOPs counts 4 B H L^2 D. "
                  "stock = diffusers apply_rotary_emb on q and k + scaled_dot_product_attention.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
