"""JiT with a real peft LoRA adapter on the tiny FLUX.1 transformer (tests/_fixtures/flux.py).

The adapter is random (``init_lora_weights=False``), so it changes the model; the LoRA scale
travels in ``joint_attention_kwargs={"scale": s}`` through :class:`FluxVelocity` to the
transformer, and a saved adapter loads back (offline, from ``tmp_path``) into a fresh
pipeline. Each check runs with the stock attention processors and with the fused
anchor-attention processor (``anchor_attention=True``).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from tests._fixtures.flux import build_pipe, prompt_inputs
from jit_sampler import JiTFluxPipeline

H = W = 128
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "proj_mlp", "proj_out"]
ANCHOR = [False, True]


def _lora(pipe, seed: int = 11):
    """A random rank-4 adapter (scale alpha / r = 1) on every attention and MLP projection."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=TARGETS))
    return pipe


def _run(pipe, anchor: bool, scale=None, jit="7x", **kw):
    extra = {} if scale is None else {"joint_attention_kwargs": {"scale": scale}}
    return pipe(**prompt_inputs(), height=H, width=W, output_type="latent", generator=torch.Generator().manual_seed(0),
                jit=jit, anchor_attention=anchor, **extra, **kw).images


@pytest.fixture(scope="module")
def plain():
    """JiT 7x latents of the fixture pipeline without LoRA, per processor kind."""
    pipe = build_pipe(JiTFluxPipeline)
    return {a: _run(pipe, a) for a in ANCHOR}


@pytest.fixture(scope="module")
def lora_pipe():
    return _lora(build_pipe(JiTFluxPipeline))


@pytest.mark.parametrize("anchor", ANCHOR)
def test_peft_lora_changes_the_jit_image(plain, lora_pipe, anchor):
    y = _run(lora_pipe, anchor)
    assert not torch.allclose(y, plain[anchor], atol=1e-3)
    assert lora_pipe.last_jit_report is not None and torch.isfinite(y).all()
    torch.testing.assert_close(y, _run(lora_pipe, not anchor), rtol=1e-4, atol=1e-5)  # both processors see LoRA


@pytest.mark.parametrize("anchor", ANCHOR)
def test_peft_lora_scale_reaches_the_transformer(plain, lora_pipe, anchor):
    y0 = _run(lora_pipe, anchor, scale=0.0)
    torch.testing.assert_close(y0, plain[anchor], rtol=1e-5, atol=1e-6)  # scale 0: no LoRA
    full, half = _run(lora_pipe, anchor), _run(lora_pipe, anchor, scale=0.5)
    torch.testing.assert_close(_run(lora_pipe, anchor, scale=1.0), full, rtol=0, atol=0)  # 1 is the default
    assert not torch.allclose(half, full, atol=1e-3) and not torch.allclose(half, y0, atol=1e-3)
    # The scale is applied for the call only: the next call without it is the full adapter again.
    assert torch.equal(_run(lora_pipe, anchor), full)


def test_peft_lora_scale_is_not_mutated(lora_pipe):
    kwargs = {"scale": 0.5}
    lora_pipe(**prompt_inputs(), height=H, width=W, output_type="latent", jit="7x", joint_attention_kwargs=kwargs)
    assert kwargs == {"scale": 0.5}


@pytest.mark.parametrize("anchor", ANCHOR)
def test_peft_lora_save_load_round_trip(lora_pipe, tmp_path, anchor):
    want = _run(lora_pipe, anchor)
    JiTFluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(lora_pipe.transformer))
    fresh = build_pipe(JiTFluxPipeline)
    fresh.load_lora_weights(tmp_path)
    assert torch.equal(_run(fresh, anchor), want)
    torch.testing.assert_close(_run(fresh, anchor, scale=0.0), _run(build_pipe(JiTFluxPipeline), anchor),
                               rtol=1e-5, atol=1e-6)


def test_peft_lora_jit_none_is_the_stock_pipeline(lora_pipe):
    from diffusers import FluxPipeline

    stock = FluxPipeline.from_pipe(lora_pipe)  # same transformer, adapter included
    for scale in (None, 0.5):
        extra = {} if scale is None else {"joint_attention_kwargs": {"scale": scale}}
        want = stock(**prompt_inputs(), height=H, width=W, output_type="latent", num_inference_steps=4,
                     generator=torch.Generator().manual_seed(0), **extra).images
        got = _run(lora_pipe, False, scale=scale, jit=None, num_inference_steps=4)
        assert torch.equal(got, want)
