"""``jit_sample`` and ``JiTFluxPipeline`` on the latents' device, every backend that runs there.

Each test runs on the CPU here and, ``gpu``-marked, on CUDA tensors where a CUDA device is
found; the CUDA run is compared with the same run on the CPU. All random draws come from CPU
generators (anchors, DMF noise and diffusers' initial latents are drawn on the generator's
device and moved), so both devices see the same numbers and differ by rounding only: the
velocity function's tanh, the kernels' summation order and, in the pipeline, cuBLAS / SDPA.
"""

from __future__ import annotations

import pytest
import torch

import jit_kernels as jk
from jit_kernels.testing import on
from jit_sampler import JiTConfig, beta_sigmas, jit_sample

H, W, C = 12, 10, 4
N = H * W
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]


def _velocity(x, idx, sigma, step):
    """A velocity with spatial structure (a channel roll) that keeps to ``x``'s device."""
    return 0.7 * x + torch.tanh(x.roll(1, dims=-1)) * sigma


def _sample(device, backend, policy, dtype=torch.float32):
    lat = torch.randn(2, N, C, generator=torch.Generator().manual_seed(0)).to(dtype)
    cfg = JiTConfig.preset("7x", backend=backend, anchor_policy=policy)
    y, rep = jit_sample(_velocity, on(device, lat), H, W, beta_sigmas(cfg.total_steps), cfg,
                        torch.Generator().manual_seed(1))
    return y, rep


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", ["shared", "per_sample"])
def test_jit_sample_on_device_matches_cpu_reference(device, policy):
    want, want_rep = _sample("cpu", "reference", policy)
    # the interpreter (cpu-triton) is left out: op parity is tested per op, and it is slow here
    backends = [b for b in jk.available_backends(device) if not (device == "cpu" and b == "triton")]
    assert "reference" in backends and len(backends) >= 2, backends
    for be in backends:
        y, rep = _sample(device, be, policy)
        assert y.device.type == device and y.dtype == torch.float32, be
        assert rep.active_tokens == want_rep.active_tokens, be
        torch.testing.assert_close(y.cpu(), want, rtol=0, atol=1e-4, msg=lambda m: f"{be}: {m}")
    again, _ = _sample(device, backends[0], policy)
    assert torch.equal(again, _sample(device, backends[0], policy)[0]), "same seed, same device: bit-identical"


@pytest.mark.parametrize("device", DEVICES)
def test_jit_sample_bfloat16_on_device(device):
    y, _ = _sample(device, "auto", "shared", torch.bfloat16)
    want, _ = _sample("cpu", "reference", "shared", torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.device.type == device
    torch.testing.assert_close(y.cpu().float(), want.float(), rtol=0, atol=0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_jit_flux_pipeline_on_device(device, monkeypatch):
    pytest.importorskip("diffusers")
    from tests._fixtures.flux import build_pipe, prompt_inputs
    from jit_sampler import JiTFluxPipeline
    from jit_sampler.pipelines.attention_processor import use_anchor_attention

    base = build_pipe()
    pipe = JiTFluxPipeline.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=128, width=128, num_inference_steps=8, output_type="latent")
    prompts = prompt_inputs()
    on_cpu = pipe(generator=torch.Generator().manual_seed(0), jit="4x", **kw, **prompts).images
    pipe.to(device)  # base shares the modules
    prompts = {k: on(device, v) for k, v in prompts.items()}

    def run(p, **extra):
        return p(generator=torch.Generator().manual_seed(0), **kw, **prompts, **extra).images

    stock, none = run(base), run(pipe, jit=None)
    assert stock.device.type == device and torch.equal(stock, none), "jit=None must be the stock pipeline"
    got = run(pipe, jit="4x")
    assert got.device.type == device
    torch.testing.assert_close(got.cpu(), on_cpu, rtol=1e-3, atol=1e-3)
    # The fused processor on this device (pipe(anchor_attention=True) installs it for CPU tensors
    # only); count the fused op's calls so a silent fallback to the stock processor would fail.
    calls = []
    real = jk.anchor_attention
    monkeypatch.setattr(jk, "anchor_attention", lambda *a, **k: calls.append(a[0].device.type) or real(*a, **k))
    with use_anchor_attention(pipe.transformer, devices=(device,)):
        fused = run(pipe, jit="4x")
    assert calls and set(calls) == {device}
    torch.testing.assert_close(fused, got, rtol=1e-3, atol=1e-4)
    assert not torch.equal(got, stock)


def test_device_backends_params():
    from jit_kernels.testing import DEVICE_BACKENDS, device_backends

    params = device_backends()
    assert [p.id for p in params] == ["cpu-cpp", "cpu-triton", "cuda-cuda", "cuda-triton"]
    assert [p.id for p in device_backends(("reference", "cpp"))] == ["cpu-cpp", "cpu-reference", "cuda-reference"]
    assert [p.id for p in device_backends(devices=("cuda",))] == ["cuda-cuda", "cuda-triton"]
    for p in params:
        assert p.values == tuple(p.id.split("-"))
        names = [m.name for m in p.marks]
        assert ("gpu" in names) == (p.values[0] == "cuda")
        # a pair that is collected but cannot run here says why (the gpu marker's skip aside)
        runs_here = p.values[1] in jk.available_backends(p.values[0])
        assert ("skip" in names) == (not runs_here and (p.values[0] == "cpu" or torch.cuda.is_available()))
    assert len(DEVICE_BACKENDS) == 6
