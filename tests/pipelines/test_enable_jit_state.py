"""enable_jit keeps the caller's pipeline as it was and carries its pipeline-level state (issue 21).

For every stock pipeline ``enable_jit`` handles (FLUX.1 text-to-image, Img2Img, Inpaint, Fill,
Kontext, ControlNet; FLUX.2-klein and its KV variant; Qwen-Image; Stable Diffusion 3): in bf16, with model offload and
a progress bar config, the caller's pipeline is unchanged (dtypes, devices, hooks, attention
processors, config, progress bar config, every attribute) and the returned one shares its
modules and carries the offload hooks and progress bar config. Then: a JiT call keeps bf16,
fp8 layerwise-cast storage stays fp8, ``maybe_free_model_hooks`` re-installs the hooks as the
stock call does, group offload runs, a saved JiT pipeline is a stock folder, and token_bucket
with an attention backend that takes no mask is refused before any model runs.
"""

from __future__ import annotations

import filecmp
import json
from itertools import chain

import pytest
import torch

from tests._fixtures import flux2, qwen, sd3
from tests._fixtures.flux import NO_TEXT, build_pipe, controlnet, prompt_inputs, stock_pipe
from jit_sampler import JiTConfig, JiTFluxPipeline, enable_jit

def _controlnet_pipe():
    from diffusers import FluxControlNetPipeline

    base = build_pipe()
    return stock_pipe(base, FluxControlNetPipeline, controlnet=controlnet(base.transformer, seed=3))


def _builders():
    import diffusers as d

    return {
        "FluxPipeline": build_pipe,
        "FluxImg2ImgPipeline": lambda: build_pipe(d.FluxImg2ImgPipeline),
        "FluxInpaintPipeline": lambda: build_pipe(d.FluxInpaintPipeline),
        "FluxFillPipeline": lambda: build_pipe(d.FluxFillPipeline),
        "FluxKontextPipeline": lambda: build_pipe(d.FluxKontextPipeline),
        "FluxControlNetPipeline": _controlnet_pipe,
        "Flux2KleinPipeline": flux2.build_klein,
        "Flux2KleinKVPipeline": lambda: flux2.build_klein(d.Flux2KleinKVPipeline),
        "QwenImagePipeline": qwen.build_qwen,
        "StableDiffusion3Pipeline": sd3.build_pipe,
    }


def _user_setup(pipe, dtype=torch.bfloat16):
    """What a user does before enable_jit: a low-precision pipeline, model offload, a progress bar config."""
    pipe.to(dtype)
    pipe.enable_model_cpu_offload(device="cpu")  # diffusers accepts the CPU as the "accelerator" here
    pipe.set_progress_bar_config(disable=True, desc="mine", leave=False)
    return pipe


def _module_state(m: torch.nn.Module) -> dict:
    tensors = {n: (id(t), t.dtype, t.device, type(t).__name__)
               for n, t in chain(m.named_parameters(remove_duplicate=False), m.named_buffers(remove_duplicate=False))}
    hooks = {n: (id(getattr(s, "_hf_hook", None)), id(getattr(s, "_diffusers_hook", None)), s.forward)
             for n, s in m.named_modules()}
    processors = {n: id(p) for n, p in m.attn_processors.items()} if hasattr(m, "attn_processors") else None
    return {"tensors": tensors, "hooks": hooks, "processors": processors, "training": m.training,
            "config": dict(m.config) if hasattr(m, "config") else None}


def snapshot(pipe) -> dict:
    """Everything enable_jit could change on ``pipe``: each component (object, tensors' dtype / device /
    identity, accelerate and diffusers hooks, attention processors, config), the pipeline config and
    every instance attribute (the offload hooks list and progress bar config included, by value)."""
    comps = {name: (id(c), _module_state(c) if isinstance(c, torch.nn.Module) else None)
             for name, c in pipe.components.items()}
    attrs = {k: (id(v), list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else None)
             for k, v in vars(pipe).items()}
    return {"class": type(pipe), "components": comps, "config": dict(pipe.config), "attrs": attrs}


@pytest.mark.parametrize("name", sorted(_builders()))
def test_enable_jit_leaves_the_callers_pipeline_as_it_was_and_carries_its_state(name):
    stock = _user_setup(_builders()[name]())
    assert type(stock).__name__ == name
    before = snapshot(stock)
    pipe = enable_jit(stock, "7x")
    assert snapshot(stock) == before

    assert type(pipe).__name__ == f"JiT{name}" and isinstance(pipe, type(stock))
    assert pipe is not stock and pipe._default_jit.name == "7x"
    for key, c in stock.components.items():  # the very same objects, nothing cast, moved or re-hooked
        assert pipe.components[key] is c, key
    assert dict(pipe.config) == dict(stock.config)
    dtypes = {t.dtype for t in pipe.transformer.parameters()}
    assert dtypes == {torch.bfloat16}
    # The pipeline-level state: offload hooks (the same hook objects, in a list of its own), device,
    # progress bar config; the execution device follows.
    assert pipe._all_hooks == stock._all_hooks and len(pipe._all_hooks) >= 2
    assert pipe._all_hooks is not stock._all_hooks
    assert pipe._offload_device == stock._offload_device
    assert pipe._progress_bar_config == {"disable": True, "desc": "mine", "leave": False}
    assert pipe._execution_device == stock._execution_device
    assert snapshot(stock) == before


@pytest.mark.parametrize("name", ["FluxPipeline", "StableDiffusion3Pipeline"])
def test_enable_ras_leaves_the_callers_pipeline_as_it_was_and_carries_its_state(name):
    from jit_sampler import enable_ras

    stock = _user_setup(_builders()[name]())
    before = snapshot(stock)
    pipe = enable_ras(stock)
    assert snapshot(stock) == before
    assert pipe is not stock and isinstance(pipe, type(stock))
    for key, c in stock.components.items():
        assert pipe.components[key] is c, key
    assert {t.dtype for t in pipe.transformer.parameters()} == {torch.bfloat16}
    assert pipe._all_hooks == stock._all_hooks and len(pipe._all_hooks) >= 2
    assert pipe._progress_bar_config == {"disable": True, "desc": "mine", "leave": False}


# ---------------------------------------------------------------------------------------------------------
# A JiT call on the three families in bf16 with model offload: dtypes kept, hooks re-installed at the end
# (maybe_free_model_hooks) as the stock call does.

def _call_inputs(family: str, dtype):
    if family == "flux":
        return {k: v.to(dtype) for k, v in prompt_inputs().items()} | dict(height=128, width=128)
    if family == "klein":
        return dict(prompt_embeds=flux2.embeds().to(dtype),
                    negative_prompt_embeds=flux2.embeds(seed=2).to(dtype), height=128, width=128)
    q = qwen.prompt_inputs()
    return dict(prompt_embeds=q["prompt_embeds"].to(dtype), prompt_embeds_mask=q["prompt_embeds_mask"], height=128,
                width=128)


FAMILIES = {"flux": build_pipe, "klein": flux2.build_klein, "qwen": qwen.build_qwen}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_jit_call_keeps_bf16_and_frees_model_hooks_as_the_stock_call(family):
    stock = _user_setup(FAMILIES[family]())
    pipe = enable_jit(stock, "7x")
    kw = _call_inputs(family, torch.bfloat16) | dict(output_type="latent", num_inference_steps=7)

    # maybe_free_model_hooks at the end of a call removes the hooks and installs new ones (the old
    # objects are kept alive here so that no new one can reuse an old one's id)
    old = list(stock._all_hooks)
    stock(**kw, generator=torch.Generator().manual_seed(0))
    assert len(stock._all_hooks) == len(old) and not {id(h) for h in stock._all_hooks} & {id(h) for h in old}

    old = list(pipe._all_hooks)
    out = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert len(pipe._all_hooks) == len(old) and not {id(h) for h in pipe._all_hooks} & {id(h) for h in old}
    assert pipe.last_jit_report is not None and out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    for p in (stock, pipe):
        assert {t.dtype for t in p.transformer.parameters()} == {torch.bfloat16}
        assert {t.dtype for t in p.vae.parameters()} == {torch.bfloat16}
    # and offload changes nothing in the result: the same run without it
    plain = enable_jit(FAMILIES[family]().to(torch.bfloat16), "7x")
    assert torch.equal(out, plain(**kw, generator=torch.Generator().manual_seed(0)).images)


def test_fp16_pipeline_stays_fp16():
    stock = build_pipe().to(torch.float16)
    pipe = enable_jit(stock, "7x")
    for p in (stock, pipe):
        assert {t.dtype for t in chain(p.transformer.parameters(), p.vae.parameters())} == {torch.float16}


def test_fp8_layerwise_casting_storage_is_kept_through_enable_jit_and_a_call():
    stock = build_pipe().to(torch.bfloat16)
    stock.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    storage = {n: t.dtype for n, t in stock.transformer.named_parameters()}
    assert torch.float8_e4m3fn in storage.values()
    pipe = enable_jit(stock, "7x")
    assert {n: t.dtype for n, t in stock.transformer.named_parameters()} == storage
    kw = _call_inputs("flux", torch.bfloat16) | dict(output_type="latent")
    out = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(out.float()).all()
    assert {n: t.dtype for n, t in pipe.transformer.named_parameters()} == storage


def test_sequential_offload_state_is_carried():
    # Running it needs an accelerator (accelerate's meta-device offload fails on CPU tensors here, stock
    # pipeline included); the state that makes it work lives on the modules plus the offload device.
    stock = build_pipe()
    stock.enable_sequential_cpu_offload(device="cpu")
    before = snapshot(stock)
    pipe = enable_jit(stock, "7x")
    assert snapshot(stock) == before
    assert pipe._offload_device == stock._offload_device and pipe._execution_device == stock._execution_device
    assert pipe.transformer._hf_hook is stock.transformer._hf_hook


def test_group_offload_runs_and_matches_the_plain_pipeline():
    kw = _call_inputs("flux", torch.float32) | dict(output_type="latent")
    plain = enable_jit(build_pipe(), "7x")(**kw, generator=torch.Generator().manual_seed(0)).images
    stock = build_pipe()
    stock.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    before = snapshot(stock)
    pipe = enable_jit(stock, "7x")
    assert snapshot(stock) == before
    out = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(out, plain)


def test_progress_bar_config_is_carried(capsys):
    stock = build_pipe()
    stock.set_progress_bar_config(disable=False, desc="jit-progress")
    pipe = enable_jit(stock, "7x")
    pipe(**prompt_inputs(), height=64, width=64, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert "jit-progress" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# save_pretrained writes the stock folder.

def test_saved_jit_pipeline_is_the_stock_folder_and_loads_both_ways(tmp_path):
    from diffusers import DiffusionPipeline, FluxPipeline

    stock = build_pipe()
    stock.transformer.eval()
    stock.save_pretrained(tmp_path / "stock")
    pipe = enable_jit(stock, "7x")
    pipe.save_pretrained(tmp_path / "jit")
    assert json.loads((tmp_path / "jit" / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    cmp = filecmp.dircmp(tmp_path / "stock", tmp_path / "jit")

    def same(c):
        assert not c.left_only and not c.right_only and not c.diff_files, (c.left_only, c.right_only, c.diff_files)
        match, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        assert not mismatch and not errors, mismatch
        for sub in c.subdirs.values():
            same(sub)

    same(cmp)

    loaded = DiffusionPipeline.from_pretrained(tmp_path / "jit", **NO_TEXT)
    assert type(loaded) is FluxPipeline
    back = JiTFluxPipeline.from_pretrained(tmp_path / "jit", **NO_TEXT)
    assert type(back) is JiTFluxPipeline
    again = enable_jit(loaded, "7x")
    for p in (loaded, back):
        p.set_progress_bar_config(disable=True)
    kw = prompt_inputs() | dict(height=128, width=128, output_type="latent")
    a = again(**kw, generator=torch.Generator().manual_seed(0)).images
    b = back(**kw, generator=torch.Generator().manual_seed(0), jit="7x").images
    assert torch.equal(a, b)
    # the weights loaded back are the saved ones (outputs of a reloaded model may differ by an ulp on CPU)
    ref = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# token_bucket and the attention backend.

@pytest.fixture
def restore_backend():
    """set_attention_backend also sets diffusers' process-wide active backend: put the previous one back."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(before)


def _forward_counter(transformer):
    calls = []
    handle = transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("how", ["set_attention_backend", "context"])
def test_token_bucket_with_a_maskless_attention_backend_is_refused_before_any_work(how, restore_backend):
    import contextlib

    from diffusers.models.attention_dispatch import attention_backend

    pipe = enable_jit(build_pipe(), JiTConfig.preset("7x").replace(token_bucket=16))
    calls, handle = _forward_counter(pipe.transformer)
    try:
        ctx = attention_backend("_native_flash") if how == "context" else contextlib.nullcontext()
        if how == "set_attention_backend":
            pipe.transformer.set_attention_backend("_native_flash")
        with ctx, pytest.raises(ValueError, match=r"token_bucket=16 .*'_native_flash'.*token_bucket=0"):
            pipe(**prompt_inputs(), height=128, width=128, output_type="latent")
        assert calls == []
    finally:
        handle.remove()


def test_token_bucket_runs_with_a_backend_that_takes_a_mask(restore_backend):
    pipe = enable_jit(build_pipe(), JiTConfig.preset("7x").replace(token_bucket=16))
    ref = pipe(**prompt_inputs(), height=128, width=128, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    pipe.transformer.set_attention_backend("_native_math")
    out = pipe(**prompt_inputs(), height=128, width=128, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # without token_bucket a maskless backend is not refused (it needs no mask)
    pipe2 = enable_jit(build_pipe(), "7x")
    from jit_sampler.pipelines.checks import check_token_bucket_backend
    pipe2.transformer.set_attention_backend("_native_flash")
    check_token_bucket_backend(pipe2.transformer, 0)
    with pytest.raises(ValueError, match="token_bucket"):
        check_token_bucket_backend(pipe2.transformer, 64)


def test_token_bucket_with_a_varlen_backend_only_without_context_parallelism():
    # The varlen kernels read a key mask as per-row key counts: right for trailing padding (one process),
    # wrong for Ulysses' per-rank padding. The backends are set on the processors directly (setting them
    # through diffusers checks that the flash-attn / sageattention packages are installed).
    from types import SimpleNamespace

    from diffusers.models.attention_dispatch import AttentionBackendName

    from jit_sampler.pipelines.checks import check_token_bucket_backend

    transformer = build_pipe().transformer
    for proc in transformer.attn_processors.values():
        proc._attention_backend = AttentionBackendName.FLASH_VARLEN
    check_token_bucket_backend(transformer, 64)
    transformer._parallel_config = SimpleNamespace(context_parallel_config=SimpleNamespace(ulysses_degree=2,
                                                                                           ring_degree=1))
    with pytest.raises(ValueError, match="'flash_varlen' does not take under context parallelism"):
        check_token_bucket_backend(transformer, 64)
    for proc in transformer.attn_processors.values():
        proc._attention_backend = AttentionBackendName.XFORMERS  # reads a boolean mask as a bias: refused
    transformer._parallel_config = None
    with pytest.raises(ValueError, match="'xformers'"):
        check_token_bucket_backend(transformer, 64)
