"""RAS (jit_sampler.ras, docs/ras.md): parity with a transcription of the published SD3 code, the schedule,
the K/V cache's full attention context, batches and CFG, FLUX.1 and SD3 pipelines, bad arguments."""

from __future__ import annotations

import pytest
import torch

from tests.sampler import _published_ras as published
from tests._fixtures.sd3 import build_pipe as build_sd3, prompt_inputs as sd3_inputs
from jit_sampler.ras import RASConfig, RASKVCache, ras_sample, skip_counts

SIZE = 128  # 8 x 8 tokens


def _sd3(cls=None, **kw):
    from jit_sampler.pipelines.sd3 import JiTStableDiffusion3Pipeline

    return build_sd3(cls or JiTStableDiffusion3Pipeline, **kw)


def _latents(batch=1, size=SIZE, seed=3):
    return torch.randn(batch, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(seed))


def _published_run(settings_kw, steps, size=SIZE, guidance=7.0, seed=3):
    pipe = install = build_sd3()
    settings = published.Settings(height=size, width=size, num_steps=steps, **settings_kw)
    published.install(pipe, settings)
    out = pipe(num_inference_steps=steps, height=size, width=size, guidance_scale=guidance,
               latents=_latents(1, size, seed), output_type="latent", **sd3_inputs()).images
    return out, settings


PARITY = [
    (dict(start=2, end=10, resets=(5,)), dict(scheduler_start_step=2, error_reset_steps=(5,)), 10, SIZE),
    (dict(start=3, end=9, resets=(6,), metric="l2norm", high_ratio=0.5, starvation_scale=1.0, sample_ratio=0.4),
     dict(scheduler_start_step=3, scheduler_end_step=9, error_reset_steps=(6,), metric="l2norm", high_ratio=0.5,
          starvation_scale=1.0, sample_ratio=0.4), 11, SIZE),
    (dict(start=2, end=12, resets=(7,), skip_num_step=32, skip_num_step_length=3),
     dict(scheduler_start_step=2, error_reset_steps=(7,), skip_num_step=32, skip_num_step_length=3), 12, 256),
]


@pytest.mark.parametrize("theirs, ours, steps, size", PARITY)
def test_parity_with_published_sd3(theirs, ours, steps, size):
    ref, settings = _published_run(theirs, steps, size)
    pipe = _sd3()
    cfg = RASConfig(num_steps=steps, **ours)
    out = pipe(ras=cfg, num_inference_steps=steps, height=size, width=size, guidance_scale=7.0,
               latents=_latents(1, size), output_type="latent", **sd3_inputs()).images
    rep = pipe.last_jit_report
    # one CFG-batched forward per step in both: the computed token counts per step are the published ones
    assert rep.active_tokens == [m for _, m in settings.log]
    assert rep.active_tokens == cfg.token_counts((size // 16) ** 2)
    assert any(rep.ras_steps) and not all(rep.ras_steps)
    assert (out - ref).abs().max().item() < 1e-5


def test_skip_counts_equal_published_lists():
    for kw, size in (({}, 1024), (dict(skip_num_step=256, skip_num_step_length=4), 1024),
                     (dict(skip_num_step=-128, skip_num_step_length=5, sample_ratio=0.3), 1024),
                     (dict(sample_ratio=0.37, error_reset_steps=(10, 20)), 768)):
        mine = RASConfig(**kw)
        theirs = published.Settings(height=size, width=size, num_steps=mine.num_steps, sample_ratio=mine.sample_ratio,
                                    start=mine.scheduler_start_step, end=mine.end_step, resets=mine.error_reset_steps,
                                    skip_num_step=mine.skip_num_step, skip_num_step_length=mine.skip_num_step_length)
        g = size // 16
        assert skip_counts(mine, g * g, (g, g)) == theirs.skip_list


def test_default_schedule_at_1024():
    cfg = RASConfig()
    counts = cfg.token_counts(4096)
    assert len(counts) == 30 and counts[:4] == [4096] * 4 and counts[12] == counts[22] == 4096
    assert counts[4:12] == [2048] * 8 and counts[23:] == [2048] * 7


def _dense_vs_sparse(velocity, x, n, idx, sigma=0.7, step=3):
    """Dense forward storing every layer's K/V, then a sparse forward on ``idx`` with the same input."""
    kv = RASKVCache(n)
    kv.refresh()
    dense = velocity(x, torch.arange(n), sigma, step, kv=kv)
    kv.sparse(idx)
    sparse = velocity(torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2])), idx, sigma, step, kv=kv)
    plain = velocity(torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2])), idx, sigma, step)
    want = torch.gather(dense, 1, idx.unsqueeze(-1).expand(-1, -1, dense.shape[2]))
    return sparse, plain, want, kv


def _idx(batch, n, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:m].sort().values for _ in range(batch)])


@pytest.mark.parametrize("qk_norm, dual", [(None, ()), ("rms_norm", (0,))])
def test_kv_cache_keeps_full_context_sd3(qk_norm, dual):
    """With unchanged inputs, a sparse step on cached K/V gives the dense rows: every computed token saw every token."""
    from jit_sampler.pipelines.ras_attention import use_ras_attention
    from jit_sampler.pipelines.sd3 import SD3Velocity

    pipe = build_sd3(qk_norm=qk_norm, dual_attention_layers=dual)
    e = sd3_inputs(batch=2)
    pe = torch.cat([e["negative_prompt_embeds"], e["prompt_embeds"]])
    pooled = torch.cat([e["negative_pooled_prompt_embeds"], e["pooled_prompt_embeds"]])
    vel = SD3Velocity(pipe.transformer, pe, pooled, (8, 8), guidance_scale=5.0, do_cfg=True)
    x = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(5))
    idx = _idx(2, 64, 24)
    with use_ras_attention(pipe.transformer):
        sparse, plain, want, kv = _dense_vs_sparse(vel, x, 64, idx)
    layers = 2 + len(dual)
    assert kv.layers_filled == 2 * layers  # k and v of every attention layer
    assert (sparse - want).abs().max().item() < 1e-5
    assert (plain - want).abs().max().item() > 1e-3  # without the cache the context is missing


def test_kv_cache_keeps_full_context_flux():
    from tests._fixtures.flux import build_pipe as build_flux, prompt_inputs as flux_inputs
    from jit_sampler.pipelines.ras_attention import use_ras_attention
    from jit_sampler.pipelines.ras_pipelines import FluxRASVelocity

    pipe = build_flux()
    e = flux_inputs(batch=2)
    n = flux_inputs(batch=2, seed=9)
    ids = torch.zeros(6, 3)
    img = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1).reshape(64, 2)
    img_ids = torch.cat([torch.zeros(64, 1), img], 1)
    vel = FluxRASVelocity(pipe.transformer, e["prompt_embeds"], e["pooled_prompt_embeds"], ids, img_ids,
                          guidance=torch.full((2,), 3.5),
                          negative=(n["prompt_embeds"], n["pooled_prompt_embeds"], ids), true_cfg_scale=2.0)
    x = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(5))
    idx = _idx(2, 64, 20)
    with use_ras_attention(pipe.transformer):
        sparse, plain, want, kv = _dense_vs_sparse(vel, x, 64, idx)
    assert kv.layers_filled == 2 * 2 * 2 * 2  # k, v x 2 layers x 2 samples x 2 CFG branches
    assert (sparse - want).abs().max().item() < 1e-5
    assert (plain - want).abs().max().item() > 1e-3


def _run_sd3(pipe, batch, cfg, seed_lat=3, **kw):
    return pipe(ras=cfg, height=SIZE, width=SIZE, latents=_latents(batch, seed=seed_lat), output_type="latent",
                **sd3_inputs(batch=batch), **kw).images


def test_sd3_batch_equals_single_runs_with_cfg():
    pipe = _sd3()
    cfg = RASConfig(num_steps=8, scheduler_start_step=2, error_reset_steps=(5,))
    both = _run_sd3(pipe, 2, cfg, guidance_scale=6.0)
    for b in range(2):
        e = {k: v[b:b + 1] for k, v in sd3_inputs(batch=2).items()}
        one = pipe(ras=cfg, height=SIZE, width=SIZE, latents=_latents(2)[b:b + 1], output_type="latent",
                   guidance_scale=6.0, **e).images
        assert (both[b:b + 1] - one).abs().max().item() < 1e-5


def test_flux_ras_batch_equals_single_runs_and_ras_none_is_stock():
    from tests._fixtures.flux import build_pipe as build_flux, prompt_inputs as flux_inputs
    from diffusers import FluxPipeline
    from jit_sampler.pipelines.ras_pipelines import RASFluxPipeline, enable_ras

    stock = build_flux()
    cfg = RASConfig(num_steps=7, scheduler_start_step=2, error_reset_steps=(4,))
    pipe = enable_ras(stock, cfg)
    assert isinstance(pipe, RASFluxPipeline) and type(stock) is FluxPipeline
    lat = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(4))
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=7, output_type="latent")
    e = flux_inputs(batch=2)
    a = stock(latents=lat, **kw, **e).images
    b = pipe(latents=lat, ras=None, **kw, **e).images
    assert torch.equal(a, b)
    dense = pipe(latents=lat, ras=cfg.replace(sample_ratio=1.0), **kw, **e).images  # RAS off: the stock Euler loop
    assert (dense - a).abs().max().item() < 1e-5
    both = pipe(latents=lat, **kw, **e).images
    rep = pipe.last_jit_report
    assert rep.active_tokens == cfg.token_counts(64) and rep.flops["speedup_vs_same_steps"]["total"] > 1
    assert (both - a).abs().max().item() > 1e-4
    for i in range(2):
        one = pipe(latents=lat[i:i + 1], **kw, **{k: v[i:i + 1] for k, v in e.items()}).images
        assert (both[i:i + 1] - one).abs().max().item() < 1e-5
    # the stock processors are back after the call
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    assert all(type(m.processor) is FluxAttnProcessor for m in stock.transformer.modules() if hasattr(m, "processor"))


def test_sd3_ras_none_and_jit_none_are_stock():
    from diffusers import StableDiffusion3Pipeline
    from jit_sampler.pipelines.ras_pipelines import enable_ras

    stock = build_sd3()
    pipe = enable_ras(stock, RASConfig(num_steps=6, scheduler_start_step=2, error_reset_steps=()))
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=6, output_type="latent", **sd3_inputs())
    a = stock(latents=_latents(), **kw).images
    assert torch.equal(a, pipe(latents=_latents(), ras=None, **kw).images)
    assert torch.equal(a, pipe(latents=_latents(), ras=None, jit=None, **kw).images)
    dense = pipe(latents=_latents(), ras=RASConfig(num_steps=6, sample_ratio=1.0, error_reset_steps=()), **kw).images
    assert (dense - a).abs().max().item() < 1e-5
    assert type(stock) is StableDiffusion3Pipeline


def test_concurrent_calls_share_a_transformer():
    """Two pipelines on one transformer, calls interleaved from two threads: each equals its solo run."""
    import threading

    pipe = _sd3()
    other = type(pipe).from_pipe(pipe)
    other.set_progress_bar_config(disable=True)
    cfg = RASConfig(num_steps=6, scheduler_start_step=2, error_reset_steps=())
    solo = [_run_sd3(pipe, 1, cfg, seed_lat=s, num_inference_steps=6) for s in (3, 4)]
    out = {}

    def go(p, s):
        out[s] = _run_sd3(p, 1, cfg, seed_lat=s, num_inference_steps=6)

    ts = [threading.Thread(target=go, args=(p, s)) for p, s in ((pipe, 3), (other, 4))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert (out[3] - solo[0]).abs().max().item() < 1e-6 and (out[4] - solo[1]).abs().max().item() < 1e-6


@pytest.mark.parametrize("kw, err", [
    (dict(sample_ratio=0.0), ValueError), (dict(sample_ratio=1.5), ValueError), (dict(sample_ratio="a"), TypeError),
    (dict(scheduler_start_step=0), ValueError), (dict(scheduler_end_step=4), ValueError),
    (dict(error_reset_steps=(30,)), ValueError), (dict(error_reset_steps=(5, 5)), ValueError),
    (dict(error_reset_steps="12"), TypeError), (dict(metric="max"), ValueError), (dict(high_ratio=1.1), ValueError),
    (dict(starvation_scale=float("nan")), ValueError), (dict(num_steps=0), ValueError),
    (dict(skip_num_step_length=-1), ValueError), (dict(kv_cache=1), TypeError), (dict(num_steps=2.0), TypeError),
])
def test_config_rejects_bad_values(kw, err):
    with pytest.raises(err):
        RASConfig(**kw)


def test_bad_arguments_raise_before_any_model_call():
    calls = []

    def spy(x, idx, sigma, step, kv=None):
        calls.append(step)
        return torch.zeros_like(x)

    cfg = RASConfig(num_steps=6, scheduler_start_step=2, error_reset_steps=())
    sig = [1 - i / 6 for i in range(7)]
    cases = [((torch.zeros(1, 63, 16), 8, 8, sig), ValueError), ((torch.zeros(1, 64, 16), 8, 8, sig[:-1]), ValueError),
             ((torch.zeros(1, 64, 6), 8, 8, sig), ValueError),
             ((torch.zeros(1, 64, 16, dtype=torch.long), 8, 8, sig), TypeError)]
    for args, err in cases:
        with pytest.raises(err):
            ras_sample(spy, *args, cfg)
    with pytest.raises(ValueError, match="drop counts"):  # 256 per step on a 64-token grid
        ras_sample(spy, torch.zeros(1, 64, 16), 8, 8, sig,
                   RASConfig(num_steps=6, scheduler_start_step=2, error_reset_steps=(), skip_num_step=512,
                             skip_num_step_length=2))
    with pytest.raises(TypeError):
        ras_sample(spy, torch.zeros(1, 64, 16), 8, 8, sig, "fast")
    assert calls == []
    # pipelines: a reset step the explicit step count does not have, and a mixed call, before the transformer runs
    pipe = _sd3()
    forwards = []
    pipe.transformer.register_forward_pre_hook(lambda *a: forwards.append(1))
    with pytest.raises(ValueError, match="error_reset_steps"):
        _run_sd3(pipe, 1, RASConfig(), num_inference_steps=10)
    with pytest.raises(ValueError, match="at least 2 steps"):  # RAS in JiT's final stage of one step
        _run_sd3(pipe, 1, RASConfig(), jit="7x", num_inference_steps=3)
    with pytest.raises(TypeError):
        _run_sd3(pipe, 1, "fast")
    with pytest.raises(NotImplementedError):
        _run_sd3(pipe, 1, RASConfig(num_steps=6, error_reset_steps=()), skip_guidance_layers=[0])
    assert forwards == []
    from jit_sampler.pipelines.ras_pipelines import enable_ras

    with pytest.raises(TypeError):
        enable_ras(object())


def test_sampler_counts_and_cache_use_on_a_plain_function():
    """Without a K/V cache, a 4-argument velocity works; dropped tokens reuse the selection step's velocity."""
    seen = []

    def vel(x, idx, sigma, step):
        seen.append((step, idx.shape[-1]))
        return x * (1 + step)

    cfg = RASConfig(num_steps=6, scheduler_start_step=2, error_reset_steps=(4,), kv_cache=False)
    x = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(1))
    y, rep = ras_sample(vel, x, 8, 8, [1 - i / 6 for i in range(7)], cfg)
    assert [m for _, m in seen] == cfg.token_counts(64) == rep.active_tokens == [64, 64, 32, 32, 64, 32]
    assert rep.model_calls == 6 and rep.ras_steps == [False, False, True, True, False, True]


def test_ras_inside_jit_final_stage_sd3():
    from jit_sampler import JiTConfig

    pipe = _sd3()
    kw = dict(height=SIZE, width=SIZE, latents=_latents(2), output_type="latent", **sd3_inputs(batch=2))
    def gen():
        return torch.Generator().manual_seed(7)

    jit_only = pipe(jit="7x", generator=gen(), **kw).images
    jit_tokens = pipe.last_jit_report.active_tokens
    same = pipe(jit="7x", ras=RASConfig(sample_ratio=1.0), generator=gen(), **kw).images
    assert torch.equal(same, jit_only)  # nothing dropped: JiT alone, bit for bit
    both = pipe(jit="7x", ras=RASConfig(), generator=gen(), **kw).images
    rep = pipe.last_jit_report
    last = JiTConfig.preset("7x").stage_steps[-1]
    assert rep.active_tokens == jit_tokens[:-last] + [64] + [32] * (last - 1)
    assert torch.isfinite(both).all() and (both - jit_only).abs().max().item() > 1e-4
    assert rep.flops["speedup_vs_same_steps"]["image_linear"] > 1.9


def test_ras_final_stage_wrapper_on_a_plain_function():
    """The wrapper passes JiT's sparse stages through and computes ratio * N tokens on the later final-stage steps."""
    from jit_sampler import JiTConfig, beta_sigmas, jit_sample
    from jit_sampler.ras import RASFinalStage

    seen = []

    def vel(x, idx, sigma, step):
        seen.append(idx.shape[-1])
        return torch.sin(x * (1 + step))

    cfg = JiTConfig.preset("4x")
    sig = beta_sigmas(cfg.total_steps)
    stage = RASFinalStage(vel, RASConfig(sample_ratio=0.25, kv_cache=False), cfg, sig, 8, 8)
    x = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(0))
    y, rep = jit_sample(stage, x, 8, 8, sig, cfg, torch.Generator().manual_seed(1))
    last = cfg.stage_steps[-1]
    assert seen == stage.active_tokens and stage.active_tokens[-last:] == [64] + [16] * (last - 1)
    assert rep.active_tokens[:-last] == stage.active_tokens[:-last] and torch.isfinite(y).all()
    with pytest.raises(TypeError):
        RASFinalStage(vel, {"sample_ratio": 0.5}, cfg, sig, 8, 8)


def test_ras_inside_jit_final_stage_flux():
    from tests._fixtures.flux import build_pipe as build_flux, prompt_inputs as flux_inputs
    from jit_sampler import JiTConfig
    from jit_sampler.pipelines.ras_pipelines import enable_ras

    pipe = enable_ras(build_flux(), None)
    lat = torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(4))
    kw = dict(height=SIZE, width=SIZE, latents=lat, output_type="latent", **flux_inputs(batch=2))

    def gen():
        return torch.Generator().manual_seed(7)

    jit_only = pipe(jit="4x", ras=None, generator=gen(), **kw).images
    jit_tokens = pipe.last_jit_report.active_tokens
    same = pipe(jit="4x", ras=RASConfig(sample_ratio=1.0), generator=gen(), **kw).images
    assert torch.equal(same, jit_only)
    seen = []
    both = pipe(jit="4x", ras=RASConfig(), generator=gen(),
                callback_on_step_end=lambda p, i, t, k: seen.append(i) or {}, **kw).images
    last = JiTConfig.preset("4x").stage_steps[-1]
    assert pipe.last_jit_report.active_tokens == jit_tokens[:-last] + [64] + [32] * (last - 1)
    assert seen == list(range(len(jit_tokens)))
    assert torch.isfinite(both).all() and (both - jit_only).abs().max().item() > 1e-4


def test_processors_restored_after_an_error_and_inputs_untouched():
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    pipe = _sd3()
    lat = _latents()
    keep = lat.clone()

    def boom(p, i, t, k):
        if i == 3:
            raise RuntimeError("stop")
        return {}

    with pytest.raises(RuntimeError, match="stop"):
        _run_sd3(pipe, 1, RASConfig(num_steps=6, scheduler_start_step=2, error_reset_steps=()), num_inference_steps=6,
                 callback_on_step_end=boom)
    assert all(type(b.attn.processor) is JointAttnProcessor2_0 for b in pipe.transformer.transformer_blocks)
    assert not hasattr(pipe.transformer, "_ras_attention_installed")
    e = sd3_inputs()
    copies = {k: v.clone() for k, v in e.items()}
    pipe(ras=RASConfig(num_steps=6, scheduler_start_step=2, error_reset_steps=()), num_inference_steps=6, height=SIZE,
         width=SIZE, latents=lat, output_type="latent", **e)
    assert torch.equal(lat, keep) and all(torch.equal(e[k], copies[k]) for k in e)
