"""Speed / fidelity suite on the embedded tiny FLUX (docs/evaluation.md sections 2-3).

    python -m benchmarks.quality                       # headline rows 1000 images, the others 100
    python -m benchmarks.quality --model tiny-subsets  # the checkpoint that saw partial grids
    python -m benchmarks.quality --seeds 2 --headline-seeds 2 --quick   # a smoke run
    python -m benchmarks.quality --model tiny-scenes --regime --headline-seeds 43   # regime check

Every method integrates the same initial noise (seed s, digits 0-9 in one batch of 10; for
``tiny-scenes`` ten scene prompts) with the same model and conditioning. The headline methods
(:data:`HEADLINE`: the dense baselines, JiT 4x and 7x with their controls, every JiT + cache
row) run ``--headline-seeds`` seeds (default 100: 1000 images); the other rows run the first
``--seeds`` of those seeds (default 10: 100 images) and say so in their ``images`` column. Scores:

- the verdict: closeness to dense-50. dense-50 runs again on ``--headline-seeds`` other seeds
  (:data:`REF_SEED0` + s); ``kid_ref`` is the unbiased KID (stratified by prompt) between a
  method's samples and that reference set, with a 95 % interval from resampling whole seed
  batches and a permutation test (``kid_ref_p``, ``kid_ref_null95``), beside the floor (the
  dense-50 row) and the controls of :data:`CONTROLS`; ``fd_ref``, ``precision_ref``,
  ``recall_ref`` likewise (:func:`fidelity_verdicts`, :func:`regime_check`);
- secondary: distribution, in the classifier's 128-d feature space against the 2500 real held-out
  digits: KID (unbiased, cubic polynomial kernel, mean and std over 100 subsets), the
  Frechet distance with a bootstrap 95 % interval, precision and recall (k-NN manifolds,
  k = 3);
- ink bias: mean pixel intensity relative to dense-50's on the same noise and labels
  (JiT's characteristic failure on a model that never saw partial grids is bold digits);
- prompt adherence: accuracy of the project's digit classifier on the generated digits;
- closeness to dense-50 from the same noise (PSNR and SSIM): *not* a quality measure (a
  sampler that draws fresh noise draws a different, equally good digit);
- guidance: true CFG (``--cfg-scale``, default 3, null label as the negative prompt) for
  every method, as FLUX is always run guided;
- cost: model calls, transformer FLOPs counted block by block (:class:`BlockWorkCounter`,
  so cache hooks that skip work are costed by what actually ran), and wall time: the
  seed-0 batch runs ``--repeats`` times for every method, interleaved, and the speed-up is
  the ratio of medians to dense-50 in this process.

Writes ``quality_cpu.{json,md}`` (table, verdicts on the suite's acceptance criteria, command line,
versions), ``quality_cpu.svg`` (speed-up vs KID with error bars, ink bias and PSNR to
dense-50) and ``quality_cpu.png`` (the first seed's digits per method). Progress (with an
estimate of the time left) goes to stdout.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from jit_sampler.config import JiTConfig
from jit_sampler.sampler import jit_sample
from jit_eval.tiny_flux import TinyVelocity
from jit_eval.metrics import (feature_stats, frechet_distance, frechet_interval, ink, kid, mmd2_test, precision_recall,
                              psnr, ssim)
from jit_eval.rivals import BlockWorkCounter, cache_hook, jit_ras_sample, ras_sample
from jit_sampler.schedule import beta_sigmas, linear_sigmas

from .env import command_line, environment, write_results

REF = "dense-50"
#: dense-50 also runs on seeds REF_SEED0 + s: the reference set every method is compared with
#: (disjoint from the seeds 0, 1, ... that every method, dense-50 included, runs on).
REF_SEED0 = 1_000_000
J4, J7 = "JiT 4x assign/independent", "JiT 7x assign/independent"
#: The controls of each JiT preset besides dense at the same cost (the dense row nearest in FLOPs:
#: dense-12 for 4x, dense-7 for 7x): dense on JiT's own schedule with every token, and JiT with the
#: model seeing every token (the error split: schedule / sparse context / lift + micro-flow).
CONTROLS = {j: dict(schedule=f"dense-{JiTConfig.preset(p).total_steps} beta", oracle=f"{j}, full-context oracle")
            for p, j in (("4x", J4), ("7x", J7))}

#: Rows run at the headline sample size (plus every "jit+cache" row).
HEADLINE = ("dense-50", "dense-7", "dense-11", "dense-12", J4, J7, "JiT 4x-reference", "JiT 7x-reference",
            *(v for c in CONTROLS.values() for v in c.values()))


@dataclass
class Method:
    name: str
    family: str  # dense | dense-beta | jit | ras | cache | jit+cache | diagnostic
    run: Callable[..., Any]  # (model, labels, noise, seed, cfg_scale) -> (tokens, steps)
    cache: Any = None  # a diffusers cache config, enabled around the run
    note: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def headline(self) -> bool:
        return self.name in HEADLINE or self.family == "jit+cache"


def _jit_runner(cfg: JiTConfig, sigmas=None, oracle: bool = False):
    def run(model, labels, noise, seed, cfg_scale):
        sig = sigmas if sigmas is not None else beta_sigmas(cfg.total_steps, cfg.beta_alpha, cfg.beta_beta)
        fn = (_OracleVelocity if oracle else TinyVelocity)(model, labels, cfg_scale, backend=cfg.backend)
        if oracle:
            fn.start(noise)
        y, rep = jit_sample(fn, noise, model.height, model.width, sig, cfg, torch.Generator().manual_seed(1000 + seed),
                            step_callback=fn.record if oracle else None)
        return y, len(rep.active_tokens)
    return run


class _OracleVelocity(TinyVelocity):
    """Diagnostic only: the model sees the *full* current latent and JiT keeps the anchors' rows,
    which removes the error of running the model on a token subset (what is left is the lift
    and the DMF). Costs a full forward per step; its speed-up is meaningless."""

    def start(self, noise):
        self._y = noise.to(torch.float32)

    def record(self, i, sigma, y):
        self._y = y.to(torch.float32)

    def __call__(self, x, active_idx, sigma, step):
        full = self._y.clone()
        full[:, active_idx] = x.to(full.dtype)
        v = super().__call__(full, torch.arange(full.shape[1], device=full.device), sigma, step)
        return v[:, active_idx].to(x.dtype)


def _ras_runner(steps: int, ratio: float, warmup: int = 2, refresh_every: int = 5):
    def run(model, labels, noise, seed, cfg_scale):
        fn = TinyVelocity(model, labels, cfg_scale)
        y, _ = ras_sample(fn, noise, model.height, model.width, linear_sigmas(steps), ratio=ratio, warmup=warmup,
                          refresh_every=refresh_every)
        return y, steps
    return run


def _jit_ras_runner(cfg: JiTConfig, ratio: float):
    def run(model, labels, noise, seed, cfg_scale):
        sig = beta_sigmas(cfg.total_steps, cfg.beta_alpha, cfg.beta_beta)
        y, _ = jit_ras_sample(TinyVelocity(model, labels, cfg_scale), noise, model.height, model.width, sig, cfg,
                              torch.Generator().manual_seed(1000 + seed), ratio=ratio)
        return y, cfg.total_steps
    return run


def build_methods(quick: bool = False) -> list[Method]:
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

    def fbc(t):
        return FirstBlockCacheConfig(threshold=t)

    def taylor(interval):
        return TaylorSeerCacheConfig(cache_interval=interval, disable_cache_before_step=3,
                                     taylor_factors_dtype=torch.float32)

    ms = [Method(REF, "dense", _jit_runner(JiTConfig.dense(50), linear_sigmas(50)), note="reference")]
    dense_steps = (7, 12) if quick else (7, 11, 12, 18)
    for n in dense_steps:
        ms.append(Method(f"dense-{n}", "dense", _jit_runner(JiTConfig.dense(n), linear_sigmas(n))))
    for p in (("7x",) if quick else ("4x", "7x")):  # dense on JiT's own schedule, every token
        jc = JiTConfig.preset(p)
        n = jc.total_steps
        ms.append(Method(f"dense-{n} beta", "dense-beta",
                         _jit_runner(JiTConfig.dense(n), beta_sigmas(n, jc.beta_alpha, jc.beta_beta)),
                         note=f"JiT {p}'s Beta schedule, all tokens"))
    modes = [("assign", "independent")] if quick else [(m, e) for m in ("assign", "blend", "substeps")
                                                      for e in ("independent", "initial")]
    for p in ("4x", "7x"):
        for mode, eps in modes:
            cfg = JiTConfig.preset(p, dmf_mode=mode, dmf_noise=eps)
            ms.append(Method(f"JiT {p} {mode}/{eps}", "jit", _jit_runner(cfg)))
    for p in (("7x",) if quick else ("4x", "7x")):
        ms.append(Method(f"JiT {p} assign/independent, full-context oracle", "diagnostic",
                         _jit_runner(JiTConfig.preset(p), oracle=True),
                         note="model sees all tokens; isolates the sparse-context error"))
    if not quick:
        for p in ("4x", "7x"):
            ms.append(Method(f"JiT {p}-reference", "jit", _jit_runner(JiTConfig.preset(f"{p}-reference")),
                             note="the reference pipeline's preset"))
        ms.append(Method("JiT 4x assign/independent per-sample", "jit",
                         _jit_runner(JiTConfig.preset("4x", anchor_policy="per_sample")),
                         note="per-sample anchor sets: one forward per image"))
        for p in ("4x", "7x"):
            ms.append(Method(f"JiT {p} initial, full-context oracle", "diagnostic",
                             _jit_runner(JiTConfig.preset(p, dmf_noise="initial"), oracle=True),
                             note="model sees all tokens; isolates the sparse-context error"))
    ras = [(20, 0.35)] if quick else [(20, 0.5), (18, 0.35), (12, 0.35)]
    for steps, r in ras:
        ms.append(Method(f"RAS {steps} steps r={r}", "ras", _ras_runner(steps, r),
                         note="2 dense warm-up steps, dense refresh every 5th step"))
    for p in (() if quick else ("4x", "7x")):
        ms.append(Method(f"{J4 if p == '4x' else J7} + RAS 0.5 in the final stage", "jit+ras",
                         _jit_ras_runner(JiTConfig.preset(p), 0.5), note="RAS inside JiT's final dense stage"))
    caches = [("FBCache 0.2", fbc(0.2))] if quick else [("FBCache 0.1", fbc(0.1)), ("FBCache 0.2", fbc(0.2)),
                                                         ("FBCache 0.3", fbc(0.3)), ("TaylorSeer i=3", taylor(3)),
                                                         ("TaylorSeer i=5", taylor(5))]
    for name, c in caches:
        ms.append(Method(f"dense-50 + {name}", "cache", _jit_runner(JiTConfig.dense(50), linear_sigmas(50)), cache=c))
    jc = [("4x", "FBCache 0.2", fbc(0.2))] if quick else [("4x", "FBCache 0.1", fbc(0.1)), ("4x", "FBCache 0.2", fbc(0.2)),
                                                          ("7x", "FBCache 0.1", fbc(0.1))]
    for p, name, c in jc:
        ms.append(Method(f"JiT {p} + {name}", "jit+cache", _jit_runner(JiTConfig.preset(p)), cache=c,
                         note="hook state reset at each stage transition"))
    ms.extend(_cache_dit_methods(quick))
    return ms


def _cache_dit_methods(quick: bool) -> list[Method]:
    """JiT + cache-dit's DBCache (F1B0: the first block of each kind always runs, the rest may be
    skipped; one warm-up step per stage), beside the FBCache rows; none when cache-dit is not installed."""
    import functools
    import importlib.util

    if importlib.util.find_spec("cache_dit") is None:
        return []
    from cache_dit import DBCacheConfig

    from jit_sampler.pipelines.cache_dit import use_cache_dit

    def dbc(t):
        return functools.partial(use_cache_dit, cache_config=DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=1, residual_diff_threshold=t))

    rows = [("4x", 0.2)] if quick else [("4x", 0.1), ("4x", 0.2), ("7x", 0.1)]
    return [Method(f"JiT {p} + cache-dit F1B0 {t}", "jit+cache", _jit_runner(JiTConfig.preset(p)), cache=dbc(t),
                   note="cache-dit contexts reset at each stage transition") for p, t in rows]


def _noise(seed: int, labels: int, tokens: int = 256, device="cpu") -> torch.Tensor:
    return torch.randn(labels, tokens, 4, generator=torch.Generator().manual_seed(seed)).to(device)


def run_quality(seeds: int = 10, labels: int = 10, repeats: int = 3, quick: bool = False, model=None,
                classifier=None, methods: list[Method] | None = None, cfg_scale: float = 3.0, log=None,
                headline_seeds: int | None = None, rounds: int = 200) -> dict:
    """Run the suite: ``seeds`` seeds (x ``labels`` prompts) per row, ``headline_seeds`` (default:
    ``seeds``; at least ``seeds``) for the :attr:`Method.headline` rows, and dense-50 once more on
    ``headline_seeds`` other seeds (``REF_SEED0 + s``): the reference set of the closeness columns
    (``kid_ref`` etc., with ``rounds`` bootstrap and permutation rounds over whole seed batches)."""
    from jit_eval.tiny_flux import load_mnist, load_tiny_flux, unpack_tokens
    from jit_eval.tiny_flux.classifier import load_classifier
    from jit_eval.tiny_flux.scenes import Scorer, prompts_for, real_scenes

    if not 2 <= labels <= 10:
        raise ValueError(f"labels must be in [2, 10] (prompts per seed batch), got {labels}")
    if seeds < 2 or repeats < 1:
        raise ValueError(f"need seeds >= 2 (seed batches to resample) and repeats >= 1, got {seeds}, {repeats}")
    if rounds < 2:
        raise ValueError(f"rounds must be >= 2, got {rounds}")
    log = log or (lambda *a: print(*a, flush=True))  # progress must show through a pipe too
    headline_seeds = seeds if headline_seeds is None else headline_seeds
    if headline_seeds < seeds:
        raise ValueError(f"headline_seeds must be >= seeds ({seeds}), got {headline_seeds}")
    model = model or load_tiny_flux()
    classifier = classifier or load_classifier()
    methods = methods or build_methods(quick)
    if methods[0].name != REF:
        raise ValueError(f"the first method must be the reference {REF!r}")
    scenes = bool(getattr(model, "slots", None))
    scorer = Scorer(classifier, model.config.get("layout") if scenes else None)
    lab = prompts_for(model, labels)
    tokens = model.height * model.width
    tr = model.transformer

    def execute(m: Method, seed: int):
        with cache_hook(tr, m.cache), BlockWorkCounter(tr) as counter:
            t0 = time.perf_counter()
            y, steps = m.run(model, lab, _noise(seed, labels, tokens), seed, cfg_scale)
            dt = time.perf_counter() - t0
        return unpack_tokens(y, model.image_size, model.image_size).clamp(-1, 1), steps, counter, dt

    def n_seeds(m: Method) -> int:
        return headline_seeds if m.headline else seeds

    images = {m.name: [] for m in methods}
    times = {m.name: [] for m in methods}
    info = {}
    t_start = time.perf_counter()
    for r in range(repeats):  # seed 0, interleaved: drift hits every method alike
        for m in methods:
            img, steps, counter, dt = execute(m, 0)
            times[m.name].append(dt)
            if r == 0:
                images[m.name].append(img)
                info[m.name] = dict(steps=steps, calls=counter.forwards, flops=counter.flops)
            elif not torch.equal(img, images[m.name][0]):
                raise RuntimeError(f"{m.name}: repeated run gave a different image (non-deterministic sampler)")
        log(f"timing round {r + 1}/{repeats} done ({time.perf_counter() - t_start:.0f} s)")
    # Work left, in seed-0 FLOPs, for the time estimate (the reference set: headline_seeds dense-50 runs).
    unit = {m.name: info[m.name]["flops"] for m in methods}
    total = sum(unit[m.name] * (n_seeds(m) - 1) for m in methods) + unit[REF] * headline_seeds
    done, t_work = 0, time.perf_counter()
    ref_set = []
    for s in range(headline_seeds):
        ref_set.append(execute(methods[0], REF_SEED0 + s)[0])
        done += unit[REF]
        for m in methods:
            if s == 0 or s >= n_seeds(m):
                continue
            img, _, counter, _ = execute(m, s)
            images[m.name].append(img)
            info[m.name]["calls"] += counter.forwards
            info[m.name]["flops"] += counter.flops
            done += unit[m.name]
        if s + 1 in (seeds, headline_seeds) or (s + 1) % 5 == 0:
            el = time.perf_counter() - t_work
            eta = el / done * (total - done) if done else 0.0
            log(f"seed {s + 1}/{headline_seeds} done: {el / 60:.1f} min so far, about {eta / 60:.1f} min left")

    def strata(n: int) -> torch.Tensor:  # prompt index of each image of n seed batches
        return torch.arange(labels).repeat(n)

    def groups(n: int) -> torch.Tensor:  # seed batch of each image
        return torch.arange(n).repeat_interleave(labels)

    with torch.no_grad():
        if scenes:
            real, real_strata = real_scenes(lab, 250, "heldout", seed=0)
            floor_img, floor_strata = real_scenes(lab, headline_seeds, "train", seed=1)
            floor_want = lab[floor_strata]
        else:
            real, digits = load_mnist("heldout")
            keep = digits < labels  # the digits asked for; the stratum is the digit
            real, real_strata = real[keep], digits[keep]
            train_digits, train_labels = load_mnist("train")
            pick = torch.cat([torch.nonzero(train_labels == c)[: headline_seeds, 0] for c in range(labels)])
            floor_img, floor_want = train_digits[pick], train_labels[pick]
        real_feats = scorer.features(real)
        real_stats = feature_stats(real_feats)
        floor_acc = float(scorer.correct(floor_img, floor_want).float().mean())
        floor_fd = frechet_distance(feature_stats(scorer.features(floor_img)), real_stats)
        ref_feats = scorer.features(torch.cat(ref_set))
    ref_stats = feature_stats(ref_feats)
    ref_all = torch.cat(images[REF])
    ref_t = statistics.median(times[REF])
    ref_flops = info[REF]["flops"] / n_seeds(methods[0])
    rows = []
    ink_of = {}
    for m in methods:
        img = torch.cat(images[m.name])
        n = n_seeds(m)
        ink_of[m.name] = ink(img)
        ref = ref_all[: img.shape[0]]  # dense-50 on the same noise and prompts
        want = lab.repeat(n, *([1] * (lab.dim() - 1)))
        feats = scorer.features(img)
        correct = scorer.correct(img, want)
        stats = feature_stats(feats)
        t = statistics.median(times[m.name])
        row = dict(method=m.name, family=m.family, steps=info[m.name]["steps"],
                   calls_per_image_batch=round(info[m.name]["calls"] / n, 1),
                   flop_ratio=round(ref_flops / (info[m.name]["flops"] / n), 2),
                   time_s=round(t, 3), speedup=round(ref_t / t, 2),
                   accuracy=round(float(correct.float().mean()) * 100, 1),
                   fd=round(frechet_distance(stats, real_stats), 2),
                   ink=round(ink_of[m.name], 4), ref_ink=ink(ref), note=m.note)
        # Closeness to dense-50: its samples at other seeds (the verdict's measure).
        test = mmd2_test(feats, ref_feats, groups(n), groups(headline_seeds), strata(n), strata(headline_seeds),
                         rounds=rounds, seed=0)
        prec_r, rec_r = precision_recall(ref_feats, feats, k=3)
        row.update(kid_ref=_sig(test["estimate"]), kid_ref_ci=[_sig(v) for v in test["ci"]],
                   kid_ref_p=round(test["p_value"], 4), kid_ref_null95=_sig(test["null_q95"]),
                   fd_ref=round(frechet_distance(stats, ref_stats), 2), precision_ref=round(prec_r, 3),
                   recall_ref=round(rec_r, 3), ref_images=int(ref_feats.shape[0]))
        # Secondary: distribution metrics against the real held-out digits (scenes of them).
        k_mean, k_std = kid(feats, real_feats, subsets=100, subset_size=min(1000, feats.shape[0]),
                            labels_a=strata(n), labels_b=real_strata)
        lo, hi = frechet_interval(feats, real_stats, rounds=rounds)
        prec, rec = precision_recall(real_feats, feats, k=3)
        row.update(images=int(img.shape[0]), kid=_sig(k_mean), kid_std=_sig(k_std),
                   fd_ci=[round(lo, 2), round(hi, 2)], precision=round(prec, 3), recall=round(rec, 3),
                   precision_ci=_binomial_ci(prec, feats.shape[0]), recall_ci=_binomial_ci(rec, real_feats.shape[0]))
        if m.name == REF:
            row.update(psnr_db="ref", ssim="ref", note="floor: dense-50 against dense-50 at other seeds")
        else:
            row.update(psnr_db=round(float(psnr(img, ref).mean()), 2), ssim=round(float(ssim(img, ref).mean()), 4))
        rows.append(row)
    for row in rows:  # ink bias: mean pixel intensity relative to dense-50's, same noise and labels
        ref_ink = row.pop("ref_ink")
        row["ink_bias"] = round((ink_of[row["method"]] - ref_ink) / ref_ink, 4)
        row["ink_bias_pct"] = round(100.0 * row["ink_bias"], 1)
    what = "scenes of real digits" if scenes else "real digits"
    rows.append(dict(method=f"{what} ({floor_img.shape[0]} from the train split)", family="data", fd=round(floor_fd, 2),
                     accuracy=round(floor_acc * 100, 1),
                     note="feature-distance floor at this sample size"))
    return dict(rows=rows, images=seeds * labels, headline_images=headline_seeds * labels, seeds=seeds,
                headline_seeds=headline_seeds, labels=labels, repeats=repeats, cfg_scale=cfg_scale,
                ref_images=int(ref_feats.shape[0]), rounds=rounds,
                verdicts=fidelity_verdicts(rows) + verdicts(rows), grid=_grid(images, methods))


def _sig(v: float, digits: int = 4) -> float:
    """``v`` to ``digits`` significant digits (KID values span orders of magnitude)."""
    return float(f"{v:.{digits}g}") if math.isfinite(v) else v


def _binomial_ci(p: float, n: int) -> list[float]:
    """95 % normal-approximation interval of a share ``p`` of ``n`` samples (precision: generated
    samples; recall: real ones). It ignores the sampling noise of the k-NN radii themselves."""
    h = 1.96 * math.sqrt(max(p * (1 - p), 0.0) / n) if n else 0.0
    return [round(max(0.0, p - h), 3), round(min(1.0, p + h), 3)]


def regime_check(rows: list[dict], factor: float = 5.0, method: str = "dense-7") -> dict | None:
    """Is the checkpoint in the regime where few steps clearly fail? ``method``'s KID to dense-50
    must reach ``factor`` x the 95th percentile of its permutation null (what noise alone reaches
    at this sample size). ``None`` when the row (or its closeness columns) is missing."""
    r = next((r for r in rows if r.get("method") == method and "kid_ref" in r), None)
    if r is None:
        return None
    null = r["kid_ref_null95"]
    ratio = r["kid_ref"] / null if null > 0 else float("inf")
    return dict(method=method, kid_ref=r["kid_ref"], null95=null, ratio=round(ratio, 2), factor=factor,
                images=r["images"], passed=bool(ratio >= factor))


def _closeness(r: dict) -> str:
    lo, hi = r["kid_ref_ci"]
    return f"{r['kid_ref']:.4g} [{lo:.4g}, {hi:.4g}] (p = {r['kid_ref_p']:.3g})"


def fidelity_verdicts(rows: list[dict]) -> list[str]:
    """The fidelity verdict: closeness to dense-50 (``kid_ref``: KID between a method's samples and
    dense-50's at other seeds; 95 % interval over resampled seed batches; permutation p-value of
    "same distribution as dense-50"), beside the dense-vs-dense floor and each JiT preset's
    controls (dense at the same cost, dense on JiT's schedule with every token, JiT with full
    context), the error split, the regime check, JiT vs RAS at equal FLOPs, and the ink
    bias. Stated as measured, win or lose."""
    by = {r["method"]: r for r in rows}
    ref = by.get(REF)
    out = []
    if ref is None or "kid_ref" not in ref:
        return out
    out.append(f"floor: dense-50 vs dense-50 at other seeds, KID {_closeness(ref)}; noise alone reaches "
               f"{ref['kid_ref_null95']:.4g} (permutation null, 95th percentile)")
    reg = regime_check(rows)
    if reg is not None:
        out.append(f"regime check: dense-7's KID to dense-50 is {reg['ratio']}x the null's 95th percentile "
                   f"({reg['kid_ref']:.4g} vs {reg['null95']:.4g}, {reg['images']} images): "
                   f"{'IN' if reg['passed'] else 'NOT in'} the few-steps-fail regime (needs >= {reg['factor']:g}x)")
    dense = [r for r in rows if r.get("family") == "dense" and r["method"] != REF and "kid_ref" in r]
    for name, ctl in CONTROLS.items():
        j = by.get(name)
        if j is None or "kid_ref" not in j:
            continue
        parts = [f"{name} (FLOP ratio {j['flop_ratio']}): KID to dense-50 {_closeness(j)}"]
        if dense:
            same = min(dense, key=lambda r: abs(math.log(r["flop_ratio"] / j["flop_ratio"])))
            closer = j["kid_ref"] <= same["kid_ref"]
            rel = f", {j['kid_ref'] / same['kid_ref']:.2f}x its KID" if same["kid_ref"] > 0 else ""
            noise = ", both within noise (p >= 0.05)" if min(j["kid_ref_p"], same["kid_ref_p"]) >= 0.05 else ""
            parts.append(f"dense at the same cost, {same['method']} (FLOP ratio {same['flop_ratio']}): "
                         f"{_closeness(same)}: JiT {'at least as close' if closer else 'FARTHER'}{rel}{noise}")
        sched, oracle = by.get(ctl["schedule"]), by.get(ctl["oracle"])
        if sched is not None and "kid_ref" in sched:
            parts.append(f"dense on JiT's schedule, every token ({sched['method']}): {_closeness(sched)}")
        if sched is not None and oracle is not None and "kid_ref" in oracle:
            d, ds, do = j["kid_ref"], sched["kid_ref"], oracle["kid_ref"]
            if d > j["kid_ref_null95"]:  # shares of a difference that noise alone does not reach
                parts.append(f"error split of JiT's KID: schedule {100 * ds / d:.0f} %, sparse context "
                             f"{100 * (d - do) / d:.0f} %, lift + micro-flow {100 * (do - ds) / d:.0f} %")
            else:
                parts.append("no error split: JiT's KID is within the permutation null's 95th percentile")
        out.append("; ".join(parts))
    j7, d7 = by.get(J7), by.get("dense-7")
    if j7 is not None and d7 is not None and "kid_ref" in j7 and "kid_ref" in d7:
        met = j7["kid_ref"] <= d7["kid_ref"]
        by_how = f", JiT's {j7['kid_ref'] / d7['kid_ref']:.2f}x dense-7's" if not met and d7["kid_ref"] > 0 else ""
        noise = "; both within noise (p >= 0.05)" if min(j7["kid_ref_p"], d7["kid_ref_p"]) >= 0.05 else ""
        out.append(f"goal (JiT 7x at least as close to dense-50 as dense-7): {'MET' if met else 'NOT met'} "
                   f"(KID {j7['kid_ref']:.4g} vs {d7['kid_ref']:.4g}{by_how}{noise})")
    for name in ("JiT 4x-reference", "JiT 7x-reference"):
        r = by.get(name)
        if r is not None and "kid_ref" in r:
            out.append(f"{name} (FLOP ratio {r['flop_ratio']}): KID to dense-50 {_closeness(r)}")
    if j7 is not None and "ink_bias_pct" in j7:
        ok = abs(j7["ink_bias_pct"]) <= 2.0
        out.append(f"{J7}: ink bias {j7['ink_bias_pct']:+.1f} % vs dense-50 on the same noise "
                   f"({'within' if ok else 'NOT within'} 2 %)")
    ras = [r for r in rows if r.get("family") == "ras" and "kid_ref" in r]
    for name in (J4, J7):
        j = by.get(name)
        if j is None or not ras or "kid_ref" not in j:
            continue
        rival = min(ras, key=lambda r: abs(math.log(r["flop_ratio"] / j["flop_ratio"])))
        better = j["kid_ref"] < rival["kid_ref"]
        out.append(f"{name} (FLOP ratio {j['flop_ratio']}) vs {rival['method']} ({rival['flop_ratio']}): KID to "
                   f"dense-50 {j['kid_ref']:.4g} vs {rival['kid_ref']:.4g} ({'JiT closer' if better else 'JiT FARTHER'})")
    others = [r for r in rows if r.get("family") in ("dense", "ras") and r["method"] != REF and "kid_ref" in r]
    for r in rows:  # JiT with RAS in its final stage: against JiT alone and the nearest-FLOP dense or RAS row
        base = by.get(r["method"].split(" + RAS")[0])
        if r.get("family") != "jit+ras" or "kid_ref" not in r or base is None or "kid_ref" not in base:
            continue
        near = min(others, key=lambda o: abs(math.log(o["flop_ratio"] / r["flop_ratio"]))) if others else None
        line = (f"{r['method']} (FLOP ratio {r['flop_ratio']}): KID to dense-50 {_closeness(r)}; "
                f"{base['method']} alone ({base['flop_ratio']}): {base['kid_ref']:.4g}")
        if near is not None:
            line += f"; nearest in FLOPs, {near['method']} ({near['flop_ratio']}): {near['kid_ref']:.4g}"
        out.append(line)
    return out


def verdicts(rows: list[dict]) -> list[str]:
    """The suite's acceptance criteria (JiT 4x vs dense-12 on PSNR to dense-50; JiT 4x accuracy within 1 point of dense-50; JiT 7x vs dense-7 on PSNR, accuracy and feature distance), stated as measured (win or lose)."""
    by = {r["method"]: r for r in rows}
    out = []

    def get(name, key):
        r = by.get(name)
        return None if r is None else r.get(key)

    j4, j7 = "JiT 4x assign/independent", "JiT 7x assign/independent"
    if get(j4, "psnr_db") is not None and get("dense-12", "psnr_db") is not None:
        a, b = get(j4, "psnr_db"), get("dense-12", "psnr_db")
        out.append(f"JiT 4x PSNR to dense-50 {a} dB vs dense-12 {b} dB: {'JiT wins' if a > b else 'JiT LOSES'}")
        best = max((r for r in rows if r["method"].startswith("JiT 4x") and r["family"] == "jit"),
                   key=lambda r: r["psnr_db"])
        out.append(f"best JiT 4x variant: {best['method']} {best['psnr_db']} dB")
    if get(j4, "accuracy") is not None:
        a, b = get(j4, "accuracy"), get(REF, "accuracy")
        out.append(f"JiT 4x accuracy {a} % vs dense-50 {b} %: {'within' if abs(a - b) <= 1.0 else 'NOT within'} 1 point")
    if get(j7, "psnr_db") is not None and get("dense-7", "psnr_db") is not None:
        wins = []
        for key, better in (("psnr_db", max), ("accuracy", max), ("fd", min)):
            a, b = get(j7, key), get("dense-7", key)
            wins.append(f"{key} {a} vs {b} ({'tie' if a == b else 'win' if better(a, b) == a else 'lose'})")
        out.append("JiT 7x vs dense-7: " + ", ".join(wins))
    return out


def _grid(images: dict, methods: list[Method]):
    """First seed's digits per method (rows), for the PNG."""
    return [(m.name, images[m.name][0]) for m in methods]


def save_png(path: str, grid) -> None:
    from PIL import Image, ImageDraw

    pad, label_w, scale = 2, 260, 2
    n = grid[0][1].shape[0]
    h = w = grid[0][1].shape[-1]
    W = label_w + n * (w + pad) * scale
    H = len(grid) * (h + pad) * scale + pad
    canvas = Image.new("L", (W, H), 255)
    draw = ImageDraw.Draw(canvas)
    for r, (name, img) in enumerate(grid):
        y0 = pad + r * (h + pad) * scale
        draw.text((4, y0 + h * scale // 2 - 6), name, fill=0)
        arr = ((img[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        for j in range(n):
            tile = Image.fromarray(arr[j], mode="L").resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (w + pad) * scale, y0))
    canvas.save(path)


_COLORS = {"dense": "#444444", "dense-beta": "#888888", "jit": "#d62728", "ras": "#1f77b4", "cache": "#2ca02c",
           "jit+cache": "#9467bd", "diagnostic": "#ff7f0e"}


def save_svg(path: str, rows: list[dict]) -> None:
    """Three scatter panels (x: speed-up over dense-50) drawn as plain SVG (no plotting dependency):
    KID to dense-50 at other seeds (the verdict's measure) with its 95 % interval (the dashed line:
    the dense-vs-dense floor), ink bias vs dense-50, and PSNR to dense-50 (closeness from the same
    noise, not quality). Headline rows are drawn larger."""
    pts = [r for r in rows if r.get("family") in _COLORS and isinstance(r.get("kid_ref"), (int, float))]
    ref = next(r for r in rows if r["method"] == REF)
    panels = [("kid_ref", "KID to dense-50, other seeds (bars: 95 % interval)"), ("ink_bias_pct", "ink bias vs dense-50 (%)"),
              ("psnr_db", "PSNR to dense-50 (dB; closeness, not quality)")]
    most = max(r.get("images", 0) for r in pts)
    pw, ph, m = 360, 260, 50
    W, H = len(panels) * (pw + m) + m, ph + 2 * m + 40
    xs = [r["speedup"] for r in pts] + [1.0]
    x0, x1 = 0.0, max(xs) * 1.1
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>']
    for k, (key, title) in enumerate(panels):
        ox = m + k * (pw + m)
        here = [r for r in pts if isinstance(r.get(key), (int, float))]
        err = {id(r): tuple(r["kid_ref_ci"]) if key == "kid_ref" else (r[key], r[key]) for r in here}
        vals = ([err[id(r)][1] for r in here] + [err[id(r)][0] for r in here]
                + ([ref[key]] if isinstance(ref.get(key), (int, float)) else []))
        lo, hi = min(vals), max(vals)
        lo, hi = (lo - 1, hi + 1) if hi == lo else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))

        def X(v):
            return ox + (v - x0) / (x1 - x0) * pw

        def Y(v):
            return m + ph - (v - lo) / (hi - lo) * ph

        out.append(f'<rect x="{ox}" y="{m}" width="{pw}" height="{ph}" fill="none" stroke="#000"/>')
        out.append(f'<text x="{ox + pw / 2}" y="{m - 10}" text-anchor="middle">{title}</text>')
        out.append(f'<text x="{ox + pw / 2}" y="{m + ph + 30}" text-anchor="middle">speed-up over dense-50 (wall time)</text>')
        for t in range(0, int(x1) + 1, max(1, int(x1) // 6 or 1)):
            out.append(f'<text x="{X(t):.1f}" y="{m + ph + 14}" text-anchor="middle">{t}</text>')
        for t in (lo, (lo + hi) / 2, hi):
            label = f"{t:.3g}" if key == "kid_ref" else f"{t:.1f}"
            out.append(f'<text x="{ox - 4}" y="{Y(t) + 4:.1f}" text-anchor="end">{label}</text>')
        if isinstance(ref.get(key), (int, float)):
            out.append(f'<line x1="{ox}" x2="{ox + pw}" y1="{Y(ref[key]):.1f}" y2="{Y(ref[key]):.1f}" '
                       f'stroke="#000" stroke-dasharray="4 3"/>')
        for r in here:
            cx, (e_lo, e_hi) = X(r["speedup"]), err[id(r)]
            if e_hi > e_lo:
                out.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{Y(e_lo):.1f}" y2="{Y(e_hi):.1f}" '
                           f'stroke="{_COLORS[r["family"]]}"/>')
            size = 5 if r.get("images", 0) == most else 3
            out.append(f'<circle cx="{cx:.1f}" cy="{Y(r[key]):.1f}" r="{size}" fill="{_COLORS[r["family"]]}" '
                       f'fill-opacity="0.8"><title>{r["method"]} ({r.get("images")} images): {r[key]}</title></circle>')
    lx = m
    for fam, col in _COLORS.items():
        out.append(f'<circle cx="{lx}" cy="{H - 14}" r="5" fill="{col}"/><text x="{lx + 8}" y="{H - 10}">{fam}</text>')
        lx += 110
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


COLS = ["method", "images", "steps", "flop_ratio", "speedup", "kid_ref", "kid_ref_ci", "kid_ref_p", "kid_ref_null95",
        "fd_ref", "precision_ref", "recall_ref", "accuracy", "kid", "fd", "ink_bias_pct", "psnr_db", "ssim", "note"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="JiT vs dense, RAS and cache hooks on the embedded tiny FLUX")
    p.add_argument("--seeds", type=int, default=10, help="seeds (x 10 digits) of the non-headline rows")
    p.add_argument("--headline-seeds", type=int, default=100,
                   help=f"seeds (x 10 digits) of the headline rows {HEADLINE} and every JiT + cache row")
    p.add_argument("--labels", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="a few methods only (smoke run)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cfg-scale", type=float, default=3.0,
                   help="true CFG scale of every method (null label as the negative prompt; 1 = unguided)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--name", default="quality_cpu")
    p.add_argument("--model", default="tiny",
                   help="committed tiny checkpoint (tiny, tiny-subsets, tiny-scenes) or a folder")
    p.add_argument("--rounds", type=int, default=200,
                   help="bootstrap and permutation rounds (whole seed batches) of the closeness to dense-50, and "
                        "bootstrap rounds of the FD interval to the real digits")
    p.add_argument("--regime", action="store_true",
                   help="only the regime check: dense-50 and dense-7 at --headline-seeds seeds; writes NAME_regime.json")
    p.add_argument("--only", nargs="+", default=None, metavar="METHOD",
                   help="run only these methods (dense-50, the reference, is always run first)")
    p.add_argument("--no-e2e", action="store_true",
                   help="skip the speed run at the FLUX 1024^2 token count (benchmarks.bench_e2e, 64 x 64 grid)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from jit_eval.tiny_flux import load_tiny_flux

    methods = build_methods(args.quick)
    if args.regime:
        return _regime_main(args, methods, argv)
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in methods})
        if unknown:
            p.error(f"unknown methods {unknown}; known: {[m.name for m in methods]}")
        methods = [m for m in methods if m.name == REF or m.name in args.only]
    if args.headline_seeds < args.seeds:
        p.error(f"--headline-seeds ({args.headline_seeds}) must be >= --seeds ({args.seeds})")
    res = run_quality(args.seeds, args.labels, args.repeats, args.quick, model=load_tiny_flux(args.model),
                      methods=methods, cfg_scale=args.cfg_scale, headline_seeds=args.headline_seeds,
                      rounds=args.rounds)
    env = environment()
    env["command"] = command_line("benchmarks.quality", sys.argv[1:] if argv is None else argv)
    env["model"] = args.model
    for r in res["rows"]:
        r["model"] = args.model
    stem = os.path.join(args.out, args.name)
    caption = (f"Headline rows ({'; '.join(HEADLINE)}; every JiT + cache row): "
               f"{res['headline_images']} images ({res['labels']} prompts x {res['headline_seeds']} seeds); other rows "
               f"{res['images']} images (the first {res['seeds']} seeds); the `images` column says which. Same noise and "
               f"prompts for every method, CFG scale {res['cfg_scale']}.\n\n"
               f"**The verdict's measure is closeness to dense-50**: kid_ref is the unbiased KID (stratified by prompt) "
               f"between a method's samples and dense-50's samples at *other* seeds ({res['ref_images']} images, seeds "
               f"{REF_SEED0}+); kid_ref_ci its 95 % interval over {res['rounds']} resamples of whole seed batches; "
               f"kid_ref_p the permutation p-value of 'same distribution as dense-50' and kid_ref_null95 the permutation "
               f"null's 95th percentile (what noise alone reaches); the dense-50 row is the dense-vs-dense floor. "
               f"fd_ref, precision_ref and recall_ref: the same comparison with the Frechet distance and k-NN "
               f"precision / recall (dense-50's other-seed samples as the reference). All in the digit classifier's "
               f"features (per slot, side by side, for scenes).\n\n"
               f"Secondary columns: kid, fd (against real held-out digits, or scenes of them), accuracy (share of "
               f"digits / slots read as asked), ink_bias_pct and psnr_db / ssim (against dense-50 on the same noise: "
               f"closeness of the same draw, not quality). Speed-up = dense-50 median wall time / method's, "
               f"{res['repeats']} interleaved runs of the seed-0 batch; flop_ratio counts the transformer blocks that "
               f"actually ran.\n\nVerdicts:\n\n" + "\n".join(f"- {v}" for v in res["verdicts"]))
    write_results(stem, "Speed and fidelity on the tiny FLUX (CPU)", env, res["rows"], COLS, caption)
    save_svg(stem + ".svg", res["rows"])
    save_png(stem + ".png", res["grid"])
    for v in res["verdicts"]:
        print(v)
    if not args.no_e2e:
        # Same architecture at 4096 image tokens, where attention and linear costs have FLUX's
        # proportions: wall-clock vs FLOP vs transformer-time ratios (results/e2e_cpu.md).
        from . import bench_e2e

        bench_e2e.main(["--grid", "64", "--repeats", str(args.repeats), "--threads", str(args.threads)]
                       + (["--out", os.path.join(args.out, "e2e_cpu")] if args.out else []))
    return 0


def _regime_main(args, methods, argv) -> int:
    """``--regime``: dense-50 and dense-7 only, the regime check printed and written as JSON (exit
    status 1 when the checkpoint is not in the regime)."""
    import json

    from jit_eval.tiny_flux import load_tiny_flux

    pick = [m for m in methods if m.name in (REF, "dense-7")]
    res = run_quality(args.headline_seeds, args.labels, 1, model=load_tiny_flux(args.model), methods=pick,
                      cfg_scale=args.cfg_scale, headline_seeds=args.headline_seeds, rounds=args.rounds)
    check = regime_check(res["rows"])
    env = environment()
    env["command"] = command_line("benchmarks.quality", sys.argv[1:] if argv is None else argv)
    out = dict(model=args.model, check=check, images=res["headline_images"], ref_images=res["ref_images"],
               cfg_scale=args.cfg_scale, rounds=args.rounds,
               rows=[{k: r.get(k) for k in ("method", "images", "kid_ref", "kid_ref_ci", "kid_ref_p", "kid_ref_null95",
                                            "fd_ref", "accuracy")} for r in res["rows"] if "kid_ref" in r],
               env=env)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{args.name}_regime.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    for v in res["verdicts"][:2]:
        print(v)
    print(f"wrote {path}")
    return 0 if check and check["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
