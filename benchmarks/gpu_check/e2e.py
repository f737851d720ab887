"""Section ``e2e``: a FLUX.1-dev-sized transformer with random weights, dense 50 steps vs JiT presets."""

from __future__ import annotations

import math
import statistics
import time

import torch

from .common import Budget, DIFFUSERS_HINT, Kit, _dname, _gen
from .memory import peak_memory_rows, stock_loop
from .nf4 import nf4_check
from .sampler import StepProbe


def flux_config(dry: bool) -> dict:
    from jit_sampler.report import FLUX1_DEV_CONFIG

    if dry:
        return dict(patch_size=1, in_channels=16, out_channels=None, num_layers=2, num_single_layers=2,
                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                    guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    return dict(FLUX1_DEV_CONFIG, axes_dims_rope=(16, 56, 56))



def build_random_flux(cfg: dict, device: str, dtype: torch.dtype, seed: int = 0):
    """A ``FluxTransformer2DModel`` made on ``meta`` and materialised on ``device`` in ``dtype`` with random weights.

    Nothing is created in fp32 or on the host first (FLUX.1-dev: 12 B parameters, 24 GB in bf16).
    Weights are N(0, 1/fan_in), norm scales 1, biases 0: activations stay O(1); speed does not
    depend on the values.
    """
    from diffusers import FluxTransformer2DModel
    from diffusers.utils import logging as dlog

    with torch.device("meta"):
        tr = FluxTransformer2DModel(**cfg)
    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # "modules to keep in float32" notice of .to(dtype): none in FLUX.1
    try:
        tr = tr.to(dtype)
    finally:
        dlog.set_verbosity(level)
    bufs = [n for n, _ in tr.named_buffers()]
    if bufs:
        raise RuntimeError(f"FluxTransformer2DModel has buffers {bufs[:5]}: to_empty would leave them uninitialised")
    tr = tr.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in tr.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=g)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    return tr.eval().requires_grad_(False)



def section_e2e(kit: Kit, budget: Budget) -> dict:
    try:
        import diffusers  # noqa: F401
        from diffusers import FluxTransformer2DModel  # noqa: F401
    except Exception as exc:
        kit.log(f"  e2e skipped: {exc!r}\n  {DIFFUSERS_HINT}")
        return {"status": f"skipped: diffusers not importable ({exc!r})"[:300], "how_to": DIFFUSERS_HINT}
    import jit_kernels as jk
    from jit_sampler import FluxVelocity, JiTConfig, beta_sigmas, jit_sample, linear_sigmas, make_plan
    from jit_sampler.pipelines.attention_processor import install_anchor_attention, remove_anchor_attention
    from jit_sampler.report import flux_run_flops

    dev, cuda = kit.device, kit.device == "cuda"
    cfg = flux_config(kit.dry)
    h = w = 16 if kit.dry else 64
    text = 8 if kit.dry else 512
    dtype = torch.float32 if kit.dry else torch.bfloat16
    out: dict = {"status": "ok", "model": {k: v for k, v in cfg.items()}, "grid": f"{h}x{w}", "image_tokens": h * w,
                 "text_tokens": text, "dtype": _dname(dtype),
                 "weights": "random, made on the device (speed does not depend on weights)"}
    t = time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tr = build_random_flux(cfg, dev, dtype)
    kit.sync()
    out["build_s"] = round(time.perf_counter() - t, 2)
    out["parameters"] = sum(p.numel() for p in tr.parameters())
    kit.log(f"  built a {out['parameters'] / 1e6:.1f} M-parameter FLUX transformer in {out['build_s']}s")
    g = _gen(3)
    jd, pd = cfg["joint_attention_dim"], cfg["pooled_projection_dim"]
    prompt = torch.randn(1, text, jd, generator=g).to(device=dev, dtype=dtype)
    pooled = torch.randn(1, pd, generator=g).to(device=dev, dtype=dtype)
    text_ids = torch.zeros(text, 3, device=dev)
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    img_ids = img_ids.view(h * w, 3).to(dev)
    lat = torch.randn(1, h * w, cfg["in_channels"], generator=g).to(dev)
    guidance = torch.full((1,), 3.5, device=dev)

    def velocity():
        return FluxVelocity(tr, prompt, pooled, text_ids, img_ids, guidance=guidance)

    def sched(preset):
        c = JiTConfig.preset(preset)
        return c, beta_sigmas(c.total_steps, c.beta_alpha, c.beta_beta)

    methods = {"dense-50": (JiTConfig.dense(50), linear_sigmas(50), False)}
    for p in ("4x", "7x", "reference"):
        methods[f"JiT {p}"] = (*sched(p), False)
    for p in ("4x", "7x"):
        methods[f"JiT {p} + anchor attn"] = (*sched(p), True)
    devices = ("cuda",) if cuda else ("cpu",)

    def run(name, steps_cap=None, probe=None):
        cfg_, sig, fused = methods[name]
        vel = velocity()
        swapped = install_anchor_attention(tr, devices=devices) if fused else 0
        try:
            state = {"i": 0}

            def stop():
                state["i"] += 1
                return steps_cap is not None and state["i"] > steps_cap

            kw = {}
            if probe is not None:
                kw = dict(interrupt=probe.interrupt, step_callback=probe.callback)
            elif steps_cap is not None:
                kw = dict(interrupt=stop)
            jk.reset_validation_passes()
            y, rep = jit_sample(vel, lat, h, w, sig, cfg_, _gen(0), **kw)
        finally:
            if fused:
                remove_anchor_attention(tr)
        if fused and swapped == 0:
            raise RuntimeError("install_anchor_attention swapped no processor")
        return y, rep, jk.validation_passes()

    # Warm-ups (kernel compiles, cuBLAS/attention setup) and the time estimates that size the plan.
    t = time.perf_counter()
    with torch.no_grad():
        run("dense-50", steps_cap=2)
        _, rep_d, _ = run("dense-50", steps_cap=2)
        t_dense = rep_d.time_total_s / max(1, rep_d.steps)
        est = {"dense-50": 50 * t_dense}
        for name in methods:  # every stage size of every method compiles its kernels here, not in round 1
            if name == "dense-50":
                continue
            _, r, _ = run(name)
            if name in ("JiT 7x", "JiT 7x + anchor attn"):
                _, r, _ = run(name)  # warm: the estimate
                est[name] = r.time_total_s
    out["warmup_s"] = round(time.perf_counter() - t, 2)
    for p in ("4x", "reference"):
        est[f"JiT {p}"] = est["JiT 7x"] * 18 / 11
    est["JiT 4x + anchor attn"] = est["JiT 7x + anchor attn"] * 18 / 11
    jit_cost = sum(v for k, v in est.items() if k != "dense-50")
    sync_cost = 2.0 * est["JiT 7x + anchor attn"]
    avail = budget.left() - sync_cost - 3.0
    k = kit.args.e2e_steps
    if not k:
        k = 50 if est["dense-50"] + jit_cost <= avail else int(max(2, (avail - jit_cost) / max(t_dense, 1e-6)))
    k = max(1, min(50, k))
    round_cost = k * t_dense + jit_cost
    repeats = max(1, min(1 if kit.dry else 3, int(avail // max(round_cost, 1e-6))))
    out.update(dense_steps_timed=k, dense_extrapolated=k < 50, repeats=repeats,
               estimates_s={kk: round(v, 3) for kk, v in est.items()})
    kit.log(f"  e2e plan: dense {k}/50 steps timed{' (extrapolated to 50)' if k < 50 else ''}, {repeats} round(s), "
            f"estimated {round_cost * repeats:.1f}s of {budget.left():.0f}s left")

    samples = {name: {"wall": [], "model": [], "sampler": []} for name in methods}
    reports, passes, finite = {}, {}, {}
    with torch.no_grad():
        for r in range(repeats):
            for name in methods:
                if budget.left() < sync_cost and r > 0:
                    break
                cap = k if name == "dense-50" and k < 50 else None
                y, rep, vp = run(name, steps_cap=cap)
                scale = 50 / rep.steps if cap else 1.0
                samples[name]["wall"].append(rep.time_total_s * scale)
                samples[name]["model"].append(rep.time_model_s * scale)
                samples[name]["sampler"].append(rep.time_sampler_s * scale)
                reports[name], passes[name] = rep, vp
                finite[name] = bool(torch.isfinite(y).all())
            kit.log(f"  e2e round {r + 1}/{repeats}: " + ", ".join(f"{n} {v['wall'][-1]:.2f}s"
                                                                  for n, v in samples.items() if v["wall"]))
    med = {n: {q: statistics.median(v[q]) for q in v} for n, v in samples.items() if v["wall"]}
    tcfg = tr.config
    flops = {}
    for name in med:
        active = [h * w] * 50 if name == "dense-50" else reports[name].active_tokens
        flops[name] = flux_run_flops(tcfg, active, text)
    rows = []
    d50 = med.get("dense-50")
    for name, m in med.items():
        rep = reports[name]
        row = {"method": name, "steps": 50 if name == "dense-50" else rep.steps, "wall_s": round(m["wall"], 3),
               "model_s": round(m["model"], 3), "sampler_overhead": round(m["sampler"] / m["wall"], 4),
               "validation_passes": sum(passes[name].values()), "finite_output": finite[name]}
        if name == "dense-50" and k < 50:
            row["note"] = f"{k} steps timed, x {50 / k:.2f}"
        if name.startswith("JiT") and d50:
            steps = row["steps"]
            same_wall, same_model = d50["wall"] * steps / 50, d50["model"] * steps / 50  # dense steps cost alike
            same_flops = flux_run_flops(tcfg, [h * w] * steps, text)
            row.update(speedup_vs_dense50=round(d50["wall"] / m["wall"], 2),
                       flop_ratio_vs_dense50=round(flops["dense-50"].total / flops[name].total, 2),
                       image_linear_flop_ratio_vs_dense50=round(flops["dense-50"].image_linear / flops[name].image_linear, 2),
                       model_time_ratio_vs_dense50=round(d50["model"] / m["model"], 2),
                       realised_vs_dense50=round((d50["wall"] / m["wall"]) / (d50["model"] / m["model"]), 3),
                       speedup_vs_dense_same_steps=round(same_wall / m["wall"], 2),
                       flop_ratio_vs_dense_same_steps=round(same_flops.total / flops[name].total, 2),
                       model_time_ratio_vs_dense_same_steps=round(same_model / m["model"], 2))
        rows.append(row)
    out["rows"] = rows
    out["dense_same_steps"] = "derived from dense-50's per-step time (every dense step costs the same)"
    # Syncs (CUDA) / validation passes (CPU) in the quiet steps of a JiT run with the fused attention.
    name = "JiT 7x + anchor attn"
    c7, sig7, _ = methods[name]
    plan = make_plan(c7, h, w, sig7)
    quiet = {i for i in range(1, plan.steps) if not plan.is_transition(i)}
    check = {"run": name, "quiet_steps": len(quiet)}
    try:
        with torch.no_grad():
            pw = StepProbe(cuda, quiet, "warn" if cuda else None)
            with pw.active():
                run(name, probe=pw)
            check["validation_passes_per_step"] = pw.passes
            check["validation_passes_quiet_steps"] = sum(pw.passes[i] for i in quiet)
            ok = check["validation_passes_quiet_steps"] == 0
            if cuda:
                check["syncs_per_step"] = pw.syncs
                check["syncs_quiet_steps"] = sum(pw.syncs[i] for i in quiet)
                pe = StepProbe(True, quiet, "error")
                try:
                    with pe.active():
                        run(name, probe=pe)
                    check["error_mode"] = "no sync in the quiet steps"
                except RuntimeError as exc:
                    check["error_mode"] = f"sync at step {pe.step - 1}: {str(exc)[:300]}"
                    ok = False
                ok &= check["syncs_quiet_steps"] == 0
        check["ok"] = ok
        if not ok:
            kit.fail("e2e", f"{name}: quiet steps synced or validated: {check}"[:400])
    except Exception as exc:
        check.update(ok=False, error=repr(exc)[:300])
        kit.fail("e2e", f"sync check: {exc!r}"[:300])
    out["quiet_step_check"] = check
    if cuda:
        out["max_memory_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    # Peak memory, stock loop vs JiT (after max_memory_GiB: it resets the peak counter).
    jit_runs = {n: (lambda n=n: run(n)[0]) for n in ("JiT 7x", "JiT 7x + anchor attn")}
    out["peak_memory"] = peak_memory_rows(
        cuda, lambda: stock_loop(tr, lat, prompt, pooled, text_ids, img_ids, guidance, linear_sigmas(50)[:3]),
        jit_runs, budget.left(), est["JiT 7x"] + est["JiT 7x + anchor attn"] + 2 * t_dense + 2.0, _dname(dtype))
    kit.log(f"  peak memory: {out['peak_memory']['status']}")
    del tr
    if cuda:
        torch.cuda.empty_cache()
    try:
        out["nf4"] = nf4_check(kit)
    except Exception as exc:
        out["nf4"] = {"status": f"FAILED: {exc!r}"[:300]}
        kit.fail("e2e", f"nf4 check crashed: {exc!r}"[:300])
    kit.log(f"  nf4: {out['nf4']['status']}")
    return out
