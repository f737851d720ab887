"""Peak GPU memory of one sampling run at FLUX.1-dev scale: the stock loop against JiT (part of ``e2e``).

The stock loop is what ``FluxPipeline`` does per step: one transformer forward on every image token
and an Euler update of the latents. Every dense step needs the same memory, so two steps give its
peak. JiT runs end in a stage with every token active, so a whole run is measured. Each number is
``torch.cuda.max_memory_allocated`` after a reset; ``over_weights_GiB`` is the peak less what was
allocated before the run (the weights and the inputs), the part the sampler controls.
"""

from __future__ import annotations

from typing import Callable

import torch

DRY_SKIP = "skipped: CUDA only (torch.cuda.max_memory_allocated); the dry run has no GPU memory to measure"


def stock_loop(tr, lat, prompt, pooled, text_ids, img_ids, guidance, sigmas) -> torch.Tensor:
    """Euler steps over ``sigmas`` with the transformer on all tokens, as ``FluxPipeline``'s loop (timestep = sigma)."""
    x = lat.to(tr.dtype)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full((x.shape[0],), float(s), device=x.device, dtype=x.dtype)
        v = tr(hidden_states=x, encoder_hidden_states=prompt, pooled_projections=pooled, timestep=t,
               img_ids=img_ids, txt_ids=text_ids, guidance=guidance, return_dict=False)[0]
        x = x + (float(s_next) - float(s)) * v
    return x


def _peak(fn: Callable[[], object]) -> dict:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    y = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    finite = bool(torch.isfinite(y[0] if isinstance(y, tuple) else y).all())
    return {"peak_GiB": round(peak / 2**30, 2), "before_GiB": round(before / 2**30, 2),
            "over_weights_GiB": round((peak - before) / 2**30, 3), "finite_output": finite}


def peak_memory_rows(cuda: bool, stock: Callable[[], torch.Tensor], jit_runs: dict[str, Callable[[], object]],
                     seconds_left: float, seconds_needed: float, dtype_name: str) -> dict:
    """``{"status", "rows"}``: the stock loop's peak, then each JiT run's, with the ratio to stock over the weights."""
    if not cuda:
        return {"status": DRY_SKIP}
    if seconds_left < seconds_needed:
        return {"status": f"skipped: out of time ({seconds_left:.0f}s left, about {seconds_needed:.0f}s needed)"}
    rows = []
    with torch.no_grad():
        base = {"method": "stock (FluxPipeline loop, 2 steps)", **_peak(stock)}
        rows.append(base)
        for name, run in jit_runs.items():
            row = {"method": name, **_peak(run)}
            if base["over_weights_GiB"] > 0:
                row["over_weights_vs_stock"] = round(row["over_weights_GiB"] / base["over_weights_GiB"], 3)
            rows.append(row)
    torch.cuda.empty_cache()
    return {"status": "ok", "dtype": dtype_name, "rows": rows}
