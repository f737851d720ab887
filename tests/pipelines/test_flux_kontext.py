"""JiTFluxKontextPipeline (FLUX.1 Kontext, a reference image) on a tiny random FLUX.1 built offline.

The reference image is a small random PIL image (or a pixel / latent tensor). ``max_area``
is set to the target's own area so that Kontext's area fitting keeps the tiny sizes, and
``_auto_resize=False`` keeps the reference at its own size (Kontext's preferred resolutions
are ~1 megapixel).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline, FluxPipeline
from PIL import Image

from tests._fixtures.flux import build_pipe, prompt_inputs
from jit_sampler import JiTConfig, JiTFluxKontextPipeline, JiTFluxPipeline, enable_jit


@pytest.fixture(scope="module")
def base():
    return build_pipe(FluxKontextPipeline)


@pytest.fixture(scope="module")
def pipe(base):
    p = JiTFluxKontextPipeline.from_pipe(base)
    p.set_progress_bar_config(disable=True)
    return p


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ref_image(h=64, w=96, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


REF_TOKENS = (64 // 16) * (96 // 16)  # the 64 x 96 reference: a 4 x 6 token grid


def kw(size=128, image=True, **over):
    d = dict(image=ref_image() if image is True else image, height=size, width=size, max_area=size * size,
             _auto_resize=False, output_type="latent", **prompt_inputs())
    d.update(over)
    return d


class SeqLog:
    """A forward pre-hook recording the sequence the transformer sees in every call."""

    def __init__(self, tr):
        self.tr, self.calls = tr, []

    def __enter__(self):
        def hook(module, args, kwargs):
            self.calls.append({"tokens": kwargs["hidden_states"].shape[1], "batch": kwargs["hidden_states"].shape[0],
                               "ids": kwargs["img_ids"].clone(), "x": kwargs["hidden_states"].clone(),
                               "enc": kwargs["encoder_hidden_states"].clone(),
                               "mask": (kwargs.get("joint_attention_kwargs") or {}).get("attention_mask")})
        self.handle = self.tr.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False


def test_jit_none_is_the_stock_kontext_pipeline(base, pipe):
    a = base(generator=gen(), num_inference_steps=3, **kw()).images
    b = pipe(generator=gen(), num_inference_steps=3, jit=None, **kw()).images
    assert torch.equal(a, b) and pipe.last_jit_report is None
    assert isinstance(pipe, FluxKontextPipeline) and pipe.transformer is base.transformer


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_dense_config_on_pipeline_schedule_matches_kontext_pipeline(base, pipe, cfg_scale):
    """One dense stage on the scheduler's sigmas is Kontext's own Euler loop, reference included."""
    k = kw(size=96, true_cfg_scale=cfg_scale, prompt_embeds=prompt_inputs(batch=2)["prompt_embeds"],
           pooled_prompt_embeds=prompt_inputs(batch=2)["pooled_prompt_embeds"],
           **prompt_inputs(batch=2, seed=3, prefix="negative_"))
    ref = base(generator=gen(), num_inference_steps=5, **k).images
    got = pipe(generator=gen(), jit=JiTConfig.dense(5, sigma_schedule="pipeline"), **k).images
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert pipe.last_jit_report.model_calls == (10 if cfg_scale > 1 else 5)


@pytest.mark.parametrize("kind", ["pixels", "latents"])
def test_dense_matches_stock_with_tensor_references(base, pipe, kind):
    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, 3, 64, 48, generator=g) if kind == "pixels" else torch.randn(1, 4, 8, 6, generator=g)
    ref = base(generator=gen(), num_inference_steps=4, **kw(size=64, image=image)).images
    with SeqLog(pipe.transformer) as log:
        got = pipe(generator=gen(), jit=JiTConfig.dense(4, sigma_schedule="pipeline"),
                   **kw(size=64, image=image)).images
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert all(c["tokens"] == 16 + 12 for c in log.calls)  # 4 x 4 target + 4 x 3 reference tokens


def test_reference_tokens_in_every_call_and_only_target_jitted(pipe):
    with SeqLog(pipe.transformer) as log:
        out = pipe(generator=gen(), jit="7x", **kw()).images
    rep = pipe.last_jit_report
    counts = JiTConfig.preset("7x").token_counts(64)
    assert rep.active_tokens == [counts[0]] * 4 + [counts[1]] * 3 + [64] * 4  # target tokens only
    assert [c["tokens"] for c in log.calls] == [m + REF_TOKENS for m in rep.active_tokens]
    for c, m in zip(log.calls, rep.active_tokens):
        ids = c["ids"]
        assert ids.shape == (m + REF_TOKENS, 3)
        assert ids[:m, 0].eq(0).all() and ids[m:, 0].eq(1).all()  # target (0, r, c), then reference (1, r, c)
        assert torch.equal(ids[m:, 1:], log.calls[-1]["ids"][64:, 1:])  # the same reference rows every call
        assert torch.equal(c["x"][:, m:], log.calls[0]["x"][:, counts[0]:])  # the same reference tokens
    assert set((ids[64:, 1] * 6 + ids[64:, 2]).long().tolist()) == set(range(REF_TOKENS))
    assert out.shape == (1, 64, 16) and torch.isfinite(out).all()


def test_reference_changes_the_result(pipe):
    a = pipe(generator=gen(), jit="7x", **kw()).images
    b = pipe(generator=gen(), jit="7x", **kw(image=ref_image(seed=1))).images
    c = pipe(generator=gen(), jit="7x", **kw(image=None)).images
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_true_cfg_keeps_the_reference_in_both_passes(pipe):
    neg = prompt_inputs(seed=7, prefix="negative_")
    with SeqLog(pipe.transformer) as log:
        pipe(generator=gen(), jit="7x", true_cfg_scale=3.0, **kw(), **neg)
    assert pipe.last_jit_report.model_calls == 22 and len(log.calls) == 22
    for cond, unc in zip(log.calls[0::2], log.calls[1::2]):
        assert torch.equal(cond["ids"], unc["ids"]) and torch.equal(cond["x"], unc["x"])
        assert not torch.equal(cond["enc"], unc["enc"])
        assert cond["tokens"] > REF_TOKENS


def test_seed_determinism_and_sensitivity(pipe):
    a = pipe(generator=gen(3), jit="4x", **kw()).images
    b = pipe(generator=gen(3), jit="4x", **kw()).images
    c = pipe(generator=gen(4), jit="4x", **kw()).images
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("policy", ["shared", "per_sample"])
def test_batch_and_images_per_prompt(pipe, policy):
    cfg = JiTConfig.preset("7x", anchor_policy=policy)
    pi = prompt_inputs(batch=2)
    with SeqLog(pipe.transformer) as log:
        out = pipe(generator=gen(), jit=cfg, num_images_per_prompt=2, **kw(**pi)).images
    assert out.shape == (4, 64, 16) and torch.isfinite(out).all()
    rep = pipe.last_jit_report
    assert all(c["tokens"] - REF_TOKENS in rep.active_tokens for c in log.calls)
    sparse = sum(1 for m in rep.active_tokens if m < 64)
    if policy == "shared":
        assert rep.model_calls == 11 and all(c["batch"] == 4 for c in log.calls)
    else:  # one forward per sample while the sets differ, each with the reference
        assert rep.model_calls == sparse * 4 + (11 - sparse)
        assert [c["batch"] for c in log.calls[:4]] == [1] * 4


def test_per_sample_batch_matches_single_runs(pipe):
    cfg = JiTConfig.preset("7x", anchor_policy="per_sample")
    pi = prompt_inputs(batch=2)
    both = pipe(generator=[gen(1), gen(2)], jit=cfg, **kw(**pi)).images
    one = pipe(generator=[gen(2)], jit=cfg, **kw(prompt_embeds=pi["prompt_embeds"][1:],
                                                  pooled_prompt_embeds=pi["pooled_prompt_embeds"][1:])).images
    torch.testing.assert_close(both[1:], one, rtol=1e-4, atol=1e-5)


def test_token_bucket_pads_after_the_reference(pipe):
    plain = pipe(generator=gen(), jit="7x", **kw()).images
    cfg = JiTConfig.preset("7x", token_bucket=16)
    with SeqLog(pipe.transformer) as log:
        bucketed = pipe(generator=gen(), jit=cfg, **kw()).images
    rep = pipe.last_jit_report
    for c, m in zip(log.calls, rep.active_tokens):
        n = m + REF_TOKENS
        assert c["tokens"] % 16 == 0 and c["tokens"] - 16 < n <= c["tokens"]
        assert torch.equal(c["x"][:, m:n], log.calls[-1]["x"][:, 64:64 + REF_TOKENS])  # refs right after the target
        if c["tokens"] > n:  # the padding alone is masked out
            keep = c["mask"].reshape(-1)
            text = c["enc"].shape[1]
            assert keep[:text + n].all() and not keep[text + n:].any()
    torch.testing.assert_close(bucketed, plain, rtol=1e-4, atol=1e-5)


def test_report_counts_reference_tokens_as_dense(pipe):
    pipe(generator=gen(), jit="7x", **kw())
    rep = pipe.last_jit_report
    f = rep.flops
    assert f["extra_tokens"] == [REF_TOKENS] * 11
    want = (11 * (64 + REF_TOKENS)) / sum(m + REF_TOKENS for m in rep.active_tokens)
    assert f["speedup_vs_same_steps"]["image_linear"] == pytest.approx(want)
    pipe(generator=gen(), jit="7x", **kw(image=None))
    assert pipe.last_jit_report.flops["speedup_vs_same_steps"]["image_linear"] > want  # no dense reference


def test_enable_jit_picks_the_kontext_pipeline(base):
    e = enable_jit(base, "7x")
    e.set_progress_bar_config(disable=True)
    assert type(e) is JiTFluxKontextPipeline and e.transformer is base.transformer
    e(generator=gen(), **kw())
    assert len(e.last_jit_report.active_tokens) == 11
    assert type(enable_jit(build_pipe(FluxPipeline), "4x")) is JiTFluxPipeline


def test_bad_references_raise_before_any_model_call(pipe):
    with SeqLog(pipe.transformer) as log:
        with pytest.raises(TypeError, match="image"):
            pipe(generator=gen(), jit="7x", **kw(image="photo.png"))
        with pytest.raises(ValueError, match="even"):
            pipe(generator=gen(), jit="7x", **kw(image=torch.zeros(1, 4, 5, 6)))
        with pytest.raises(ValueError, match="empty"):
            pipe(generator=gen(), jit="7x", **kw(image=[]))
        # a FLUX.1 text-to-image pipeline takes no reference image at all
        flux = JiTFluxPipeline.from_pipe(pipe)
        with pytest.raises(TypeError, match="image"):
            flux(generator=gen(), height=64, width=64, jit="7x", image=ref_image(), **prompt_inputs())
    assert log.calls == []


def test_user_inputs_are_not_mutated(pipe):
    lat = torch.randn(1, 4, 8, 6, generator=gen(9))
    jak = {"scale": 1.0}
    k = kw(image=lat, joint_attention_kwargs=jak)
    before = (lat.clone(), k["prompt_embeds"].clone())
    pipe(generator=gen(), jit="7x", **k)
    assert torch.equal(lat, before[0]) and torch.equal(k["prompt_embeds"], before[1]) and jak == {"scale": 1.0}


def test_anchor_attention_with_a_reference(pipe):
    plain = pipe(generator=gen(), jit="7x", **kw()).images
    fused = pipe(generator=gen(), jit="7x", anchor_attention=True, **kw()).images
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)


def test_flux_velocity_reference_arguments_are_checked(pipe):
    from jit_sampler import FluxVelocity

    pe, ids = prompt_inputs(), torch.zeros(64, 3)
    args = (pipe.transformer, pe["prompt_embeds"], pe["pooled_prompt_embeds"], torch.zeros(6, 3), ids)
    with pytest.raises(ValueError, match="both or neither"):
        FluxVelocity(*args, ref_tokens=torch.zeros(1, 8, 16))
    with pytest.raises(ValueError, match="ref_ids"):
        FluxVelocity(*args, ref_tokens=torch.zeros(1, 8, 16), ref_ids=torch.zeros(8, 4))
    v = FluxVelocity(*args, ref_tokens=torch.zeros(1, 8, 16), ref_ids=torch.ones(8, 3), guidance=torch.full((1,), 3.5))
    out = v(torch.randn(1, 10, 16), torch.arange(10), 0.5, 0)
    assert out.shape == (1, 10, 16) and v.calls == 1  # the target rows only


def test_output_size_follows_max_area_as_stock(base, pipe):
    k = kw(size=64, max_area=96 * 96, height=64, width=128)  # aspect 2 -> 128 x 64 rounded to 16: 64 x 128
    a = base(generator=gen(), num_inference_steps=2, **k).images
    got = pipe(generator=gen(), jit="7x", **k).images
    assert got.shape == a.shape == (1, (64 // 16) * (128 // 16), 16)
    assert (pipe.last_jit_report.height, pipe.last_jit_report.width) == (4, 8)


def test_flop_summary_extra_tokens():
    from jit_sampler.report import FLUX1_DEV_CONFIG, flop_summary, flux_run_flops

    act = [1310] * 4 + [2457] * 3 + [4096] * 4
    s = flop_summary(FLUX1_DEV_CONFIG, act, 4096, text_tokens=512, extra_tokens=4096)
    want = flux_run_flops(FLUX1_DEV_CONFIG, [8192] * 11, 512).total / \
        flux_run_flops(FLUX1_DEV_CONFIG, [m + 4096 for m in act], 512).total
    assert s["speedup_vs_same_steps"]["total"] == pytest.approx(want)
    plain = flop_summary(FLUX1_DEV_CONFIG, act, 4096, text_tokens=512)
    assert 1 < s["speedup_vs_same_steps"]["image_linear"] < plain["speedup_vs_same_steps"]["image_linear"]
    first = flop_summary(FLUX1_DEV_CONFIG, act, 4096, text_tokens=512, extra_tokens=[4096] + [0] * 10)
    base50 = flux_run_flops(FLUX1_DEV_CONFIG, [8192] + [4096] * 49, 512).image_linear
    assert first["dense_baseline"]["image_linear"] == pytest.approx(base50)
    with pytest.raises(ValueError, match="one count per step"):
        flop_summary(FLUX1_DEV_CONFIG, act, 4096, text_tokens=512, extra_tokens=[1, 2])
