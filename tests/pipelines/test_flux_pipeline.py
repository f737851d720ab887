"""JiTFluxPipeline on a tiny, randomly initialised FLUX.1 built offline inside a real FluxPipeline."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from tests._fixtures.flux import CallLog, NO_TEXT, build_pipe, prompt_inputs
from jit_sampler import JiTConfig, JiTFluxPipeline, enable_jit


@pytest.fixture(scope="module")
def base():
    return build_pipe()


@pytest.fixture(scope="module")
def pipe(base):
    p = JiTFluxPipeline.from_pipe(base)
    p.set_progress_bar_config(disable=True)
    return p


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_jit_none_is_flux_pipeline(base, pipe):
    kw = dict(height=64, width=96, num_inference_steps=3, output_type="latent", **prompt_inputs())
    a = base(generator=gen(), **kw).images
    b = pipe(generator=gen(), jit=None, **kw).images
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert pipe.last_jit_report is None
    assert isinstance(pipe, FluxPipeline) and pipe.transformer is base.transformer


def test_7x_runs_preset_token_counts(pipe):
    with CallLog(pipe.transformer) as log:
        out = pipe(generator=gen(), height=256, width=256, jit="7x", output_type="np", **prompt_inputs())
    img = out.images
    assert img.shape == (1, 256, 256, 3) and np.isfinite(img).all()
    rep = pipe.last_jit_report
    counts = JiTConfig.preset("7x").token_counts(256)
    assert [c["tokens"] for c in log.calls] == [counts[0]] * 4 + [counts[1]] * 3 + [256] * 4
    assert rep.model_calls == 11 and rep.active_tokens == [c["tokens"] for c in log.calls]
    # Each sparse call gets the img_ids rows of its own tokens: (0, row, col) of a 16 x 16 grid.
    ids = log.calls[0]["img_ids"]
    assert ids.shape == (counts[0], 3) and (ids[:, 0] == 0).all()
    assert set((ids[:, 1] * 16 + ids[:, 2]).long().tolist()) <= set(range(256))
    assert rep.flops["speedup_vs_same_steps"]["image_linear"] > 1.4
    assert set(rep.phase_times) >= {"encode", "sample", "decode", "total"}


def test_seed_determinism_and_sensitivity(pipe):
    kw = dict(height=128, width=128, jit="7x", output_type="latent", **prompt_inputs())
    a = pipe(generator=gen(3), **kw).images
    b = pipe(generator=gen(3), **kw).images
    c = pipe(generator=gen(4), **kw).images
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("policy", ["shared", "per_sample"])
def test_batch_and_images_per_prompt(pipe, policy):
    cfg = JiTConfig.preset("7x", anchor_policy=policy)
    with CallLog(pipe.transformer) as log:
        out = pipe(generator=gen(), height=128, width=128, jit=cfg, num_images_per_prompt=2, output_type="latent",
                   **prompt_inputs(batch=2))
    assert out.images.shape == (4, 64, 16) and torch.isfinite(out.images).all()
    rep = pipe.last_jit_report
    sparse = sum(1 for m in rep.active_tokens if m < 64)
    if policy == "shared":
        assert rep.model_calls == 11 and all(c["batch"] == 4 for c in log.calls)
    else:  # one forward per sample while the sets differ, one batched forward once dense
        assert rep.model_calls == sparse * 4 + (11 - sparse)
        first = [c["img_ids"] for c in log.calls[:4]]
        assert any(not torch.equal(first[0], f) for f in first[1:])


def test_per_sample_batch_matches_single_runs(pipe):
    """Per-sample anchors: sample b of a batch equals a batch-1 run given generator b's draws."""
    cfg = JiTConfig.preset("7x", anchor_policy="per_sample")
    pi = prompt_inputs(batch=2)
    kw = dict(height=128, width=128, jit=cfg, output_type="latent")
    both = pipe(generator=[gen(1), gen(2)], **kw, **pi).images
    one = pipe(generator=[gen(2)], **kw, prompt_embeds=pi["prompt_embeds"][1:],
               pooled_prompt_embeds=pi["pooled_prompt_embeds"][1:]).images
    torch.testing.assert_close(both[1:], one, rtol=1e-4, atol=1e-5)


def test_true_cfg_shares_anchor_set(pipe):
    neg = prompt_inputs(seed=7, prefix="negative_")
    with CallLog(pipe.transformer) as log:
        out = pipe(generator=gen(), height=128, width=128, jit="7x", true_cfg_scale=3.0, output_type="latent",
                   **prompt_inputs(), **neg)
    assert torch.isfinite(out.images).all()
    assert pipe.last_jit_report.model_calls == 22 and len(log.calls) == 22
    for cond, unc in zip(log.calls[0::2], log.calls[1::2]):
        assert torch.equal(cond["img_ids"], unc["img_ids"]) and not torch.equal(cond["enc"], unc["enc"])
    plain = pipe(generator=gen(), height=128, width=128, jit="7x", output_type="latent", **prompt_inputs()).images
    assert not torch.allclose(plain, out.images)


@pytest.mark.parametrize("hw", [(80, 48), (48, 112), (16, 16)])
def test_odd_and_non_square_sizes(pipe, hw):
    h, w = hw
    out = pipe(generator=gen(), height=h, width=w, jit="4x", output_type="pt", **prompt_inputs())
    assert out.images.shape == (1, 3, h, w) and torch.isfinite(out.images).all()
    rep = pipe.last_jit_report
    assert (rep.height, rep.width) == (h // 16, w // 16) and rep.active_tokens[-1] == (h // 16) * (w // 16)


def test_output_types_and_return_tuple(pipe):
    kw = dict(height=32, width=32, jit="7x", **prompt_inputs())
    pil = pipe(generator=gen(), output_type="pil", **kw).images[0]
    assert pil.size == (32, 32)
    arr = pipe(generator=gen(), output_type="np", **kw).images
    pt = pipe(generator=gen(), output_type="pt", **kw).images
    np.testing.assert_allclose(arr[0], pt[0].permute(1, 2, 0).numpy(), atol=1e-6)
    (lat,) = pipe(generator=gen(), output_type="latent", return_dict=False, **kw)
    assert lat.shape == (1, 4, 16)


def test_callback_progress_and_joint_attention_kwargs(pipe):
    seen = []

    def cb(p, i, t, kw):
        seen.append((i, float(t), tuple(kw["latents"].shape)))
        return {"latents": kw["latents"] * 0} if i == 10 else {}

    with CallLog(pipe.transformer) as log:
        out = pipe(generator=gen(), height=64, width=64, jit="7x", output_type="latent", callback_on_step_end=cb,
                   callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
                   joint_attention_kwargs={"scale": 0.5}, **prompt_inputs())
    assert [s[0] for s in seen] == list(range(11)) and seen[0][1] == pytest.approx(1000.0)
    assert torch.count_nonzero(out.images) == 0  # the callback's latents replaced the loop's
    assert all(c["jak"].get("scale") == 0.5 for c in log.calls)


def test_steps_override_and_pipeline_schedule(pipe):
    pipe(generator=gen(), height=64, width=64, jit="4x", num_inference_steps=10, output_type="latent",
         **prompt_inputs())
    assert pipe.last_jit_report.steps == 10
    cfg = JiTConfig.preset("7x", sigma_schedule="pipeline")
    pipe(generator=gen(), height=64, width=64, jit=cfg, output_type="latent", **prompt_inputs())
    sig = pipe.last_jit_report.sigmas
    assert len(sig) == 12 and sig[0] == pytest.approx(1.0) and sig[-1] == 0.0
    assert sig[1] != pytest.approx(0.9973, abs=1e-4)  # shifted linspace, not the Beta table


def test_enable_jit_defaults_and_validation(base):
    e = enable_jit(base, "7x")
    e.set_progress_bar_config(disable=True)
    assert isinstance(e, JiTFluxPipeline) and e.transformer is base.transformer
    e(generator=gen(), height=32, width=32, output_type="latent", **prompt_inputs())
    assert e.last_jit_report.steps == 11
    e(generator=gen(), height=32, width=32, jit=None, num_inference_steps=2, output_type="latent", **prompt_inputs())
    assert e.last_jit_report is None
    with pytest.raises(ValueError, match="unknown preset"):
        e(generator=gen(), height=32, width=32, jit="9x", **prompt_inputs())
    with pytest.raises(ValueError, match="prompt_embeds"):
        e(generator=gen(), height=32, width=32, jit="7x", prompt_embeds=torch.zeros(1, 6, 32))


def test_from_pretrained_offline(base, tmp_path):
    base.save_pretrained(tmp_path)
    # None components are not saved; diffusers wants them named again (as for FluxPipeline).
    p = JiTFluxPipeline.from_pretrained(tmp_path, **NO_TEXT)
    p.set_progress_bar_config(disable=True)
    assert isinstance(p, JiTFluxPipeline) and p.text_encoder is None
    a = p(generator=gen(), height=32, width=32, jit="7x", output_type="latent", **prompt_inputs()).images
    b = enable_jit(base, "7x")(generator=gen(), height=32, width=32, output_type="latent", **prompt_inputs()).images
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_dense_config_on_pipeline_schedule_matches_flux_pipeline(base, pipe, cfg_scale):
    """The JiT loop with one dense stage and the scheduler's sigmas is FluxPipeline's Euler loop."""
    kw = dict(height=64, width=80, output_type="latent", true_cfg_scale=cfg_scale, **prompt_inputs(batch=2),
              **prompt_inputs(batch=2, seed=3, prefix="negative_"))
    ref = base(generator=gen(), num_inference_steps=5, **kw).images
    got = pipe(generator=gen(), jit=JiTConfig.dense(5, sigma_schedule="pipeline"), **kw).images
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_cache_hook_composes_with_jit(pipe):
    """diffusers' First-Block Cache under JiT: the hook is reset at each stage transition, so no
    shape clash between token sets, and afterwards the pipeline runs without hooks again."""
    from diffusers.hooks import FirstBlockCacheConfig

    kw = dict(height=128, width=128, jit="7x", output_type="latent", **prompt_inputs())
    plain = pipe(generator=gen(), **kw).images
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    try:
        with CallLog(pipe.transformer) as log:
            cached = pipe(generator=gen(), **kw).images
    finally:
        pipe.transformer.disable_cache()
    assert torch.isfinite(cached).all() and len(log.calls) == 11
    assert not torch.equal(cached, plain)  # the hook did skip work
    assert pipe.last_jit_report.active_tokens == JiTConfig.preset("7x").token_counts(64)[:1] * 4 + \
        JiTConfig.preset("7x").token_counts(64)[1:2] * 3 + [64] * 4
    torch.testing.assert_close(pipe(generator=gen(), **kw).images, plain, rtol=0, atol=0)
