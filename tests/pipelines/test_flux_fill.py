"""JiTFluxFillPipeline on a tiny, randomly initialised FLUX.1 Fill pipeline built offline (288 = 16 + 16 + 256 inputs)."""

import pytest
import torch
from diffusers import FluxFillPipeline

from tests._fixtures.flux import CallLog, build_pipe, prompt_inputs, stock_pipe
from jit_sampler import FluxVelocity, JiTConfig, JiTFluxFillPipeline, enable_jit

GRID = 8
N = GRID * GRID
LAT = 16   # 4 latent channels packed 2 x 2
COND = 16 + 256  # masked-image latents + the 8 x 8 pixel mask of each latent pixel, packed 2 x 2


@pytest.fixture(scope="module")
def base():
    return build_pipe(FluxFillPipeline)


@pytest.fixture(scope="module")
def pipe(base):
    p = JiTFluxFillPipeline.from_pipe(base)
    p.set_progress_bar_config(disable=True)
    return p


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def mask(batch=1):
    m = torch.zeros(batch, 1, 128, 128)
    m[..., 40:100, 16:80] = 1.0
    return m


def inputs(batch=1, **kw):
    return dict(image=torch.rand(1, 3, 128, 128, generator=gen(5)), mask_image=mask(), height=128, width=128,
                output_type="latent", **prompt_inputs(batch), **kw)


def test_jit_none_is_flux_fill_pipeline(base, pipe):
    kw = inputs(num_inference_steps=4)
    assert torch.equal(base(generator=gen(), **kw).images, pipe(generator=gen(), jit=None, **kw).images)
    assert pipe.last_jit_report is None and isinstance(pipe, FluxFillPipeline)


def test_condition_follows_the_active_tokens(pipe):
    """Every call gets [latent | masked image | mask] for exactly its active tokens, in their order."""
    with CallLog(pipe.transformer) as log:
        out = pipe(generator=gen(), jit="7x", **inputs()).images
    assert out.shape == (1, N, LAT) and torch.isfinite(out).all()
    counts = JiTConfig.preset("7x").token_counts(N)
    assert [c["x"].shape[1] for c in log.calls] == [counts[0]] * 4 + [counts[1]] * 3 + [N] * 4
    assert pipe.last_jit_report.active_tokens == [c["x"].shape[1] for c in log.calls]
    assert all(c["x"].shape[2] == LAT + COND for c in log.calls)
    full = log.calls[-1]["x"][0, :, LAT:]  # the dense stage: the whole condition, in grid order
    assert full[:, LAT:].sum() > 0 and (full[:, LAT:] == 0).any()  # the mask is neither empty nor full
    for c in log.calls[:7]:
        rows = (c["img_ids"][:, 1] * GRID + c["img_ids"][:, 2]).long()
        assert torch.equal(c["x"][0, :, LAT:], full[rows])
    # The condition is constant over the run (only the latent part moves).
    assert torch.equal(log.calls[-2]["x"][0, :, LAT:], full)


def test_dense_config_on_pipeline_schedule_matches_stock(base, pipe):
    kw = inputs(batch=2, num_inference_steps=6)
    ref = base(generator=gen(), **kw).images
    got = pipe(generator=gen(), jit=JiTConfig.dense(6, sigma_schedule="pipeline"), **kw).images
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    ref = base(generator=gen(), strength=0.7, **kw).images  # a start from the noised image
    got = pipe(generator=gen(), jit=JiTConfig.dense(6, sigma_schedule="pipeline"), strength=0.7, **kw).images
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert pipe.last_jit_report.steps == 5  # 6 * 0.7 = 4.2 -> skip 1


def test_strength_cuts_the_schedule(pipe):
    with CallLog(pipe.transformer) as log:
        pipe(generator=gen(), jit="4x", strength=0.6, **inputs())
    counts = JiTConfig.preset("4x").token_counts(N)
    assert [c["x"].shape[1] for c in log.calls] == [counts[0]] * 4 + [counts[1]] * 3 + [N] * 4


def test_seed_determinism_batch_and_callback(pipe):
    a = pipe(generator=gen(3), jit="7x", **inputs()).images
    b = pipe(generator=gen(3), jit="7x", **inputs()).images
    c = pipe(generator=gen(4), jit="7x", **inputs()).images
    assert torch.equal(a, b) and not torch.equal(a, c)
    seen = []
    out = pipe(generator=gen(), jit="7x", num_images_per_prompt=2,
               callback_on_step_end=lambda p, i, t, kw: seen.append((i, kw["latents"].shape)) or {},
               **inputs(batch=2)).images
    assert out.shape == (4, N, LAT) and seen == [(i, (4, N, LAT)) for i in range(11)]


def test_per_sample_anchors_match_single_runs(pipe):
    """Per-sample sets: each sample's condition rows are gathered with its own indices."""
    cfg = JiTConfig.preset("7x", anchor_policy="per_sample")
    pi = prompt_inputs(batch=2)
    img = torch.rand(2, 3, 128, 128, generator=gen(5))  # one image per sample: the VAE draws use its generator
    kw = dict(mask_image=mask(), height=128, width=128, output_type="latent", jit=cfg)
    both = pipe(generator=[gen(1), gen(2)], image=img, **kw, **pi).images
    one = pipe(generator=[gen(2)], image=img[1:], **kw, prompt_embeds=pi["prompt_embeds"][1:],
               pooled_prompt_embeds=pi["pooled_prompt_embeds"][1:]).images
    torch.testing.assert_close(both[1:], one, rtol=1e-4, atol=1e-5)


def test_masked_image_latents_path(pipe):
    """A precomputed condition (no image) with given latents equals the run that builds it from image + mask."""
    cfg = JiTConfig.dense(5, sigma_schedule="pipeline")  # no random draws: the runs see the same numbers
    lat = torch.randn(1, N, LAT, generator=gen(9))
    with CallLog(pipe.transformer) as log:
        a = pipe(generator=gen(), jit=cfg, latents=lat, **inputs()).images
    cond = log.calls[0]["x"][:, :, LAT:]
    kw = inputs()
    del kw["image"], kw["mask_image"]
    b = pipe(generator=gen(), jit=cfg, latents=lat, masked_image_latents=cond, **kw).images
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="masked_image_latents must be packed"):
        pipe(generator=gen(), jit=cfg, latents=lat, masked_image_latents=cond[:, :, :-1], **kw)
    with pytest.raises(ValueError, match="`image` is required"):
        pipe(generator=gen(), jit=cfg, masked_image_latents=cond, **kw)


def test_enable_jit_and_bad_inputs(base, pipe):
    e = enable_jit(base, "7x")
    assert type(e) is JiTFluxFillPipeline and e.transformer is base.transformer
    img, msk = torch.rand(1, 3, 128, 128, generator=gen(5)), mask()
    img0, msk0 = img.clone(), msk.clone()
    kw = dict(inputs(), image=img, mask_image=msk)
    with CallLog(pipe.transformer) as log:
        with pytest.raises(ValueError, match="mask_image"):
            pipe(generator=gen(), jit="7x", **{**kw, "mask_image": None})
        with pytest.raises(ValueError, match="strength"):
            pipe(generator=gen(), jit="7x", **{**kw, "strength": -0.1})
        with pytest.raises(ValueError, match="cannot be repeated"):
            pipe(generator=gen(), jit="7x", num_images_per_prompt=2, **{**kw, "mask_image": mask(3)})
        with pytest.raises(ValueError, match="either"):
            pipe(generator=gen(), jit="7x", masked_image_latents=torch.zeros(1, N, COND), **kw)
        # A FluxFillPipeline around a plain 16-channel FLUX.1 transformer is not a Fill model.
        plain = stock_pipe(pipe, JiTFluxFillPipeline, transformer=build_pipe().transformer)
        with pytest.raises(ValueError, match="FLUX Fill transformer"):
            plain(generator=gen(), jit="7x", **kw)
    assert log.calls == []
    pipe(generator=gen(), jit="7x", **kw)
    assert torch.equal(img, img0) and torch.equal(msk, msk0)


def test_flux_velocity_cond_tokens_validation(pipe):
    ids = torch.zeros(N, 3)
    with pytest.raises(ValueError, match="cond_tokens must be"):
        FluxVelocity(pipe.transformer, None, None, None, ids, cond_tokens=torch.zeros(1, N - 1, COND))
    v = FluxVelocity(pipe.transformer, None, None, None, ids, cond_tokens=torch.zeros(2, N, COND))
    with pytest.raises(ValueError, match="cond_tokens has batch 2"):
        v(torch.zeros(1, N, LAT), torch.arange(N), 1.0, 0)
