"""JiT on Stable Diffusion 3 / 3.5 (jit_sampler.pipelines.sd3): enable_jit, stock parity, the active tokens."""

from __future__ import annotations

import pytest
import torch

from tests._fixtures.sd3 import build_pipe, prompt_inputs
from jit_sampler import JiTConfig, enable_jit

SIZE = 128


def _lat(batch=1, seed=3):
    return torch.randn(batch, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


def test_enable_jit_picks_the_sd3_class_and_jit_none_is_stock():
    from diffusers import StableDiffusion3Pipeline
    from jit_sampler.pipelines.sd3 import JiTStableDiffusion3Pipeline

    stock = build_pipe()
    pipe = enable_jit(stock, "4x")
    assert type(pipe) is JiTStableDiffusion3Pipeline and type(stock) is StableDiffusion3Pipeline
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=5, output_type="latent", **prompt_inputs(batch=2))
    a = stock(latents=_lat(2), **kw).images
    assert torch.equal(a, pipe(latents=_lat(2), jit=None, **kw).images)


@pytest.mark.parametrize("qk_norm, dual", [(None, ()), ("rms_norm", (0,))])
def test_dense_jit_equals_stock(qk_norm, dual):
    """One dense stage on the pipeline's schedule: the packed-token loop and SD3Velocity reproduce the stock loop."""
    stock = build_pipe(qk_norm=qk_norm, dual_attention_layers=dual)
    pipe = enable_jit(stock, None)
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=6, output_type="latent", guidance_scale=4.0,
              **prompt_inputs(batch=2))
    a = stock(latents=_lat(2), **kw).images
    b = pipe(latents=_lat(2), jit=JiTConfig.dense(6, sigma_schedule="pipeline"), **kw).images
    assert (a - b).abs().max().item() < 1e-5


@pytest.mark.parametrize("preset", ["4x", "7x"])
def test_jit_presets_run_on_sd3_with_their_token_counts(preset):
    pipe = enable_jit(build_pipe(), preset)
    calls = []
    pipe.transformer.pos_embed.register_forward_hook(lambda m, a, o: calls.append(o.shape[0]))
    out = pipe(height=SIZE, width=SIZE, latents=_lat(2), output_type="latent", **prompt_inputs(batch=2)).images
    rep = pipe.last_jit_report
    cfg = JiTConfig.preset(preset)
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()
    assert rep.active_tokens[0] < 64 and rep.active_tokens[-1] == 64 and len(rep.active_tokens) == cfg.total_steps
    assert calls == [4] * cfg.total_steps  # one CFG-batched forward per step (2 images x 2 branches)
    assert rep.flops["speedup_vs_same_steps"]["image_linear"] > 1.5


def test_sparse_velocity_is_the_model_on_the_active_tokens():
    """Packing round-trips; a dense index list through the sparse path is the dense forward; an active token
    carries its own position embedding (the same values at another position give another output)."""
    from jit_sampler.pipelines.sd3 import SD3Velocity, pack_latents, unpack_latents

    pipe = build_pipe()
    lat = _lat(2)
    assert torch.equal(unpack_latents(pack_latents(lat, 2), 8, 8, 2), lat)
    e = prompt_inputs(batch=2, negative=False)
    vel = SD3Velocity(pipe.transformer, e["prompt_embeds"], e["pooled_prompt_embeds"], (8, 8))
    x = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(0))
    full = vel(x, torch.arange(64), 0.5, 0)
    idx = torch.arange(64)
    assert torch.allclose(vel(x, idx.clone(), 0.5, 0), full)
    sub = torch.tensor([3, 10, 40])
    v1 = vel(x[:, sub], sub, 0.5, 0)
    v2 = vel(x[:, sub], torch.tensor([4, 10, 40]), 0.5, 0)
    assert (v1[:, 0] - v2[:, 0]).abs().max().item() > 1e-4 and v1.shape == (2, 3, 16)


def test_per_sample_anchors_and_refused_options():
    pipe = enable_jit(build_pipe(), None)
    kw = dict(height=SIZE, width=SIZE, output_type="latent", **prompt_inputs(batch=2))
    out = pipe(jit=JiTConfig.preset("4x", anchor_policy="per_sample"), latents=_lat(2),
               generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.isfinite(out).all()
    forwards = []
    pipe.transformer.register_forward_pre_hook(lambda *a: forwards.append(1))
    with pytest.raises(NotImplementedError, match="token_bucket"):
        pipe(jit=JiTConfig.preset("4x", token_bucket=64), latents=_lat(2), **kw)
    with pytest.raises(NotImplementedError, match="skip_guidance_layers"):
        pipe(jit="4x", latents=_lat(2), skip_guidance_layers=[0], **kw)
    assert forwards == []
