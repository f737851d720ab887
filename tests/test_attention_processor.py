"""The FLUX attention processor built on ``anchor_attention`` (``AnchorAttnProcessor``,
``install_anchor_attention`` / ``use_anchor_attention``): forward parity with diffusers'
stock processor, installation and removal, LoRA-wrapped projections, key-padding masks and
the fallbacks. The op itself is tested in test_attention.py.
"""

from __future__ import annotations

import pytest
import torch

from jit_kernels.testing import gen as _gen


# ---------------------------------------------------------------- the FLUX processor


@pytest.fixture(scope="module")
def tiny():
    from jit_eval.tiny_flux import load_tiny_flux

    return load_tiny_flux()


def _inputs(n=256, b=2, seed=0):
    g = _gen(seed)
    return torch.randn(b, n, 4, generator=g), torch.tensor([3, 7, 1, 9][:b])


def _processors(tr):
    return {name: p for name, p in tr.attn_processors.items()}


def test_tiny_flux_forward_matches_stock(tiny):
    from jit_sampler.pipelines.attention_processor import AnchorAttnProcessor, use_anchor_attention
    from jit_eval.tiny_flux import image_ids

    x, lab = _inputs()
    ids = image_ids(16, 16)
    want = tiny.velocity(x, 0.6, lab, ids)
    with use_anchor_attention(tiny.transformer):
        assert all(isinstance(p, AnchorAttnProcessor) for p in tiny.transformer.attn_processors.values())
        got = tiny.velocity(x, 0.6, lab, ids)
        # Anchor-only positions: a scattered subset of a 64 x 64 grid, as in a JiT stage.
        sub = torch.randperm(4096, generator=_gen(5))[:300]
        ids64 = image_ids(64, 64)[sub]
        xs, _ = _inputs(300, 2, seed=1)
        got_sub = tiny.velocity(xs, 0.3, lab, ids64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_sub, tiny.velocity(xs, 0.3, lab, ids64), rtol=1e-4, atol=1e-5)


def test_install_remove_restores_exact_processors(tiny):
    from jit_sampler.pipelines.attention_processor import (AnchorAttnProcessor, install_anchor_attention, remove_anchor_attention,
                                       use_anchor_attention)

    tr = tiny.transformer
    before = _processors(tr)
    assert install_anchor_attention(tr) == 4  # 2 double + 2 single blocks
    assert install_anchor_attention(tr) == 0  # idempotent
    fallbacks = [p.fallback for p in tr.attn_processors.values()]
    assert all(f is before[n] for f, n in zip(fallbacks, before))
    with use_anchor_attention(tr):  # nested: must not undo the outer installation
        pass
    assert all(isinstance(p, AnchorAttnProcessor) for p in tr.attn_processors.values())
    assert remove_anchor_attention(tr) == 4
    assert all(tr.attn_processors[n] is p for n, p in before.items())
    assert remove_anchor_attention(tr) == 0
    with pytest.raises(RuntimeError):
        with use_anchor_attention(tr):
            raise RuntimeError("boom")
    assert all(tr.attn_processors[n] is p for n, p in before.items())


def test_lora_scale_and_wrapped_projections(tiny):
    # LoRA (PEFT) wraps the projection layers and scales them from joint_attention_kwargs["scale"]
    # at the model level; the processor calls the same layers, so a wrapped to_q / add_k_proj
    # must change both processors' outputs identically, and "scale" must be accepted.
    from jit_sampler.pipelines.attention_processor import use_anchor_attention

    class LowRank(torch.nn.Module):
        def __init__(self, base, seed):
            super().__init__()
            self.base = base
            g = _gen(seed)
            self.a = torch.randn(base.in_features, 2, generator=g) * 0.1
            self.b = torch.randn(2, base.out_features, generator=g) * 0.1

        def forward(self, x):
            return self.base(x) + (x @ self.a) @ self.b

    tr = tiny.transformer
    blk, single = tr.transformer_blocks[0].attn, tr.single_transformer_blocks[0].attn
    saved = (blk.to_q, blk.add_k_proj, single.to_v)
    try:
        blk.to_q, blk.add_k_proj, single.to_v = LowRank(blk.to_q, 1), LowRank(blk.add_k_proj, 2), LowRank(single.to_v, 3)
        x, lab = _inputs()
        enc, pooled = tiny.encode(lab)
        from jit_eval.tiny_flux import image_ids, text_ids

        kw = dict(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=torch.full((2,), 0.5),
                  img_ids=image_ids(16, 16), txt_ids=text_ids(enc.shape[1]), return_dict=False,
                  joint_attention_kwargs={"scale": 0.5})
        want = tr(**kw)[0]
        with use_anchor_attention(tr):
            got = tr(**kw)[0]
    finally:
        blk.to_q, blk.add_k_proj, single.to_v = saved
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _transformer_kwargs(tiny, x, lab, ids, mask=None):
    from jit_eval.tiny_flux import text_ids

    enc, pooled = tiny.encode(lab)
    kw = dict(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
              timestep=torch.full((x.shape[0],), 0.4), img_ids=ids, txt_ids=text_ids(enc.shape[1]), return_dict=False)
    if mask is not None:
        kw["joint_attention_kwargs"] = {"attention_mask": mask}
    return kw


def test_key_padding_mask_becomes_lengths(tiny):
    # A batch padded to one length with a key-padding mask: every valid row equals running the
    # sample alone without padding (the stock processor gives the same valid rows).
    from jit_sampler.pipelines.attention_processor import key_lengths_from_mask, use_anchor_attention
    from jit_eval.tiny_flux import image_ids

    tr = tiny.transformer
    n, text = 200, 4
    counts = [200, 123]
    ids = image_ids(16, 16)[torch.randperm(256, generator=_gen(2))[:n]]
    x, lab = _inputs(n, 2, seed=3)
    mask = torch.arange(text + n)[None, :] < torch.tensor([text + c for c in counts])[:, None]
    assert key_lengths_from_mask(mask, 2, text + n).tolist() == [text + c for c in counts]
    with use_anchor_attention(tr):
        got = tr(**_transformer_kwargs(tiny, x, lab, ids, mask))[0]
        alone = [tr(**_transformer_kwargs(tiny, x[i:i + 1, :c], lab[i:i + 1], ids[:c]))[0] for i, c in enumerate(counts)]
    stock = tr(**_transformer_kwargs(tiny, x, lab, ids, mask))[0]
    for i, c in enumerate(counts):
        torch.testing.assert_close(got[i:i + 1, :c], alone[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[i:i + 1, :c], stock[i:i + 1, :c], rtol=1e-4, atol=1e-5)
    # The additive 0 / -inf form and the 4-D form convert too.
    add = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    assert key_lengths_from_mask(add[:, None, None], 2, text + n).tolist() == [text + c for c in counts]


def test_other_masks_fall_back_to_stock(tiny):
    from jit_sampler.pipelines.attention_processor import key_lengths_from_mask, use_anchor_attention
    from jit_eval.tiny_flux import image_ids

    tr = tiny.transformer
    x, lab = _inputs(64, 2)
    ids = image_ids(8, 8)
    seq = 4 + 64
    holes = torch.ones(2, seq, dtype=torch.bool)
    holes[1, 10] = False  # not a prefix
    bias = torch.randn(2, 1, 1, seq, generator=_gen(1))  # a real additive bias
    assert key_lengths_from_mask(holes, 2, seq) is None and key_lengths_from_mask(bias, 2, seq) is None
    for mask in (holes, bias):
        want = tr(**_transformer_kwargs(tiny, x, lab, ids, mask))[0]
        with use_anchor_attention(tr):
            got = tr(**_transformer_kwargs(tiny, x, lab, ids, mask))[0]
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_devices_gate_falls_back_to_stock(tiny):
    # devices=() keeps the fused op off everywhere: the fallback (the stock processor) runs.
    from jit_sampler.pipelines.attention_processor import use_anchor_attention

    x, lab = _inputs(64, 2)
    from jit_eval.tiny_flux import image_ids

    ids = image_ids(8, 8)
    want = tiny.velocity(x, 0.5, lab, ids)
    with use_anchor_attention(tiny.transformer, devices=()):
        got = tiny.velocity(x, 0.5, lab, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_pipeline_switch():
    from _flux_fixtures import build_pipe, prompt_inputs

    from jit_sampler import JiTFluxPipeline

    pipe = build_pipe(JiTFluxPipeline)
    before = _processors(pipe.transformer)
    kw = dict(height=128, width=128, output_type="latent", **prompt_inputs())
    base = pipe(jit="4x", generator=_gen(0), **kw).images
    fused = pipe(jit="4x", anchor_attention=True, generator=_gen(0), **kw).images
    torch.testing.assert_close(fused, base, rtol=1e-4, atol=1e-5)
    assert all(pipe.transformer.attn_processors[n] is p for n, p in before.items())


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_gpu_processor_matches_stock(tiny):
    from jit_sampler.pipelines.attention_processor import use_anchor_attention

    m = tiny.to("cuda")
    try:
        x, lab = (t.cuda() for t in _inputs())
        want = m.velocity(x, 0.6, lab)
        with use_anchor_attention(m.transformer, devices=("cuda",)):
            got = m.velocity(x, 0.6, lab)
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)
    finally:
        tiny.to("cpu")
