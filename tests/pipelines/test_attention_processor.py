"""The FLUX attention processor built on ``anchor_attention`` (``AnchorAttnProcessor``,
``install_anchor_attention`` / ``use_anchor_attention``): forward parity with diffusers'
stock processor, installation and removal, LoRA-wrapped projections, key-padding masks and
the fallbacks. The op itself is tested in tests/ops/test_attention.py.
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
    from tests._fixtures.flux import build_pipe, prompt_inputs

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


# ---------------------------------------------------------------- key lengths: once per mask


@pytest.fixture
def conversions(monkeypatch):
    """Count the processor's mask -> key-length conversions (each one reads the mask on the host)."""
    import jit_sampler.pipelines.attention_processor as ap

    calls = []
    real = ap.key_lengths_from_mask

    def counting(mask, batch, seq_len):
        calls.append(mask)
        return real(mask, batch, seq_len)

    monkeypatch.setattr(ap, "key_lengths_from_mask", counting)
    return calls


def _padded_batch(n=64, text=4, counts=(64, 40)):
    from jit_eval.tiny_flux import image_ids

    x, lab = _inputs(n, len(counts), seed=4)
    mask = torch.arange(text + n)[None, :] < torch.tensor([text + c for c in counts])[:, None]
    return x, lab, image_ids(8, 8), mask


def test_key_lengths_once_per_mask(tiny, conversions):
    # 4 attention layers (2 double + 2 single blocks): one conversion per forward, none when the
    # same mask comes back, a new one after the mask changed in place.
    from jit_sampler.pipelines.attention_processor import use_anchor_attention

    tr = tiny.transformer
    x, lab, ids, mask = _padded_batch()
    with use_anchor_attention(tr):
        first = tr(**_transformer_kwargs(tiny, x, lab, ids, mask))[0]
        assert len(conversions) == 1
        again = tr(**_transformer_kwargs(tiny, x, lab, ids, mask))[0]
        assert len(conversions) == 1
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        mask[1, 30:] = False  # in place: sample 1 now has 26 valid keys
        changed = tr(**_transformer_kwargs(tiny, x, lab, ids, mask))[0]
        assert len(conversions) == 2
        fresh = tr(**_transformer_kwargs(tiny, x, lab, ids, mask.clone()))[0]
        assert len(conversions) == 3  # another tensor (same values): converted again, once
    torch.testing.assert_close(changed, fresh, rtol=0, atol=0)
    assert not torch.equal(changed[1, :26], first[1, :26])
    stock = tr(**_transformer_kwargs(tiny, x, lab, ids, mask))[0]
    torch.testing.assert_close(changed[1:, :26], stock[1:, :26], rtol=1e-4, atol=1e-5)


def test_key_lengths_cache_does_not_keep_masks_alive(tiny):
    import gc

    import jit_sampler.pipelines.attention_processor as ap

    tr = tiny.transformer
    x, lab, ids, mask = _padded_batch()
    with ap.use_anchor_attention(tr):
        tr(**_transformer_kwargs(tiny, x, lab, ids, mask))
    key = id(mask)
    assert key in ap._LENGTHS_CACHE
    del mask
    gc.collect()
    assert key not in ap._LENGTHS_CACHE


def test_inference_mode_masks_are_converted_every_time(tiny, conversions):
    # No version counter on inference tensors: no caching (correct, one conversion per layer).
    from jit_sampler.pipelines.attention_processor import use_anchor_attention

    tr = tiny.transformer
    x, lab, ids, mask = _padded_batch()
    want = tr(**_transformer_kwargs(tiny, x, lab, ids, mask))[0]
    with torch.inference_mode(), use_anchor_attention(tr):
        imask = mask.clone()
        got = tr(**_transformer_kwargs(tiny, x, lab, ids, imask))[0]
    assert len(conversions) == 4
    torch.testing.assert_close(got[:, :40], want[:, :40], rtol=1e-4, atol=1e-5)


def test_token_bucket_run_converts_once_per_stage(tiny, conversions):
    # FluxVelocity hands the processor one mask tensor per stage shape: a 7x run on the 16 x 16
    # grid pads stages 0 and 1 (81 -> 128, 153 -> 192 tokens; the dense stage needs no mask), so
    # two conversions in all (with CFG: cond and uncond have the same text length, so one mask).
    from jit_eval.tiny_flux import TinyVelocity
    from jit_sampler import JiTConfig, beta_sigmas, jit_sample
    from jit_sampler.pipelines.attention_processor import use_anchor_attention

    labels = torch.tensor([3, 6])
    noise = torch.randn(2, 256, 4, generator=_gen(7))
    out = {}
    for anchor in (False, True):
        cfg = JiTConfig.preset("7x", token_bucket=64)
        fn = TinyVelocity(tiny, labels, 2.0, token_bucket=64)
        with use_anchor_attention(tiny.transformer, enabled=anchor):
            out[anchor], rep = jit_sample(fn, noise, 16, 16, beta_sigmas(11), cfg, _gen(1))
    assert rep.model_calls == 22 and len(conversions) == 2
    torch.testing.assert_close(out[True], out[False], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- context parallelism


def _cp_config():
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    return ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))


def test_context_parallel_transformer_is_refused_at_install(tiny):
    # What enable_parallelism leaves on a model (the config on the model and on every stock
    # processor), set by hand: no process group is needed for the check.
    from jit_sampler.pipelines.attention_processor import install_anchor_attention, use_anchor_attention

    tr = tiny.transformer
    before = _processors(tr)
    cfg = _cp_config()
    try:
        tr._parallel_config = cfg
        with pytest.raises(ValueError, match="context parallelism"):
            install_anchor_attention(tr)
        with pytest.raises(ValueError, match="context parallelism"):
            with use_anchor_attention(tr):
                pass
        assert _processors(tr) == before
        del tr._parallel_config  # back to the class default; now only the processors carry it
        for p in before.values():
            p._parallel_config = cfg
        with pytest.raises(ValueError, match="context parallelism"):
            install_anchor_attention(tr)
        assert _processors(tr) == before
    finally:
        vars(tr).pop("_parallel_config", None)
        for p in before.values():
            vars(p).pop("_parallel_config", None)


def test_context_parallel_enabled_after_install_is_refused_at_call(tiny):
    from jit_sampler.pipelines.attention_processor import install_anchor_attention, remove_anchor_attention

    tr = tiny.transformer
    before = _processors(tr)
    x, lab = _inputs(64, 2)
    from jit_eval.tiny_flux import image_ids

    cfg = _cp_config()
    install_anchor_attention(tr)
    try:
        for p in tr.attn_processors.values():  # what enable_parallelism does to the installed processors
            p._parallel_config = cfg
        for devices in (("cpu",), ()):  # the fused path and the fallback path alike
            for p in tr.attn_processors.values():
                p.devices = devices
            with pytest.raises(ValueError, match="context parallelism.*remove_anchor_attention"):
                tiny.velocity(x, 0.5, lab, image_ids(8, 8))
    finally:
        assert remove_anchor_attention(tr) == 4
    # The restored stock processors carry the parallel config now (they implement the split).
    assert all(tr.attn_processors[n] is p and p._parallel_config is cfg for n, p in before.items())
    for p in before.values():
        vars(p).pop("_parallel_config", None)


def test_tensor_parallel_config_is_not_refused(tiny):
    from diffusers.models._modeling_parallel import ParallelConfig, TensorParallelConfig

    from jit_sampler.pipelines.attention_processor import use_anchor_attention

    tr = tiny.transformer
    tr._parallel_config = ParallelConfig(tensor_parallel_config=TensorParallelConfig(tp_degree=2))
    try:
        with use_anchor_attention(tr):
            assert len(tr.attn_processors) == 4
    finally:
        del tr._parallel_config


@pytest.mark.slow
def test_ulysses_two_gloo_ranks(tmp_path):
    """Real context parallelism (Ulysses over 2 gloo ranks on CPU): anchor attention refuses it at
    call time and at install time; the stock processors restored by remove_anchor_attention give
    the single-process result (they used to lose the parallel config: each rank attended to its
    shard only)."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
           os.path.join(root, "tests", "pipelines", "_cp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res["stock_cp_diff"] < 1e-5  # diffusers' own CP reproduces the one-process forward
        assert "context parallelism" in res["call_error"]
        assert res["restored_diff"] < 1e-5
        assert "context parallelism" in res["install_error"] and res["install_swapped_nothing"]


def test_the_processor_takes_the_trusted_path_for_its_key_lengths(tiny):
    # The lengths come from key_lengths_from_mask, which checked the mask (every length in [1, L]):
    # the processor passes validate=False, so no layer runs a value check (a host sync on CUDA),
    # also under inference mode.
    import jit_kernels as jk
    from jit_sampler.pipelines.attention_processor import use_anchor_attention

    tr = tiny.transformer
    x, lab, ids, mask = _padded_batch()
    jk.reset_validation_passes()
    with torch.inference_mode(), use_anchor_attention(tr):
        for _ in range(2):  # 2 forwards x 4 layers
            tr(**_transformer_kwargs(tiny, x, lab, ids, mask))
    assert jk.validation_passes().get("anchor_attention", 0) == 0
