"""JiTFlux2KleinPipeline on a tiny, randomly initialised FLUX.2-klein built offline."""

from __future__ import annotations

import pytest
import torch

import tests._fixtures.flux  # noqa: F401  (one torch thread)
from tests._fixtures.flux2 import build_klein, embeds
from jit_sampler import JiTConfig
from jit_sampler.pipelines.flux2_klein import JiTFlux2KleinPipeline
from jit_sampler.report import flux_run_flops


@pytest.fixture(scope="module")
def base():
    return build_klein()


@pytest.fixture(scope="module")
def pipe(base):
    p = JiTFlux2KleinPipeline.from_pipe(base)
    p.set_progress_bar_config(disable=True)
    return p


def kw(batch=1, **over):
    d = dict(prompt_embeds=embeds(batch), negative_prompt_embeds=embeds(batch, seed=2), height=256, width=256,
             output_type="latent", guidance_scale=4.0, generator=torch.Generator().manual_seed(0))
    d.update(over)
    return d


class Spy:
    def __init__(self, tr):
        self.tr, self.orig, self.calls = tr, tr.forward, []

    def __enter__(self):
        def fwd(*a, **k):
            self.calls.append({"tokens": k["hidden_states"].shape[1], "img_ids": k["img_ids"].clone(),
                               "enc": k["encoder_hidden_states"].clone()})
            return self.orig(*a, **k)
        self.tr.forward = fwd
        return self

    def __exit__(self, *exc):
        self.tr.forward = self.orig
        return False


def test_jit_none_is_the_stock_pipeline(base, pipe):
    a = base(num_inference_steps=5, **kw()).images
    b = pipe(num_inference_steps=5, jit=None, **kw()).images
    assert torch.equal(a, b) and pipe.last_jit_report is None


def test_dense_config_matches_stock_loop(base, pipe):
    """One stage with every token on the pipeline's schedule is the stock Euler loop."""
    a = base(num_inference_steps=6, **kw()).images
    c = pipe(num_inference_steps=6, jit=JiTConfig.dense(6), **kw()).images
    torch.testing.assert_close(c, a, rtol=0, atol=1e-5)
    # the schedule is the pipeline's own (shifted linspace), not Beta-warped
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    fresh = FlowMatchEulerDiscreteScheduler()
    fresh.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=compute_empirical_mu(256, 6))
    assert pipe.last_jit_report.sigmas == pytest.approx(fresh.sigmas.tolist())
    assert pipe.last_jit_report.sigmas != pytest.approx(JiTConfig.dense(6) and
                                                        __import__("jit_sampler").beta_sigmas(6, 1.4, 0.425))


def test_preset_token_counts_cfg_and_flops(pipe):
    with Spy(pipe.transformer) as spy:
        out = pipe(jit="7x", **kw()).images
    rep = pipe.last_jit_report
    assert rep.active_tokens == [81] * 4 + [153] * 3 + [256] * 4
    assert rep.model_calls == 22 and len(spy.calls) == 22  # true CFG: two passes per step
    for cond, uncond in zip(spy.calls[::2], spy.calls[1::2]):  # cond and uncond share the anchors
        assert cond["tokens"] == uncond["tokens"] and torch.equal(cond["img_ids"], uncond["img_ids"])
        assert not torch.equal(cond["enc"], uncond["enc"])
    ids = spy.calls[0]["img_ids"]
    assert ids.shape == (81, 4) and ids[:, 0].eq(0).all() and ids[:, 3].eq(0).all()  # (t, h, w, l)
    cfg = pipe.transformer.config
    want = flux_run_flops(cfg, [256] * 11, 5).image_linear / flux_run_flops(cfg, rep.active_tokens, 5).image_linear
    assert rep.flops["speedup_vs_same_steps"]["image_linear"] == pytest.approx(want)
    assert rep.flops["speedup_vs_same_steps"]["image_linear"] == pytest.approx(11 / (4 * 81 / 256 + 3 * 153 / 256 + 4))
    assert out.shape == (1, 8, 32, 32) and torch.isfinite(out).all()


def test_distilled_model_runs_one_pass(base):
    p = JiTFlux2KleinPipeline.from_pipe(build_klein(is_distilled=True))
    p.set_progress_bar_config(disable=True)
    p(jit="7x", **kw())
    assert p.last_jit_report.model_calls == 11


def test_seeded_reproducible_and_batched(pipe):
    a = pipe(jit="4x", **kw(batch=2)).images
    b = pipe(jit="4x", **kw(batch=2)).images
    assert torch.equal(a, b) and a.shape[0] == 2
    c = pipe(jit="4x", **kw(batch=2, generator=torch.Generator().manual_seed(1))).images
    assert not torch.equal(a, c)


def test_explicit_steps_override_preset(pipe):
    pipe(jit="7x", num_inference_steps=14, **kw())
    assert len(pipe.last_jit_report.active_tokens) == 14


def test_refuses_bad_reference_images_and_bad_presets(pipe):
    # reference images are supported (tests/pipelines/test_flux2_reference.py); other types are refused
    with pytest.raises(TypeError, match="PIL"):
        pipe(jit="4x", image=torch.zeros(1, 3, 64, 64), **kw())
    with pytest.raises(ValueError, match="unknown preset"):
        pipe(jit="9x", **kw())


def test_per_sample_batch_matches_single_runs(pipe):
    cfg = JiTConfig.preset("7x", anchor_policy="per_sample")
    e = embeds(2)
    both = pipe(jit=cfg, **kw(2, generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                              prompt_embeds=e, negative_prompt_embeds=embeds(2, seed=2))).images
    one = pipe(jit=cfg, **kw(1, generator=[torch.Generator().manual_seed(2)], prompt_embeds=e[1:],
                             negative_prompt_embeds=embeds(2, seed=2)[1:])).images
    torch.testing.assert_close(both[1:], one, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hw", [(160, 224), (96, 96)])
def test_non_square_sizes_decode_to_images(pipe, hw):
    h, w = hw
    out = pipe(jit="7x", **kw(height=h, width=w, output_type="pt")).images
    assert out.shape == (1, 3, h, w) and torch.isfinite(out).all()
    assert pipe.last_jit_report.active_tokens[-1] == (h // 16) * (w // 16)


def test_callback_and_interrupt(pipe):
    seen = []

    def cb(p, i, t, kwargs):
        seen.append((i, float(t), kwargs["latents"].shape))
        if i == 2:
            p._interrupt = True
        return {}

    pipe(jit="7x", callback_on_step_end=cb, **kw())
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][1] == pytest.approx(1000.0)
    assert len(pipe.last_jit_report.active_tokens) == 3


def test_enable_jit_picks_the_klein_pipeline(base):
    from jit_sampler import enable_jit

    e = enable_jit(base, "7x")
    e.set_progress_bar_config(disable=True)
    assert isinstance(e, JiTFlux2KleinPipeline) and e.transformer is base.transformer
    e(**kw())
    assert len(e.last_jit_report.active_tokens) == 11
    e(jit=None, num_inference_steps=2, **kw())
    assert e.last_jit_report is None
    with pytest.raises(TypeError, match="FluxPipeline or Flux2KleinPipeline"):
        enable_jit(object(), "4x")
