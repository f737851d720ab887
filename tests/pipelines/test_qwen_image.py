"""JiTQwenImagePipeline and QwenImageVelocity on a tiny, randomly initialised Qwen-Image built offline."""

from __future__ import annotations

import pytest
import torch

from tests._fixtures.qwen import TXT_TOKENS, build_qwen, prompt_inputs
from jit_sampler import JiTConfig
from jit_sampler.pipelines.qwen_image import JiTQwenImagePipeline, QwenImageVelocity, qwen_flop_config
from jit_sampler.report import flux_transformer_flops

GRID = 8  # a 64 x 64 image: 16 x 16 latent, 8 x 8 packed tokens


@pytest.fixture(scope="module")
def base():
    return build_qwen()


@pytest.fixture(scope="module")
def pipe(base):
    p = JiTQwenImagePipeline.from_pipe(base)
    p.set_progress_bar_config(disable=True)
    return p


def kw(batch=1, seed=0, cfg=False, **over):
    d = dict(**prompt_inputs(batch), height=64, width=64, output_type="latent",
             generator=torch.Generator().manual_seed(seed))
    if cfg:
        d.update(prompt_inputs(batch, seed=5, prefix="negative_", valid=[TXT_TOKENS - 1] * batch), true_cfg_scale=3.0)
    d.update(over)
    return d


def dense(steps):
    """All tokens, one stage, on the pipeline's own schedule: the stock loop."""
    return JiTConfig.dense(steps).replace(sigma_schedule="pipeline")


class Calls:
    """Records every transformer forward (a forward pre-hook) and the rotary tables block 0 receives."""

    def __init__(self, tr):
        self.tr, self.calls, self.rotary = tr, [], []

    def __enter__(self):
        def on_model(mod, args, kwargs):
            self.calls.append({"tokens": kwargs["hidden_states"].shape[1],
                               "enc": kwargs["encoder_hidden_states"].clone()})

        def on_block(mod, args, kwargs):
            self.rotary.append(kwargs["image_rotary_emb"])

        self.handles = [self.tr.register_forward_pre_hook(on_model, with_kwargs=True),
                        self.tr.transformer_blocks[0].register_forward_pre_hook(on_block, with_kwargs=True)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


def full_tables(tr, text_tokens=TXT_TOKENS, grid=(GRID, GRID)):
    """The stock call's ``(image_freqs [N, D/2], text_freqs [T, D/2])`` for the full grid."""
    return tr.pos_embed([[(1, *grid)]], max_txt_seq_len=text_tokens, device=torch.device("cpu"))


# -- the stock pipeline is untouched -----------------------------------------------------------

def test_jit_none_is_the_stock_pipeline(base, pipe):
    for args in (dict(), dict(batch=2, cfg=True)):
        a = base(num_inference_steps=4, **kw(**args)).images
        b = pipe(num_inference_steps=4, jit=None, **kw(**args)).images
        assert torch.equal(a, b) and pipe.last_jit_report is None
    a = base(num_inference_steps=3, **kw(output_type="pt")).images
    b = pipe(num_inference_steps=3, jit=None, **kw(output_type="pt")).images
    assert torch.equal(a, b) and a.shape == (1, 3, 64, 64)


@pytest.mark.parametrize("args", [dict(), dict(batch=2, cfg=True), dict(cfg=True, output_type="pt")])
def test_dense_config_matches_stock_loop(base, pipe, args):
    """One all-token stage on the scheduler's schedule is the stock Euler loop (CFG rescale, masks, decode)."""
    a = base(num_inference_steps=6, **kw(**args)).images
    c = pipe(jit=dense(6), **kw(**args)).images
    assert c.shape == a.shape
    torch.testing.assert_close(c, a, rtol=0, atol=1e-5)
    rep = pipe.last_jit_report
    assert rep.sigmas == pytest.approx(base.scheduler.sigmas.tolist())  # shifted, shift_terminal 0.02, then 0
    assert rep.model_calls == (12 if args.get("cfg") else 6)


def test_dense_config_differs_from_stock_without_cfg_rescale(base, pipe):
    """Guards the test above: dropping Qwen's norm rescale is visible at this tolerance."""
    a = base(num_inference_steps=6, **kw(cfg=True)).images
    orig = QwenImageVelocity._guided

    def plain_cfg(self, x, rows, sl, sigma):
        v, v_neg = self._forward(x, rows, sl, sigma, True), self._forward(x, rows, sl, sigma, False)
        return v_neg + self.true_cfg_scale * (v - v_neg)

    QwenImageVelocity._guided = plain_cfg
    try:
        c = pipe(jit=dense(6), **kw(cfg=True)).images
    finally:
        QwenImageVelocity._guided = orig
    assert (c - a).abs().max() > 1e-2


# -- positions: the active rows of the image rotary table -----------------------------------------

def _velocity(tr, batch=1, negative=False, **kwargs):
    e = prompt_inputs(batch, seed=3, valid=[TXT_TOKENS - 2] * batch)
    neg = None
    if negative:
        n = prompt_inputs(batch, seed=4)
        neg = (n["prompt_embeds"], None)
    return QwenImageVelocity(tr, e["prompt_embeds"], e["prompt_embeds_mask"], (GRID, GRID), negative=neg,
                             true_cfg_scale=2.5 if negative else 1.0, **kwargs)


def _x(batch=1, n=GRID * GRID):
    return torch.randn(batch, n, 16, generator=torch.Generator().manual_seed(7))


def test_velocity_feeds_the_active_rotary_rows(base):
    tr = base.transformer
    vid, txt = full_tables(tr)
    idx = torch.tensor([0, 5, 9, 17, 30, 31, 44, 63, 2])  # unsorted on purpose
    vel = _velocity(tr)
    with Calls(tr) as spy:
        v = vel(_x()[:, idx], idx, 0.7, 0)
        vel(_x()[:, idx], idx, 0.6, 1)  # second step of the stage: cached selection, same rows
    assert v.shape == (1, 9, 16) and spy.calls[0]["tokens"] == 9
    for img, text in spy.rotary:
        assert torch.equal(img, vid[idx]) and torch.equal(text, txt)  # text positions as in the full-grid call
    assert not tr.pos_embed._forward_hooks  # the hook lives for one forward only


def test_dense_identity_runs_without_hook(base):
    tr = base.transformer
    vel = _velocity(tr)
    with Calls(tr) as spy:
        vel(_x(), torch.arange(GRID * GRID), 0.5, 0)
    assert torch.equal(spy.rotary[0][0], full_tables(tr)[0])


@pytest.mark.parametrize("negative", [False, True])
def test_permuted_tokens_with_permuted_rows_give_permuted_velocity(base, negative):
    """The KEY check: the model is permutation-equivariant given each token's own rotary row, so
    running it on a permutation of the full grid with the permuted rows returns the permuted
    velocity. A wrong row selection breaks this (negative control below)."""
    tr = base.transformer
    n = GRID * GRID
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(11))
    x = _x(2)
    vel = _velocity(tr, batch=2, negative=negative)
    v_full = vel(x, torch.arange(n), 0.8, 0)
    v_perm = vel(x[:, perm], perm, 0.8, 1)
    torch.testing.assert_close(v_perm, v_full[:, perm], rtol=1e-4, atol=1e-5)
    # Negative control: the same permuted tokens with the grid's rows in grid order.
    e = vel.prompt_embeds
    t = torch.full((2,), 0.8)
    wrong = tr(hidden_states=x[:, perm], timestep=t, encoder_hidden_states=e,
               encoder_hidden_states_mask=vel.prompt_embeds_mask, img_shapes=[[(1, GRID, GRID)]] * 2,
               return_dict=False)[0]
    right = QwenImageVelocity(tr, e, vel.prompt_embeds_mask, (GRID, GRID))(x[:, perm], perm, 0.8, 0)
    assert (wrong - right).abs().max() > 1e-2


def test_per_sample_sets_select_rows_per_sample(base):
    tr = base.transformer
    vid, _ = full_tables(tr)
    idx = torch.stack([torch.arange(0, 64, 3)[:20], torch.arange(1, 64, 3)[:20]])
    vel = _velocity(tr, batch=2)
    x = _x(2)
    with Calls(tr) as spy:
        v = vel(torch.stack([x[0, idx[0]], x[1, idx[1]]]), idx, 0.9, 0)
    assert [c["tokens"] for c in spy.calls] == [20, 20] and vel.calls == 2
    assert torch.equal(spy.rotary[0][0], vid[idx[0]]) and torch.equal(spy.rotary[1][0], vid[idx[1]])
    # each sample equals a batch-1 velocity on its own set, text and mask
    e, m = vel.prompt_embeds, vel.prompt_embeds_mask
    one = QwenImageVelocity(tr, e[1:], m[1:], (GRID, GRID))(x[1:, idx[1]], idx[1], 0.9, 0)
    torch.testing.assert_close(v[1:], one, rtol=1e-5, atol=1e-6)


def test_true_cfg_is_qwens_rescaled_combination(base):
    tr = base.transformer
    idx = torch.arange(0, 64, 2)
    x = _x()[:, idx]
    vel = _velocity(tr, negative=True)
    v = vel(x, idx, 0.6, 0)
    cond = QwenImageVelocity(tr, vel.prompt_embeds, vel.prompt_embeds_mask, (GRID, GRID))(x, idx, 0.6, 0)
    unc = QwenImageVelocity(tr, vel.negative[0], None, (GRID, GRID))(x, idx, 0.6, 0)
    comb = unc + 2.5 * (cond - unc)
    want = comb * cond.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True)
    assert vel.calls == 2
    torch.testing.assert_close(v, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v.norm(dim=-1), cond.norm(dim=-1), rtol=1e-5, atol=1e-6)


# -- presets through the pipeline --------------------------------------------------------------

def test_preset_token_counts_cfg_and_flops(pipe):
    with Calls(pipe.transformer) as spy:
        out = pipe(jit="7x", **kw(cfg=True)).images
    rep = pipe.last_jit_report
    want = [20] * 4 + [38] * 3 + [64] * 4  # int(64 * 0.32), int(64 * 0.60), all
    assert rep.active_tokens == want and rep.model_calls == 22
    assert [c["tokens"] for c in spy.calls] == [m for m in want for _ in (0, 1)]  # cond and uncond share the set
    for cond, uncond in zip(spy.calls[::2], spy.calls[1::2]):
        assert not torch.equal(cond["enc"], uncond["enc"])
    assert out.shape == (1, 64, 16) and torch.isfinite(out).all()
    assert not pipe.transformer.pos_embed._forward_hooks
    s = rep.flops["speedup_vs_same_steps"]["image_linear"]
    assert s == pytest.approx(11 / (4 * 20 / 64 + 3 * 38 / 64 + 4))
    assert rep.flops["jit"]["attention"] > 0


def test_flop_config_counts_qwen_linear_layers(base):
    """Per image / text token, 2 FLOPs per weight of every per-token linear layer of the real model."""
    tr = base.transformer
    img = tr.img_in.weight.numel() + tr.proj_out.weight.numel()
    txt = tr.txt_in.weight.numel()
    for blk in tr.transformer_blocks:
        a = blk.attn
        img += sum(l.weight.numel() for l in (a.to_q, a.to_k, a.to_v, a.to_out[0]))
        img += sum(m.weight.numel() for m in blk.img_mlp.modules() if isinstance(m, torch.nn.Linear))
        txt += sum(l.weight.numel() for l in (a.add_q_proj, a.add_k_proj, a.add_v_proj, a.to_add_out))
        txt += sum(m.weight.numel() for m in blk.txt_mlp.modules() if isinstance(m, torch.nn.Linear))
    f = flux_transformer_flops(qwen_flop_config(tr.config), 1, 1)
    assert f.image_linear == 2 * img and f.text_linear == 2 * txt


def test_seeded_reproducible_and_batched(pipe):
    a = pipe(jit="4x", **kw(batch=2, cfg=True)).images
    b = pipe(jit="4x", **kw(batch=2, cfg=True)).images
    assert torch.equal(a, b) and a.shape == (2, 64, 16)
    c = pipe(jit="4x", **kw(batch=2, seed=1, cfg=True)).images
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])


def test_per_sample_batch_matches_single_runs(pipe):
    cfg = JiTConfig.preset("7x", anchor_policy="per_sample")
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    both = pipe(jit=cfg, **kw(batch=2, generator=gens)).images
    e = prompt_inputs(2)
    one = pipe(jit=cfg, **kw(prompt_embeds=e["prompt_embeds"][1:], prompt_embeds_mask=e["prompt_embeds_mask"][1:],
                             generator=[torch.Generator().manual_seed(2)])).images
    torch.testing.assert_close(both[1:], one, rtol=1e-4, atol=1e-5)


def test_num_images_per_prompt_and_shared_negative(pipe):
    neg = prompt_inputs(1, seed=5, prefix="negative_")
    out = pipe(jit="7x", num_images_per_prompt=2, true_cfg_scale=2.0, **neg, **kw()).images
    assert out.shape == (2, 64, 16) and not torch.equal(out[0], out[1])
    assert pipe.last_jit_report.model_calls == 22


@pytest.mark.parametrize("hw", [(64, 96), (96, 64)])
def test_non_square_sizes_run_the_anchor_rows_and_decode(pipe, hw):
    """With a given initial anchor list, the first stage's model calls get exactly those rows of
    the full (non-square) grid's rotary table; the dense stage gets the whole table."""
    h, w = hw
    gh, gw = h // 8, w // 8
    vid, _ = full_tables(pipe.transformer, grid=(gh, gw))
    m0 = int(gh * gw * 0.32)
    anchors = torch.randperm(gh * gw, generator=torch.Generator().manual_seed(5))[:m0]
    cfg = JiTConfig.preset("7x", init_anchors=anchors)
    with Calls(pipe.transformer) as spy:
        out = pipe(jit=cfg, **kw(height=h, width=w, output_type="pt")).images
    assert out.shape == (1, 3, h, w) and torch.isfinite(out).all()
    assert pipe.last_jit_report.active_tokens[-1] == gh * gw
    assert torch.equal(spy.rotary[0][0], vid[anchors.sort().values])  # the "sorted" anchor order
    assert torch.equal(spy.rotary[-1][0], vid)


def test_schedule_beta_by_default_pipeline_on_request(pipe):
    from jit_sampler import beta_sigmas

    pipe(jit="7x", **kw())
    assert pipe.last_jit_report.sigmas == pytest.approx(beta_sigmas(11, 1.4, 0.425))
    pipe(jit=JiTConfig.preset("7x", sigma_schedule="pipeline"), **kw())
    sig = pipe.last_jit_report.sigmas
    assert sig[-2] == pytest.approx(0.02) and sig[-1] == 0.0  # Qwen's shift_terminal
    pipe(jit="7x", num_inference_steps=14, **kw())
    assert len(pipe.last_jit_report.active_tokens) == 14


def test_callback_interrupt_and_hook_removed_on_error(pipe):
    seen = []

    def cb(p, i, t, kwargs):
        seen.append((i, float(t), tuple(kwargs["latents"].shape), tuple(kwargs["prompt_embeds"].shape)))
        if i == 2:
            p._interrupt = True
        return {}

    pipe(jit="7x", callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **kw())
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][1] == pytest.approx(1000.0)
    assert seen[0][2] == (1, 64, 16) and seen[0][3] == (1, TXT_TOKENS, 16)
    assert len(pipe.last_jit_report.active_tokens) == 3

    def boom(mod, args, kwargs):
        raise RuntimeError("boom")

    h = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(boom, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            pipe(jit="7x", **kw())
    finally:
        h.remove()
    assert not pipe.transformer.pos_embed._forward_hooks


def test_inputs_not_mutated(pipe):
    args = kw(batch=2, cfg=True, latents=torch.randn(2, 64, 16, generator=torch.Generator().manual_seed(3)))
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    attn = {}
    pipe(jit="7x", attention_kwargs=attn, **args)
    assert all(torch.equal(args[k], v) for k, v in before.items()) and attn == {}


# -- enable_jit and bad inputs ---------------------------------------------------------------------

def test_enable_jit_picks_the_qwen_pipeline(base):
    import jit_sampler
    from tests._fixtures.flux import build_pipe
    from jit_sampler import enable_jit

    assert jit_sampler.JiTQwenImagePipeline is JiTQwenImagePipeline
    assert jit_sampler.QwenImageVelocity is QwenImageVelocity
    e = enable_jit(base, "7x")
    e.set_progress_bar_config(disable=True)
    assert type(e) is JiTQwenImagePipeline and e.transformer is base.transformer and e.vae is base.vae
    assert not isinstance(base, JiTQwenImagePipeline)
    e(**kw())
    assert len(e.last_jit_report.active_tokens) == 11
    e(jit=None, num_inference_steps=2, **kw())
    assert e.last_jit_report is None
    assert enable_jit(e, "4x") is e and e._default_jit.name == "4x"
    assert type(enable_jit(build_pipe(), "4x")).__name__ == "JiTFluxPipeline"
    with pytest.raises(TypeError, match="QwenImagePipeline"):
        enable_jit(object(), "4x")


@pytest.mark.parametrize("over, exc, match", [
    (dict(jit="9x"), ValueError, "unknown preset"),
    (dict(prompt_embeds_mask=torch.ones(1, TXT_TOKENS + 1, dtype=torch.long)), ValueError, "prompt_embeds_mask"),
    (dict(prompt_embeds_mask=[1] * TXT_TOKENS), TypeError, "prompt_embeds_mask"),
    (dict(negative_prompt_embeds=torch.zeros(1, 3, 16), negative_prompt_embeds_mask=torch.ones(1, 4)),
     ValueError, "negative_prompt_embeds_mask"),
    (dict(latents=torch.zeros(1, 63, 16)), ValueError, "tokens"),
    (dict(latents=torch.zeros(2, 64, 16)), ValueError, "B = 1"),
    (dict(latents=torch.zeros(1, 1, 4, 16, 16)), ValueError, "packed"),
    (dict(negative_prompt_embeds=torch.zeros(3, TXT_TOKENS, 16)), ValueError, "3 embeddings for a batch of 1"),
    (dict(max_sequence_length=2048), ValueError, "max_sequence_length"),
    (dict(prompt="a cat"), ValueError, "Cannot forward both"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), ValueError, "callback_on_step_end_tensor_inputs"),
    (dict(jit=JiTConfig.preset("7x", token_bucket=16)), NotImplementedError, "token_bucket"),
    (dict(generator=[torch.Generator()] * 3), ValueError, "generators"),
])
def test_bad_inputs_raise_before_any_model_call(pipe, over, exc, match):
    args = kw()
    args.setdefault("jit", "7x")
    args.update(over)
    with Calls(pipe.transformer) as spy, pytest.raises(exc, match=match):
        pipe(**args)
    assert spy.calls == []


@pytest.mark.parametrize("over, exc, match", [
    (dict(zero_cond_t=True), NotImplementedError, "zero_cond_t"),
    (dict(guidance_embeds=True), NotImplementedError, "guidance_embeds"),
    (dict(use_additional_t_cond=True), NotImplementedError, "use_additional_t_cond"),
])
def test_unsupported_transformers_raise_before_work(over, exc, match):
    p = JiTQwenImagePipeline.from_pipe(build_qwen(**over))
    with Calls(p.transformer) as spy, pytest.raises(exc, match=match):
        p(jit="7x", **kw())
    assert spy.calls == []
