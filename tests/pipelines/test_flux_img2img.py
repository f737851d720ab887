"""JiTFluxImg2ImgPipeline and JiTFluxInpaintPipeline on tiny, randomly initialised FLUX.1 pipelines built offline."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline

from tests._fixtures.flux import CallLog, build_pipe, prompt_inputs
from jit_sampler import (JiTConfig, JiTFluxImg2ImgPipeline, JiTFluxInpaintPipeline, JiTFluxPipeline, beta_sigmas,
                         enable_jit)
from jit_sampler.pipelines.flux_img2img import steps_after_strength

GRID = 8  # 128 x 128 images: an 8 x 8 token grid
N = GRID * GRID


@pytest.fixture(scope="module")
def bases():
    return {"img2img": build_pipe(FluxImg2ImgPipeline), "inpaint": build_pipe(FluxInpaintPipeline)}


@pytest.fixture(scope="module")
def pipes(bases):
    out = {"img2img": JiTFluxImg2ImgPipeline.from_pipe(bases["img2img"]),
           "inpaint": JiTFluxInpaintPipeline.from_pipe(bases["inpaint"])}
    for p in out.values():
        p.set_progress_bar_config(disable=True)
    return out


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def image(batch=1, seed=5):
    return torch.rand(batch, 3, 128, 128, generator=gen(seed))


def mask(batch=1):
    """White (repaint) square over pixels 32..95: tokens (2..5, 2..5) of the 8 x 8 grid, aligned to 2 x 2 patches."""
    m = torch.zeros(batch, 1, 128, 128)
    m[..., 32:96, 32:96] = 1.0
    return m


UNMASKED = torch.ones(GRID, GRID, dtype=torch.bool)
UNMASKED[2:6, 2:6] = False
UNMASKED = UNMASKED.flatten()


def inputs(kind, batch=1, **kw):
    extra = {"mask_image": mask()} if kind == "inpaint" else {}
    return dict(image=image(), height=128, width=128, output_type="latent", **extra, **prompt_inputs(batch), **kw)


KINDS = ["img2img", "inpaint"]


@pytest.mark.parametrize("kind", KINDS)
def test_jit_none_is_the_stock_pipeline(bases, pipes, kind):
    kw = inputs(kind, num_inference_steps=6, strength=0.7)
    a = bases[kind](generator=gen(), **kw).images
    b = pipes[kind](generator=gen(), jit=None, **kw).images
    assert torch.equal(a, b)
    assert pipes[kind].last_jit_report is None
    assert isinstance(pipes[kind], type(bases[kind])) and pipes[kind].transformer is bases[kind].transformer


def test_steps_after_strength_is_diffusers_get_timesteps(bases):
    """The cut of the schedule is diffusers' own: same t_start for every (steps, strength)."""
    p = bases["img2img"]
    for n in (4, 7, 11, 18, 28):
        for s in (0.0, 0.05, 0.3, 0.6, 0.75, 1.0):
            p.scheduler.set_timesteps(n, mu=0.5)
            ts, run = p.get_timesteps(n, s, "cpu")
            assert steps_after_strength(n, s) == (n - run, run) and len(ts) == run


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset, strength, steps, stages", [
    ("7x", 0.6, 11, (2, 2, 3)),    # 11 * 0.6 = 6.6 -> skip 4, run 7: ends int(7 * 0.4) = 2, int(7 * 0.65) = 4
    ("4x", 0.6, 18, (4, 3, 4)),    # skip 7, run 11
    ("7x", 1.0, 11, (4, 3, 4)),    # the full preset
    ("4x", 0.5, 20, (4, 2, 4)),    # explicit num_inference_steps=20: run 10
])
def test_stages_are_laid_out_over_the_steps_run(pipes, kind, preset, strength, steps, stages):
    pipe = pipes[kind]
    explicit = {} if steps == JiTConfig.preset(preset).total_steps else {"num_inference_steps": steps}
    with CallLog(pipe.transformer) as log:
        out = pipe(generator=gen(), jit=preset, **inputs(kind, strength=strength, **explicit)).images
    assert out.shape == (1, N, 16) and torch.isfinite(out).all()
    rep = pipe.last_jit_report
    counts = JiTConfig.preset(preset).token_counts(N)
    want = [m for m, k in zip(counts, stages) for _ in range(k)]
    assert [c["tokens"] for c in log.calls] == want == rep.active_tokens
    t_start = steps - sum(stages)
    full = beta_sigmas(steps, 1.4, 0.425)
    assert rep.sigmas == pytest.approx(full[t_start:], abs=0) and rep.steps == sum(stages)
    assert rep.config.total_steps == sum(stages) and rep.config.token_ratios == JiTConfig.preset(preset).token_ratios
    # The model sees the truncated schedule's noise levels (FLUX takes t = sigma).
    assert [c["t"] for c in log.calls] == pytest.approx(full[t_start:-1], abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_pipeline_schedule_is_the_stock_truncated_schedule(bases, pipes, kind):
    """sigma_schedule="pipeline": the JiT run visits exactly the stock pipeline's (shifted, cut) timesteps."""
    seen = {"stock": [], "jit": []}

    def record(name):
        def cb(p, i, t, kw):
            seen[name].append((i, float(t)))
            return {}
        return cb

    kw = inputs(kind, strength=0.6, num_inference_steps=12)
    bases[kind](generator=gen(), callback_on_step_end=record("stock"), **kw)
    pipes[kind](generator=gen(), jit=JiTConfig.preset("7x", sigma_schedule="pipeline"),
                callback_on_step_end=record("jit"), **kw)
    assert len(seen["stock"]) == 8 == len(seen["jit"])  # 12 * 0.6 = 7.2 -> skip 4
    assert [i for i, _ in seen["jit"]] == list(range(8))
    np.testing.assert_allclose([t for _, t in seen["jit"]], [t for _, t in seen["stock"]], rtol=1e-6)
    assert pipes[kind].last_jit_report.active_tokens[0] < N


@pytest.mark.parametrize("kind, cfg_scale", [("img2img", 1.0), ("img2img", 2.5), ("inpaint", 1.0), ("inpaint", 2.5)])
def test_dense_config_on_pipeline_schedule_matches_stock(bases, pipes, kind, cfg_scale):
    """One dense stage on the scheduler's sigmas is the stock Euler loop, including the inpainting blend."""
    kw = dict(inputs(kind, batch=2, strength=0.7, num_inference_steps=9, true_cfg_scale=cfg_scale),
              **prompt_inputs(batch=2, seed=3, prefix="negative_"))
    ref = bases[kind](generator=gen(), **kw).images
    got = pipes[kind](generator=gen(), jit=JiTConfig.dense(9, sigma_schedule="pipeline"), **kw).images
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    rep = pipes[kind].last_jit_report
    assert rep.steps == 7 and rep.model_calls == 7 * (2 if cfg_scale > 1 else 1)


@pytest.mark.parametrize("kind", KINDS)
def test_very_low_strength(pipes, kind):
    """7x at strength 0.2 keeps int-rounded 3 of 11 steps: the few-step layout runs them as 1 / 1 / 1
    (32 % / 60 % / 100 % of the tokens); a strength that leaves no step raises the stock error first."""
    pipe = pipes[kind]
    n = 8 * 8
    counts = JiTConfig.preset("7x").token_counts(n)
    with CallLog(pipe.transformer) as log:
        pipe(generator=gen(), jit="7x", **inputs(kind, strength=0.2))
        assert pipe.last_jit_report.steps == 3 and len(log.calls) == 3
        assert pipe.last_jit_report.active_tokens == counts
        # No step left at all: the stock error, before any model call.
        with pytest.raises(ValueError, match="strength parameter"):
            pipe(generator=gen(), jit="7x", **inputs(kind, strength=0.0))
    assert len(log.calls) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_seed_determinism_and_sensitivity(pipes, kind):
    kw = inputs(kind, strength=0.8)
    a = pipes[kind](generator=gen(3), jit="7x", **kw).images
    b = pipes[kind](generator=gen(3), jit="7x", **kw).images
    c = pipes[kind](generator=gen(4), jit="7x", **kw).images
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", ["shared", "per_sample"])
def test_batch_and_images_per_prompt(pipes, kind, policy):
    pipe = pipes[kind]
    cfg = JiTConfig.preset("7x", anchor_policy=policy)
    with CallLog(pipe.transformer) as log:
        out = pipe(generator=gen(), jit=cfg, num_images_per_prompt=2, **inputs(kind, batch=2, strength=0.8)).images
    assert out.shape == (4, N, 16) and torch.isfinite(out).all()
    rep = pipe.last_jit_report
    assert rep.steps == 9  # 11 * 0.8 = 8.8 -> skip 2
    sparse = sum(1 for m in rep.active_tokens if m < N)
    if policy == "shared":
        assert rep.model_calls == 9 and all(c["batch"] == 4 for c in log.calls)
    else:
        assert rep.model_calls == sparse * 4 + (9 - sparse)


@pytest.mark.parametrize("kind", KINDS)
def test_callback_sees_and_replaces_latents(pipes, kind):
    seen = []

    def cb(p, i, t, kw):
        seen.append((i, float(t), kw["latents"].clone()))
        return {"latents": kw["latents"] * 0} if i == 6 else {}

    out = pipes[kind](generator=gen(), jit="7x", callback_on_step_end=cb,
                      callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
                      **inputs(kind, strength=0.6)).images
    sig = pipes[kind].last_jit_report.sigmas
    assert [s[0] for s in seen] == list(range(7))
    assert [s[1] for s in seen] == pytest.approx([1000 * s for s in sig[:-1]], rel=1e-6)
    assert torch.count_nonzero(out) == 0


def _image_latents(pipe, img, seed=0):
    """The packed VAE latents of ``img`` as the pipeline draws them (the generator's first draw)."""
    with torch.no_grad():
        lat = pipe._encode_vae_image(pipe.image_processor.preprocess(img, height=128, width=128), generator=gen(seed))
    b, c, h, w = lat.shape
    return pipe._pack_latents(lat, b, c, h, w)


def test_inpaint_keeps_the_known_region(pipes):
    """After the last JiT step the unmasked tokens are exactly the image latents; the masked ones are repainted."""
    pipe = pipes["inpaint"]
    seen = []
    out = pipe(generator=gen(), jit="7x", callback_on_step_end=lambda p, i, t, kw: seen.append(kw["latents"]) or {},
               **inputs("inpaint", strength=0.9)).images
    ref = _image_latents(pipe, image())
    assert torch.equal(out[:, UNMASKED], ref[:, UNMASKED])
    assert (out[:, ~UNMASKED] - ref[:, ~UNMASKED]).abs().amax() > 1e-2
    # During the run the known region is the re-noised image: same noise, the next sigma.
    sig = pipe.last_jit_report.sigmas
    noise_est = (seen[0][:, UNMASKED] - (1 - sig[1]) * ref[:, UNMASKED]) / sig[1]
    for i in range(1, len(seen) - 1):
        want = sig[i + 1] * noise_est + (1 - sig[i + 1]) * ref[:, UNMASKED]
        torch.testing.assert_close(seen[i][:, UNMASKED], want, rtol=1e-4, atol=1e-5)
    # Plain img2img on the same image changes the unmasked region too.
    i2i = pipes["img2img"](generator=gen(), jit="7x", **inputs("img2img", strength=0.9)).images
    assert not torch.equal(i2i[:, UNMASKED], ref[:, UNMASKED])


def test_inpaint_padding_mask_crop_and_output_types(pipes):
    pipe = pipes["inpaint"]
    rgb = (image()[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    pil, pil_mask = PIL.Image.fromarray(rgb), PIL.Image.fromarray((mask()[0, 0].numpy() * 255).astype(np.uint8))
    kw = dict(height=128, width=128, strength=0.8, **prompt_inputs())
    out = pipe(generator=gen(), jit="7x", image=pil, mask_image=pil_mask, padding_mask_crop=8, **kw).images
    assert len(out) == 1 and out[0].size == (128, 128)
    arr = pipe(generator=gen(), jit="7x", image=pil, mask_image=pil_mask, output_type="np", **kw).images
    assert arr.shape == (1, 128, 128, 3) and np.isfinite(arr).all()
    (pt,) = pipes["img2img"](generator=gen(), jit="7x", image=image(), output_type="pt", return_dict=False, **kw)
    assert pt.shape == (1, 3, 128, 128)


def test_enable_jit_picks_the_right_class(bases):
    flux = build_pipe()
    for base, cls in ((bases["img2img"], JiTFluxImg2ImgPipeline), (bases["inpaint"], JiTFluxInpaintPipeline),
                      (flux, JiTFluxPipeline)):
        e = enable_jit(base, "7x")
        assert type(e) is cls and e.transformer is base.transformer and e._default_jit == JiTConfig.preset("7x")
        assert enable_jit(e, "4x") is e and e._default_jit == JiTConfig.preset("4x")
    # from_pipe across families: a text-to-image pipeline's components make an Img2Img one.
    p = JiTFluxImg2ImgPipeline.from_pipe(flux)
    p.set_progress_bar_config(disable=True)
    assert isinstance(p, FluxImg2ImgPipeline) and not isinstance(p, FluxPipeline)
    p(generator=gen(), jit="7x", **inputs("img2img", strength=0.8))
    assert p.last_jit_report.steps == 9


@pytest.mark.parametrize("kind", KINDS)
def test_bad_inputs_raise_before_any_model_call(pipes, kind):
    pipe = pipes[kind]
    img, msk = image(), mask()
    img0, msk0 = img.clone(), msk.clone()
    base = inputs(kind)
    base["image"] = img
    if kind == "inpaint":
        base["mask_image"] = msk
    with CallLog(pipe.transformer) as log:
        with pytest.raises(ValueError, match="strength"):
            pipe(generator=gen(), jit="7x", **{**base, "strength": 1.5})
        with pytest.raises(ValueError, match="strength"):
            pipe(generator=gen(), jit="7x", **{**base, "strength": float("nan")})
        with pytest.raises(TypeError, match="strength must be a number"):
            pipe(generator=gen(), jit="7x", **{**base, "strength": None})
        with pytest.raises(TypeError, match="num_inference_steps must be an int"):
            pipe(generator=gen(), jit="7x", num_inference_steps=10.5, **base)
        with pytest.raises(ValueError, match="`image` is required"):
            pipe(generator=gen(), jit="7x", **{**base, "image": None})
        with pytest.raises(ValueError, match="generators"):
            pipe(generator=[gen(), gen()], jit="7x", **base)
        if kind == "inpaint":
            with pytest.raises(ValueError, match="`mask_image` is required"):
                pipe(generator=gen(), jit="7x", **{**base, "mask_image": None})
            with pytest.raises(ValueError, match="masks cannot be repeated"):
                pipe(generator=gen(), jit="7x", num_images_per_prompt=2, **{**base, "mask_image": mask(3)})
        with pytest.raises(ValueError, match="unknown preset"):
            pipe(generator=gen(), jit="9x", **base)
    assert log.calls == []
    pipe(generator=gen(), jit="7x", **base)
    assert torch.equal(img, img0) and torch.equal(msk, msk0)


@pytest.mark.parametrize("kind", KINDS)
def test_anchor_attention_processor_option(pipes, kind):
    """``anchor_attention=True`` swaps in the fused processor for the call only; same result within float noise."""
    pipe = pipes[kind]
    before = dict(pipe.transformer.attn_processors)
    kw = inputs(kind, strength=0.8)
    plain = pipe(generator=gen(), jit="7x", **kw).images
    during = set()
    fused = pipe(generator=gen(), jit="7x", anchor_attention=True, **kw, callback_on_step_end=lambda p, i, t, k: (
        during.update(type(v).__name__ for v in p.transformer.attn_processors.values()) or {})).images
    assert during == {"AnchorAttnProcessor"}
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)
    assert {k: type(v) for k, v in pipe.transformer.attn_processors.items()} == \
        {k: type(v) for k, v in before.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_given_latents_as_in_diffusers(bases, pipes, kind):
    """``latents=``: Img2Img takes packed start latents as they are; Inpaint takes unpacked ones as both the
    start latent and the re-noising noise. Either way the dense JiT loop matches the stock call."""
    lat = torch.randn(1, N, 16, generator=gen(8))
    if kind == "inpaint":
        lat = bases[kind]._unpack_latents(lat, 128, 128, bases[kind].vae_scale_factor)
    lat0 = lat.clone()
    kw = inputs(kind, strength=0.5, num_inference_steps=8, latents=lat)
    ref = bases[kind](generator=gen(), **kw).images
    got = pipes[kind](generator=gen(), jit=JiTConfig.dense(8, sigma_schedule="pipeline"), **kw).images
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(lat, lat0)  # not modified
