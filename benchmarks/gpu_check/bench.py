"""Section ``bench``: the lift variants A/B, every op against its torch composition and copy bandwidth, anchor attention against SDPA."""

from __future__ import annotations

import math
import os
import time
from typing import Callable

import torch

from .common import Budget, Kit, _dname


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)



def time_ms(fn: Callable[[], object], device: str, quantiles=(0.2, 0.5, 0.8)) -> list[float]:
    """Quantiles of one call's time in ms: ``triton.testing.do_bench`` on CUDA, a CPU timer in the dry run."""
    if device == "cuda":
        import triton.testing

        return [float(t) for t in triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=list(quantiles))]
    fn()
    samples = []
    stop = time.perf_counter() + 0.03
    while len(samples) < 5 or (len(samples) < 40 and time.perf_counter() < stop):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1e3)
    return [_quantile(samples, q) for q in quantiles]



def copy_bandwidth_GBps(device: str) -> float:
    """Device-to-device copy, bytes read + written per second (the ceiling of these memory-bound ops)."""
    numel = (256 if device == "cuda" else 4) * 2**20 // 4  # 256 MiB on the GPU (several times the L2)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)[1]
    return 2 * numel * 4 / (ms * 1e-3) / 1e9



# The ops whose kernels have an A/B switch (JIT_KERNELS_LIFT_VARIANT, jit_kernels/_env.py): the CUDA
# nearest map and lift, the Triton lift (its DMF target included). Timed both ways by the bench section.
VARIANT_OPS = ("nearest_anchor_map", "lift_field", "lift_euler_", "microflow_target")

VARIANT_BUDGET_SHARE = 0.2



def bench_variants(kit: Kit, budget: Budget) -> tuple[list[dict], int]:
    """``ours`` of every :data:`VARIANT_OPS` case timed under ``JIT_KERNELS_LIFT_VARIANT=v1`` and ``v2``
    (64 x 64 grid, C = 64, B = 1 and 2, bf16; the dry run: 16 x 16, fp32), per backend under test.

    ``v2_speedup`` is the ratio of the v1 and v2 medians. ``same_bits``: the two variants' outputs are
    equal bit for bit (out-of-place ops only). The variable is restored afterwards.
    """
    from benchmarks.cases import make_cases
    from jit_kernels._env import LIFT_VARIANT, LIFT_VARIANTS

    dev = kit.device
    sizes = [(16, 1, 0.32)] if kit.dry else [(64, 1, 0.32), (64, 2, 0.32)]
    dtypes = (torch.float32,) if kit.dry else (torch.bfloat16,)
    rows, skipped = [], 0
    saved = os.environ.get(LIFT_VARIANT)
    try:
        for be in kit.backends:
            for case in make_cases(dev, dtypes, sizes, be):
                if case.op not in VARIANT_OPS:
                    continue
                if budget.over():
                    skipped += 1
                    continue
                row = {"op": case.op, "size": case.size, "dtype": case.dtype, "backend": be}
                if kit.stand_in(be):
                    row["stand_in_for"] = kit.stand_in(be)
                outs = {}
                try:
                    for variant in LIFT_VARIANTS:
                        os.environ[LIFT_VARIANT] = variant
                        if case.op != "lift_euler_":
                            outs[variant] = case.impls["ours"]().clone()
                        row[f"{variant}_us"] = [round(x * 1e3, 1) for x in time_ms(case.impls["ours"], dev)]
                except Exception as exc:
                    row["error"] = repr(exc)[:300]
                    kit.fail("bench", f"variants {case.op} {case.size} {be}: {exc!r}"[:300])
                    rows.append(row)
                    continue
                row["v2_speedup"] = float(f"{row['v1_us'][1] / max(row['v2_us'][1], 1e-3):.3g}")  # never rounds to 0
                row["same_bits"] = torch.equal(outs["v1"], outs["v2"]) if outs else None
                if outs and not row["same_bits"]:
                    kit.fail("bench", f"variants {case.op} {case.size} {be}: v1 and v2 outputs differ")
                rows.append(row)
    finally:
        if saved is None:
            os.environ.pop(LIFT_VARIANT, None)
        else:
            os.environ[LIFT_VARIANT] = saved
    return rows, skipped



def section_bench(kit: Kit, budget: Budget) -> dict:
    from benchmarks.bench_attention import AXES, anchor_ids, rope_tables, stock_attention, variant_fns
    from benchmarks.cases import SIZES, make_cases
    import jit_kernels as jk

    dev = kit.device
    bw = copy_bandwidth_GBps(dev)
    kit.log(f"  copy bandwidth {bw:.1f} GB/s")
    sizes = [(16, 1, 0.32), (16, 2, 0.60)] if kit.dry else SIZES
    dtypes = (torch.float32,) if kit.dry else (torch.bfloat16, torch.float32)
    ops_rows = []
    native = kit.backends[0]  # cuda (cpp in the dry run)
    with torch.no_grad():
        # The A/B of the lift variants first, within a fifth of the section's budget (the op
        # table and attention below take what is left).
        variant_rows, skipped = bench_variants(kit, Budget(VARIANT_BUDGET_SHARE * budget.seconds))
        for be in kit.backends:
            for case in make_cases(dev, dtypes, sizes, be):
                if budget.left() < 0.3 * budget.seconds and be != native:
                    skipped += 1  # keep time for attention: the second backend's rows go first
                    continue
                if budget.over():
                    skipped += 1
                    continue
                impls = case.impls if be == native else {"ours": case.impls["ours"]}
                row = {"op": case.op, "size": case.size, "dtype": case.dtype, "backend": be}
                if kit.stand_in(be):
                    row["stand_in_for"] = kit.stand_in(be)
                try:
                    t = {k: time_ms(f, dev) for k, f in impls.items()}
                except Exception as exc:
                    row["error"] = repr(exc)[:300]
                    kit.fail("bench", f"{case.op} {case.size} {be}: {exc!r}"[:300])
                    ops_rows.append(row)
                    continue
                for k, q in t.items():
                    row[f"{k}_us"] = [round(x * 1e3, 1) for x in q]
                ours = t["ours"][1] * 1e-3
                row["GB/s"] = round(case.bytes / ours / 1e9, 1)
                row["of_copy_bw"] = round(case.bytes / ours / 1e9 / bw, 3)
                for k in ("torch", "published"):
                    if k in t:
                        row[f"x_vs_{k}"] = round(t[k][1] / t["ours"][1], 2)
                ops_rows.append(row)
        attn_rows = []
        configs = [(2, 32, 1, 8, (24, 40))] if kit.dry else [(24, 128, 1, 512, (1310, 2457, 4096))]
        dt = torch.float32 if kit.dry else torch.bfloat16
        for heads, dim, b, text, imgs in configs:
            for img in imgs:
                if budget.over():
                    skipped += 1
                    continue
                n = text + img
                g = torch.Generator().manual_seed(img)
                q, k, v = (torch.randn(b, n, heads, dim, generator=g).to(device=dev, dtype=dt) for _ in range(3))
                cos, sin = (t.to(dev) for t in rope_tables(anchor_ids(text, img, grid=64 if img > 256 else 16), AXES[dim]))
                fns = {"stock": lambda: stock_attention(q, k, v, cos, sin)}
                for be in kit.backends:
                    fns[f"ours_{be}"] = lambda be=be: jk.anchor_attention(q, k, v, cos, sin, backend=be)
                # Both Triton kernels ($JIT_KERNELS_ATTN_VARIANT v1 / v2) launched directly; on the GPU
                # also v2's tile sweep while at least half the budget is left (compiles cost seconds).
                variants = variant_fns(q, k, v, cos, sin, sweep=not kit.dry and budget.left() > 0.5 * budget.seconds) \
                    if "triton" in kit.backends else {}
                fns.update(variants)
                try:
                    err = float((fns[f"ours_{kit.backends[0]}"]().float() - fns["stock"]().float()).abs().max())
                    t = {}
                    for kk, f in fns.items():
                        if kk.startswith("v2_") and budget.over():  # the sweep's configs: while budget is left
                            skipped += 1
                            continue
                        t[kk] = time_ms(f, dev)
                    variants = {kk: f for kk, f in variants.items() if kk in t}
                except Exception as exc:
                    kit.fail("bench", f"anchor_attention {text}+{img}: {exc!r}"[:300])
                    continue
                flops = 4.0 * b * heads * n * n * dim
                row = {"case": f"{heads}x{dim}", "tokens": f"{text}+{img}", "batch": b, "dtype": _dname(dt),
                       "stock_ms": [round(x, 3) for x in t["stock"]], "max_abs_diff_vs_stock": f"{err:.1e}"}
                for be in kit.backends:
                    row[f"ours_{be}_ms"] = [round(x, 3) for x in t[f"ours_{be}"]]
                    row[f"x_vs_stock_{be}"] = round(t["stock"][1] / t[f"ours_{be}"][1], 2)
                    row[f"ours_{be}_TFLOPs"] = round(flops / (t[f"ours_{be}"][1] * 1e-3) / 1e12, 2)
                row["stock_TFLOPs"] = round(flops / (t["stock"][1] * 1e-3) / 1e12, 2)
                for name in variants:  # triton_v1, triton_v2, v2_<tiles> (the sweep)
                    row[f"{name}_ms"] = [round(x, 3) for x in t[name]]
                    row[f"x_vs_stock_{name}"] = round(t["stock"][1] / t[name][1], 2)
                sweep = [name for name in variants if name.startswith("v2_")]
                if sweep:
                    best = min(sweep, key=lambda name: t[name][1])
                    row["best_v2_config"], row["best_v2_x_vs_stock"] = best, round(t["stock"][1] / t[best][1], 2)
                attn_rows.append(row)
    timer = "triton.testing.do_bench, quantiles 0.2/0.5/0.8" if dev == "cuda" else "CPU timer (dry run), quantiles 0.2/0.5/0.8"
    return {"timer": timer, "copy_bandwidth_GBps": round(bw, 1), "ops": ops_rows, "attention": attn_rows,
            "variants": variant_rows, "skipped_for_budget": skipped}
