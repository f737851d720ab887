"""JiTFluxControlNetPipeline: tiny random FLUX.1 + FluxControlNetModel, built offline in a FluxControlNetPipeline."""

import contextlib
import inspect

import numpy as np
import pytest
import torch
from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxPipeline
from diffusers.models.controlnets.controlnet_flux import FluxMultiControlNetModel
from diffusers.pipelines.flux.pipeline_flux_controlnet import retrieve_latents

from tests._fixtures.flux import build_pipe, prompt_inputs, stock_pipe
from jit_sampler import JiTConfig, JiTFluxControlNetPipeline, JiTFluxPipeline, enable_jit


def make_controlnet(transformer, seed: int, num_mode=None):
    """A 1 + 1 block ControlNet from the transformer, with its zero-initialised output layers randomised
    (a fresh ControlNet's residuals are exactly zero, which would make every test below vacuous)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cn = FluxControlNetModel.from_transformer(transformer, num_layers=1, num_single_layers=1,
                                                  attention_head_dim=16, num_attention_heads=2)
        if num_mode is not None:  # a union ControlNet: the same layers plus a control-mode embedding
            state = cn.state_dict()
            params = inspect.signature(FluxControlNetModel.__init__).parameters  # the config may carry
            cn = FluxControlNetModel(**{**{k: v for k, v in cn.config.items() if k in params},  # transformer keys
                                        "num_mode": num_mode})
            assert cn.union
            cn.load_state_dict(state, strict=False)
        for m in [*cn.controlnet_blocks, *cn.controlnet_single_blocks, cn.controlnet_x_embedder]:
            torch.nn.init.normal_(m.weight, std=0.05)
            torch.nn.init.normal_(m.bias, std=0.05)
    return cn.eval()


def make_xlabs_controlnet(seed: int, patch_size: int = 2):
    """An XLabs-style ControlNet: double blocks only and an ``input_hint_block`` that encodes the pixel image
    (8x down, then ``patch_size`` patches), its zero-initialised layers randomised."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cn = FluxControlNetModel(patch_size=patch_size, in_channels=16, num_layers=1, num_single_layers=0,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                 pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=[4, 6, 6],
                                 conditioning_embedding_channels=16 // patch_size ** 2)
        for m in [*cn.controlnet_blocks, cn.input_hint_block.conv_out]:
            torch.nn.init.normal_(m.weight, std=0.05)
            torch.nn.init.normal_(m.bias, std=0.05)
    return cn.eval()


def stock_controlnet_pipe(base, controlnet):
    return stock_pipe(base, FluxControlNetPipeline, controlnet=controlnet)


@pytest.fixture(scope="module")
def base():
    return build_pipe()


@pytest.fixture(scope="module")
def stock(base):
    return stock_controlnet_pipe(base, make_controlnet(base.transformer, seed=5))


@pytest.fixture(scope="module")
def pipe(stock):
    p = JiTFluxControlNetPipeline.from_pipe(stock)
    p.set_progress_bar_config(disable=True)
    return p


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def control(batch=1, size=(128, 128), seed=9):
    return torch.rand(batch, 3, *size, generator=gen(seed)) * 2 - 1


class Calls:
    """Forward pre-hooks recording what each module was called with (no change to the modules' code)."""

    def __init__(self, **modules):
        self.modules, self.log, self.handles = modules, {k: [] for k in modules}, []

    def __enter__(self):
        for name, mod in self.modules.items():
            def hook(m, args, kwargs, name=name):
                self.log[name].append({"args": args, **kwargs})
            self.handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def test_jit_none_is_stock(stock, pipe):
    kw = dict(height=64, width=96, num_inference_steps=3, output_type="latent", control_image=control(size=(64, 96)),
              controlnet_conditioning_scale=0.8, control_guidance_end=0.7, **prompt_inputs())
    a = stock(generator=gen(), **kw).images
    b = pipe(generator=gen(), jit=None, **kw).images
    assert torch.equal(a, b)
    assert pipe.last_jit_report is None
    assert isinstance(pipe, FluxControlNetPipeline) and pipe.controlnet is stock.controlnet


def test_controlnet_and_transformer_share_active_tokens(pipe):
    """Every step: the ControlNet gets the transformer's token count and img_ids rows, the control latents
    of exactly those tokens, and returns residuals with one row per active image token."""
    img = control()
    with Calls(tr=pipe.transformer, cn=pipe.controlnet) as c:
        out = pipe(generator=gen(), jit="7x", control_image=img, output_type="latent", **prompt_inputs())
    counts = JiTConfig.preset("7x").token_counts(64)
    expected = [counts[0]] * 4 + [counts[1]] * 3 + [64] * 4
    tr, cn = c.log["tr"], c.log["cn"]
    assert [k["hidden_states"].shape[1] for k in tr] == expected
    assert [k["hidden_states"].shape[1] for k in cn] == expected
    full = cn[-1]["controlnet_cond"]  # the dense stage sees every control token in grid order
    assert full.shape == (1, 64, 16)
    for t, k in zip(tr, cn):
        assert torch.equal(t["img_ids"], k["img_ids"]) and torch.equal(t["hidden_states"], k["hidden_states"])
        idx = (k["img_ids"][:, 1] * 8 + k["img_ids"][:, 2]).long()
        assert torch.equal(k["controlnet_cond"], full[:, idx])
        m = t["hidden_states"].shape[1]
        shapes = {tuple(r.shape) for r in [*t["controlnet_block_samples"], *t["controlnet_single_block_samples"]]}
        assert shapes == {(1, m, 32)}
    rep = pipe.last_jit_report
    assert rep.active_tokens == expected and torch.isfinite(out.images).all()
    assert rep.flops["controlnet"]["calls"] == 11 and rep.flops["controlnet"]["tokens"] == expected
    assert rep.flops["controlnet"]["summary"]["speedup_vs_same_steps"]["image_linear"] > 1.4


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_dense_config_on_pipeline_schedule_matches_stock(stock, pipe, cfg_scale):
    """One dense stage on the scheduler's sigmas is the stock ControlNet loop, including the scale and the
    control_guidance window (steps 0 and 4 of 5 run without the ControlNet) and true CFG."""
    kw = dict(height=64, width=80, output_type="latent", true_cfg_scale=cfg_scale, control_image=control(size=(64, 80)),
              controlnet_conditioning_scale=0.7, control_guidance_start=0.2, control_guidance_end=0.8,
              **prompt_inputs(batch=2), **prompt_inputs(batch=2, seed=3, prefix="negative_"))
    ref = stock(generator=gen(), num_inference_steps=5, **kw).images
    with Calls(tr=pipe.transformer, cn=pipe.controlnet) as c:
        got = pipe(generator=gen(), jit=JiTConfig.dense(5, sigma_schedule="pipeline"), **kw).images
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert len(c.log["cn"]) == 3 and len(c.log["tr"]) == 5 * (2 if cfg_scale > 1 else 1)
    # Without the window the result changes: the schedule really is applied.
    full = pipe(generator=gen(), jit=JiTConfig.dense(5, sigma_schedule="pipeline"),
                **{**kw, "control_guidance_start": 0.0, "control_guidance_end": 1.0}).images
    assert not torch.allclose(full, got)


@pytest.mark.parametrize("tr_guidance, cn_guidance", [(False, True), (True, False)])
def test_guidance_follows_each_models_own_embedding(tr_guidance, cn_guidance):
    """The transformer and the ControlNet each get the distilled guidance input only when their own config
    embeds it (as stock), also when the two differ; the dense run matches the stock loop."""
    tr_base = build_pipe(guidance_embeds=tr_guidance)
    stock = stock_controlnet_pipe(tr_base,
                                  make_controlnet(build_pipe(guidance_embeds=cn_guidance).transformer, seed=5))
    p = JiTFluxControlNetPipeline.from_pipe(stock)
    p.set_progress_bar_config(disable=True)
    kw = dict(height=64, width=64, output_type="latent", guidance_scale=3.5, control_image=control(size=(64, 64)),
              **prompt_inputs(batch=2))
    ref = stock(generator=gen(), num_inference_steps=3, **kw).images
    with Calls(tr=p.transformer, cn=p.controlnet) as c:
        got = p(generator=gen(), jit=JiTConfig.dense(3, sigma_schedule="pipeline"), **kw).images
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    for name, on in (("tr", tr_guidance), ("cn", cn_guidance)):
        seen = [k["guidance"] for k in c.log[name]]
        assert len(seen) == 3
        if on:
            assert all(torch.equal(g, torch.full((2,), 3.5)) for g in seen)
        else:
            assert all(g is None for g in seen)


def test_scale_zero_is_plain_jit_flux(base, pipe):
    """controlnet_conditioning_scale=0: no ControlNet call and exactly JiTFluxPipeline's run, given the
    generator advanced by the control image's VAE sample (which the ControlNet pipeline draws first)."""
    img = control()
    with Calls(cn=pipe.controlnet) as c:
        got = pipe(generator=gen(4), jit="7x", control_image=img, controlnet_conditioning_scale=0.0,
                   output_type="latent", **prompt_inputs()).images
    assert c.log["cn"] == []
    g = gen(4)
    retrieve_latents(base.vae.encode(img), generator=g)
    flux = JiTFluxPipeline.from_pipe(base)
    flux.set_progress_bar_config(disable=True)
    ref = flux(generator=g, jit="7x", height=128, width=128, guidance_scale=7.0,  # the ControlNet pipeline's default
               output_type="latent", **prompt_inputs()).images
    assert torch.equal(got, ref)
    with_control = pipe(generator=gen(4), jit="7x", control_image=img, output_type="latent", **prompt_inputs()).images
    assert not torch.allclose(with_control, got, atol=1e-3)


def test_seed_and_control_determinism(pipe):
    kw = dict(jit="7x", output_type="latent", **prompt_inputs())
    img = control()
    before = img.clone()
    a = pipe(generator=gen(3), control_image=img, **kw).images
    b = pipe(generator=gen(3), control_image=img, **kw).images
    c = pipe(generator=gen(4), control_image=img, **kw).images
    d = pipe(generator=gen(3), control_image=control(seed=10), **kw).images
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.allclose(a, d, atol=1e-3)
    assert torch.equal(img, before)  # the caller's control image is not changed


@pytest.mark.parametrize("policy", ["shared", "per_sample"])
def test_batch_images_per_prompt_and_control_batch(pipe, policy):
    cfg = JiTConfig.preset("7x", anchor_policy=policy)
    with Calls(tr=pipe.transformer, cn=pipe.controlnet, vae=pipe.vae.encoder) as c:
        out = pipe(generator=gen(), jit=cfg, control_image=control(batch=2), num_images_per_prompt=2,
                   output_type="latent", **prompt_inputs(batch=2))
    assert out.images.shape == (4, 64, 16) and torch.isfinite(out.images).all()
    tr, cn = c.log["tr"], c.log["cn"]
    assert len(tr) == len(cn) == pipe.last_jit_report.model_calls
    for t, k in zip(tr, cn):
        assert t["hidden_states"].shape == k["hidden_states"].shape and torch.equal(t["img_ids"], k["img_ids"])
        assert k["controlnet_cond"].shape[:2] == k["hidden_states"].shape[:2]
    if policy == "per_sample":  # one forward per sample while the sets differ
        assert any(k["hidden_states"].shape[0] == 1 for k in cn)
    # Each call's control rows are those of its own samples' active tokens (read back from their img_ids).
    full, single = cn[-1]["controlnet_cond"], 0
    assert full.shape == (4, 64, 16)
    for k in cn:
        rows = list(range(4)) if k["hidden_states"].shape[0] == 4 else [single % 4]
        single += len(rows) == 1
        idx = (k["img_ids"][:, 1] * 8 + k["img_ids"][:, 2]).long()
        assert torch.equal(k["controlnet_cond"], full[rows][:, idx])
    # Control image b serves prompt b (num_images_per_prompt rows each): rows 0, 1 encode one control image.
    (pixels,) = c.log["vae"][0]["args"]
    assert pixels.shape == (4, 3, 128, 128)
    assert torch.equal(pixels[0], pixels[1]) and not torch.equal(pixels[1], pixels[2])


def test_true_cfg_runs_controlnet_once_per_step(pipe):
    neg = prompt_inputs(seed=7, prefix="negative_")
    with Calls(tr=pipe.transformer, cn=pipe.controlnet) as c:
        pipe(generator=gen(), jit="7x", control_image=control(), true_cfg_scale=3.0, output_type="latent",
             **prompt_inputs(), **neg)
    tr, cn = c.log["tr"], c.log["cn"]
    assert len(cn) == 11 and len(tr) == 22
    for k, pos, negc in zip(cn, tr[0::2], tr[1::2]):
        assert torch.equal(k["encoder_hidden_states"], pos["encoder_hidden_states"])
        # Both branches get the very same residuals, as in the stock pipeline.
        assert pos["controlnet_block_samples"] is negc["controlnet_block_samples"]
        assert pos["controlnet_single_block_samples"] is negc["controlnet_single_block_samples"]


def test_union_control_mode(base):
    cn = make_controlnet(base.transformer, seed=6, num_mode=3)
    p = JiTFluxControlNetPipeline.from_pipe(stock_controlnet_pipe(base, cn))
    p.set_progress_bar_config(disable=True)
    kw = dict(jit="7x", control_image=control(), output_type="latent", **prompt_inputs())
    with Calls(cn=cn) as c:
        a = p(generator=gen(), control_mode=0, **kw).images
    assert all(k["controlnet_mode"].tolist() == [[0]] for k in c.log["cn"])
    b = p(generator=gen(), control_mode=2, **kw).images
    assert not torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="union ControlNet needs a control mode"):
        p(generator=gen(), **kw)
    with pytest.raises(ValueError, match="union ControlNet needs a control mode"):
        p(generator=gen(), control_mode=3, **kw)
    with pytest.raises(TypeError, match="control_mode"):
        p(generator=gen(), control_mode="canny", **kw)


def test_multi_controlnet_matches_stock_and_shares_tokens(base):
    nets = FluxMultiControlNetModel([make_controlnet(base.transformer, seed=11),
                                     make_controlnet(base.transformer, seed=12)])
    stock = stock_controlnet_pipe(base, nets)
    p = JiTFluxControlNetPipeline.from_pipe(stock)
    p.set_progress_bar_config(disable=True)
    kw = dict(control_image=[control(), control(seed=13)], controlnet_conditioning_scale=[0.6, 1.2],
              control_guidance_end=[1.0, 0.5], output_type="latent", **prompt_inputs())
    ref = stock(generator=gen(), num_inference_steps=4, **kw).images
    got = p(generator=gen(), jit=JiTConfig.dense(4, sigma_schedule="pipeline"), **kw).images
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    with Calls(tr=base.transformer, a=nets.nets[0], b=nets.nets[1]) as c:
        p(generator=gen(), jit="7x", **kw)
    tokens = [k["hidden_states"].shape[1] for k in c.log["tr"]]
    assert tokens == [k["hidden_states"].shape[1] for k in c.log["a"]] == \
        [k["hidden_states"].shape[1] for k in c.log["b"]]
    assert len(set(tokens)) == 3
    assert [k["conditioning_scale"] for k in c.log["a"]] == [0.6] * 11
    assert [k["conditioning_scale"] for k in c.log["b"]] == [1.2] * 5 + [0.0] * 6  # (i + 1) / 11 > 0.5 from i = 5


def test_callback_sees_and_replaces_control_image(pipe):
    seen = []

    def cb(p, i, t, kw):
        seen.append(kw["control_image"].shape)
        if i == 5:
            return {"control_image": torch.zeros_like(kw["control_image"])}
        return {}

    kw = dict(jit="7x", control_image=control(), output_type="latent", **prompt_inputs())
    with Calls(cn=pipe.controlnet) as c:
        out = pipe(generator=gen(), callback_on_step_end=cb,
                   callback_on_step_end_tensor_inputs=["latents", "control_image"], **kw).images
    assert seen == [(1, 64, 16)] * 11
    assert all(k["controlnet_cond"].abs().sum() > 0 for k in c.log["cn"][:6])
    assert all(k["controlnet_cond"].abs().sum() == 0 for k in c.log["cn"][6:])
    assert not torch.equal(out, pipe(generator=gen(), **kw).images)
    with pytest.raises(ValueError, match="replacement control_image"):
        pipe(generator=gen(), callback_on_step_end=lambda p, i, t, kw: {"control_image": torch.zeros(1, 3, 16)},
             callback_on_step_end_tensor_inputs=["control_image"], **kw)


def test_pil_and_array_control_images_match_their_tensor(pipe):
    """A PIL image / array goes through the image processor at (height, width), as in the stock pipeline."""
    from PIL import Image

    arr = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    kw = dict(jit="7x", height=64, width=96, output_type="latent", **prompt_inputs())
    ref = pipe(generator=gen(), control_image=pipe.image_processor.preprocess(Image.fromarray(arr), height=64,
                                                                              width=96), **kw).images
    assert ref.shape == (1, 24, 16)
    assert torch.equal(pipe(generator=gen(), control_image=Image.fromarray(arr), **kw).images, ref)
    assert torch.equal(pipe(generator=gen(), control_image=[Image.fromarray(arr)], **kw).images, ref)
    assert pipe(generator=gen(), control_image=arr.astype(np.float32) / 255, **kw).images.shape == ref.shape


def test_enable_jit_picks_controlnet_class(base, stock):
    e = enable_jit(stock, "7x")
    assert type(e) is JiTFluxControlNetPipeline and e.controlnet is stock.controlnet
    assert type(enable_jit(base, "7x")) is JiTFluxPipeline
    assert not isinstance(stock, JiTFluxControlNetPipeline) and not isinstance(e, FluxPipeline)
    e.set_progress_bar_config(disable=True)
    e(generator=gen(), control_image=control(size=(32, 32)), output_type="latent", **prompt_inputs())
    assert e.last_jit_report.steps == 11


@contextlib.contextmanager
def no_model_calls(pipe):
    with Calls(tr=pipe.transformer, cn=pipe.controlnet, vae=pipe.vae.encoder) as c:
        yield
    assert c.log == {"tr": [], "cn": [], "vae": []}, "work was done before the error"


@pytest.mark.parametrize("change, exc, match", [
    (dict(control_image=None), ValueError, "control_image is required"),
    (dict(control_image="edges.png"), TypeError, "control_image must be a PIL image"),
    (dict(control_image=[control(), np.zeros((16, 16, 3))]), TypeError, "control_image must be"),
    (dict(control_image=torch.zeros(1, 4, 32, 32)), ValueError, r"\[B, 3, H, W\]"),
    (dict(control_image=torch.zeros(3, 32, 32)), ValueError, r"\[B, 3, H, W\]"),
    (dict(control_image=torch.zeros(1, 3, 40, 32)), ValueError, "multiples of 16"),
    (dict(control_image=torch.zeros(1, 3, 32, 32, dtype=torch.uint8)), TypeError, "floating-point"),
    (dict(control_image=torch.zeros(2, 3, 32, 32)), ValueError, "batch 2"),
    (dict(control_mode=[1]), ValueError, "int or None"),
    (dict(controlnet_conditioning_scale="strong"), TypeError, "finite real"),
    (dict(controlnet_conditioning_scale=float("nan")), TypeError, "finite real"),
    (dict(control_guidance_start=0.6, control_guidance_end=0.4), ValueError, "0 <= start < end <= 1"),
    (dict(control_guidance_end=1.5), ValueError, "0 <= start < end <= 1"),
    (dict(control_guidance_start=[0.0, 0.1]), ValueError, "2 entries, expected 1"),
    (dict(jit=JiTConfig.preset("7x", token_bucket=16)), NotImplementedError, "token_bucket"),
    (dict(prompt_embeds=None), ValueError, "prompt_embeds"),
    (dict(latents=torch.zeros(1, 16, 16)), ValueError, r"latents must be packed \[B, 4, C\]"),
])
def test_bad_inputs_raise_before_any_work(pipe, change, exc, match):
    kw = dict(jit="7x", control_image=control(size=(32, 32)), output_type="latent", **prompt_inputs())
    kw.update(change)
    with no_model_calls(pipe), pytest.raises(exc, match=match):
        pipe(generator=gen(), **kw)


def test_unsupported_controlnets_raise_before_any_work(base, pipe):
    kw = dict(jit="7x", control_image=control(size=(32, 32)), output_type="latent", **prompt_inputs())
    none = JiTFluxControlNetPipeline.from_pipe(pipe, controlnet=None)
    none.set_progress_bar_config(disable=True)
    with no_model_calls(pipe), pytest.raises(TypeError, match="needs a FluxControlNetModel"):
        none(generator=gen(), **kw)
    coarse = JiTFluxControlNetPipeline.from_pipe(pipe, controlnet=make_xlabs_controlnet(1, patch_size=1))
    coarse.set_progress_bar_config(disable=True)
    with no_model_calls(coarse), pytest.raises(NotImplementedError, match="downsamples 8x with patch_size 1"):
        coarse(generator=gen(), **kw)
    mixed = JiTFluxControlNetPipeline.from_pipe(
        pipe, controlnet=FluxMultiControlNetModel([pipe.controlnet, make_xlabs_controlnet(1)]))
    mixed.set_progress_bar_config(disable=True)
    with no_model_calls(mixed), pytest.raises(NotImplementedError, match="mixing"):
        mixed(generator=gen(), **{**kw, "control_image": [kw["control_image"]] * 2})
    multi = JiTFluxControlNetPipeline.from_pipe(
        pipe, controlnet=FluxMultiControlNetModel([pipe.controlnet, make_controlnet(base.transformer, seed=3)]))
    multi.set_progress_bar_config(disable=True)
    with no_model_calls(multi), pytest.raises(TypeError, match="one image input per ControlNet"):
        multi(generator=gen(), **kw)
    with no_model_calls(multi), pytest.raises(ValueError, match="1 entries for 2 ControlNets"):
        multi(generator=gen(), **{**kw, "control_image": [kw["control_image"]]})
    with no_model_calls(multi), pytest.raises(ValueError, match="different sizes"):
        multi(generator=gen(), **{**kw, "control_image": [control(size=(32, 32)), control(size=(32, 48))]})


def test_anchor_attention_composes(pipe):
    """The fused attention processor in the transformer; the ControlNet keeps its own processors."""
    kw = dict(jit="7x", control_image=control(), output_type="latent", **prompt_inputs())
    before = type(pipe.transformer.transformer_blocks[0].attn.processor)
    plain = pipe(generator=gen(), **kw).images
    fused = pipe(generator=gen(), anchor_attention=True, **kw).images
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)
    assert type(pipe.transformer.transformer_blocks[0].attn.processor) is before


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_xlabs_hint_controlnet(base, cfg_scale):
    """A hint-encoder ControlNet: dense JiT equals the stock loop (controlnet_blocks_repeat, no single-block
    residuals); under 7x it runs on the transformer's tokens with the hint tokens of exactly those tokens."""
    cn = make_xlabs_controlnet(seed=21)
    stock = stock_controlnet_pipe(base, cn)
    p = JiTFluxControlNetPipeline.from_pipe(stock)
    p.set_progress_bar_config(disable=True)
    kw = dict(control_image=control(batch=2, size=(64, 96)), output_type="latent", true_cfg_scale=cfg_scale,
              controlnet_conditioning_scale=0.8, **prompt_inputs(batch=2),
              **prompt_inputs(batch=2, seed=3, prefix="negative_"))
    ref = stock(generator=gen(), num_inference_steps=4, **kw).images
    with Calls(tr=base.transformer, hint=cn.input_hint_block) as c:
        got = p(generator=gen(), jit=JiTConfig.dense(4, sigma_schedule="pipeline"), **kw).images
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert all(k["controlnet_blocks_repeat"] and k["controlnet_single_block_samples"] is None for k in c.log["tr"])
    assert len(c.log["hint"]) == 1 + 4  # the full image once, then a stand-in per step
    # Sparse stages: the hint tokens the ControlNet embeds are the full hint tokens of the active rows.
    full = {}
    seen = []
    handles = [cn.input_hint_block.register_forward_hook(lambda m, a, o: full.setdefault("map", o)),
               cn.controlnet_x_embedder.register_forward_pre_hook(lambda m, a: seen.append(a[0]))]
    try:
        with Calls(tr=base.transformer, cn=cn) as c:
            p(generator=gen(), jit="7x", **kw)
    finally:
        for h in handles:
            h.remove()
    # The first hint-encoder call is the full image: [2, 4, 8, 12] -> 4 x 6 tokens of 2 x 2 x 4.
    tokens = full["map"].reshape(2, 4, 4, 2, 6, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 24, 16)
    assert len(seen) == len(c.log["cn"]) == 11
    for k, rows in zip(c.log["cn"], seen):
        assert k["hidden_states"].shape[:2] == rows.shape[:2]
        idx = (k["img_ids"][:, 1] * 6 + k["img_ids"][:, 2]).long()
        assert torch.equal(rows, tokens[:, idx])
    assert [k["hidden_states"].shape[1] for k in c.log["cn"]] == \
        [k["hidden_states"].shape[1] for k in c.log["tr"][::2 if cfg_scale > 1 else 1]]
    with pytest.raises(NotImplementedError, match="callback_on_step_end"):
        p(generator=gen(), jit="7x", callback_on_step_end=lambda *a: {},
          callback_on_step_end_tensor_inputs=["control_image"], **kw)


def test_multi_xlabs_matches_stock_and_leaves_no_hooks(base):
    nets = [make_xlabs_controlnet(seed=31), make_xlabs_controlnet(seed=32)]
    stock = stock_controlnet_pipe(base, FluxMultiControlNetModel(nets))
    p = JiTFluxControlNetPipeline.from_pipe(stock)
    p.set_progress_bar_config(disable=True)
    kw = dict(control_image=[control(), control(seed=33)], controlnet_conditioning_scale=[1.0, 0.5],
              output_type="latent", **prompt_inputs())
    ref = stock(generator=gen(), num_inference_steps=3, **kw).images
    got = p(generator=gen(), jit=JiTConfig.dense(3, sigma_schedule="pipeline"), **kw).images
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    sparse = p(generator=gen(), jit="7x", **kw).images
    assert torch.isfinite(sparse).all() and p.last_jit_report.flops["controlnet"]["calls"] == 11
    assert all(not n.input_hint_block._forward_hooks for n in nets)
