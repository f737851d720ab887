"""JiT + cache-dit (jit_sampler.pipelines.cache_dit) on the tiny FLUX.1 / FLUX.2-klein pipelines.

The fixtures' transformers have one block of each kind, and cache-dit always computes the first
block of a context (``Fn_compute_blocks >= 1``), so these tests use the same tiny pipelines with a
2 + 2 block transformer: the second block of each kind is what the cache can skip.
"""

from __future__ import annotations

import pytest
import torch

# an optional dependency (the `cache-dit` / `test` extras); a GPU box without it still runs the rest
cache_dit = pytest.importorskip("cache_dit")
from cache_dit import DBCacheConfig  # noqa: E402
from diffusers import FluxPipeline, FluxTransformer2DModel  # noqa: E402

from tests._fixtures.flux import build_pipe, prompt_inputs  # noqa: E402
from jit_sampler import JiTConfig, JiTFluxPipeline, disable_cache_dit, enable_cache_dit, use_cache_dit  # noqa: E402

H = W = 128  # an 8 x 8 token grid


def _pipe(cls=JiTFluxPipeline, seed: int = 5):
    """The fixture pipeline of class ``cls`` with a 2 + 2 block transformer drawn from ``seed``."""
    pipe = build_pipe(cls)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tr = FluxTransformer2DModel.from_config({**pipe.transformer.config, "num_layers": 2, "num_single_layers": 2})
    pipe.register_modules(transformer=tr)
    return pipe


def _config(**over):
    d = dict(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=1, residual_diff_threshold=0.5)
    d.update(over)
    return DBCacheConfig(**d)


class BlockLog:
    """Per transformer forward: (image tokens, block forwards it ran). Hooks stay on the blocks,
    so they see cache-dit's skipping; removed on exit."""

    def __init__(self, tr):
        self.tr, self.calls, self._h = tr, [], []

    def __enter__(self):
        self._h.append(self.tr.register_forward_pre_hook(
            lambda m, a, k: self.calls.append([k["hidden_states"].shape[1], 0]), with_kwargs=True))
        for b in [*self.tr.transformer_blocks, *self.tr.single_transformer_blocks]:
            self._h.append(b.register_forward_hook(lambda *a: self.calls[-1].__setitem__(1, self.calls[-1][1] + 1)))
        return self

    def __exit__(self, *exc):
        for h in self._h:
            h.remove()
        return False

    @property
    def blocks(self) -> int:
        return sum(c[1] for c in self.calls)


def _run(pipe, jit="7x", **kw):
    with BlockLog(pipe.transformer) as log:
        y = pipe(**prompt_inputs(), height=H, width=W, output_type="latent",
                 generator=torch.Generator().manual_seed(0), jit=jit, **kw).images
    return y, log


def _negative():
    return dict(true_cfg_scale=2.0, **prompt_inputs(seed=7, prefix="negative_"))


def test_cache_dit_jit7x_skips_blocks_and_resets_at_every_stage():
    pipe = _pipe()
    y0, dense = _run(pipe)
    state = enable_cache_dit(pipe, _config())
    y1, cached = _run(pipe)
    y2, _ = _run(pipe)
    stages = [c[0] for c in cached.calls]
    transitions = sum(a != b for a, b in zip(stages, stages[1:]))
    assert transitions == 2 and len(cached.calls) == len(dense.calls) == 11
    assert cached.blocks < dense.blocks == 44 and not torch.equal(y0, y1)
    # The first step of every stage (after a reset) runs every block; later steps skip some.
    firsts = [c for i, c in enumerate(cached.calls) if i == 0 or stages[i] != stages[i - 1]]
    assert [c[1] for c in firsts] == [4, 4, 4]
    assert any(c[1] < 4 for c in cached.calls)
    assert state.calls == 2 and state.transition_resets == 2 * transitions
    assert state.resets == 2 * (1 + transitions + 1)  # per call: its start + one per stage
    assert torch.equal(y1, y2)  # fresh contexts per call: the same seed gives the same latents


def test_cache_dit_flux_velocity_counts_transition_resets():
    from diffusers.hooks import FirstBlockCacheConfig

    from jit_eval.rivals import cache_hook
    from jit_eval.tiny_flux import load_tiny_flux, sample_tiny
    from jit_eval.tiny_flux.velocity import TinyVelocity
    from jit_sampler import jit_sample
    from jit_sampler.schedule import beta_sigmas

    model = load_tiny_flux()
    order = list(model.transformer._modules)
    cfg = JiTConfig.preset("7x")
    labels, noise = torch.tensor([1, 8]), torch.randn(2, 256, 4, generator=torch.Generator().manual_seed(3))
    y0, _ = sample_tiny(model, labels, noise, cfg, cfg_scale=3.0)
    with use_cache_dit(model.transformer, _config(residual_diff_threshold=0.3)) as state, \
            BlockLog(model.transformer) as log:
        fn = TinyVelocity(model, labels, 3.0)
        y1, rep = jit_sample(fn, noise, 16, 16, beta_sigmas(cfg.total_steps, cfg.beta_alpha, cfg.beta_beta), cfg,
                             torch.Generator().manual_seed(0))
        cfg_mode = state._manager.get_context(state._names[0]).cache_config.enable_separate_cfg
    assert fn.cache_resets == 2 == state.transition_resets and cfg_mode is True
    assert log.blocks < 4 * len(log.calls) and torch.isfinite(y1).all()
    assert "forward" not in model.transformer.__dict__ and not hasattr(model.transformer, "_jit_cache_dit")
    y2, _ = sample_tiny(model, labels, noise, cfg, cfg_scale=3.0)
    assert torch.equal(y0, y2)  # removed on exit: the uncached result again
    # cache-dit's block swap must not reorder the submodules: diffusers' First-Block Cache hooks
    # the first block in module order as its leader (it crashed on the single blocks' leader).
    assert list(model.transformer._modules) == order
    with cache_hook(model.transformer, FirstBlockCacheConfig(threshold=0.1)):
        y3, _ = sample_tiny(model, labels, noise, cfg, cfg_scale=3.0)
    assert torch.isfinite(y3).all()


def test_cache_dit_affects_only_its_instance():
    pipe, other = _pipe(), _pipe()
    # The call JiTFluxPipeline resolves (its own or its FLUX.1 mixin's) and what its class dict holds.
    call_cls, own_cls = JiTFluxPipeline.__call__, JiTFluxPipeline.__dict__.get("__call__")
    call_base = FluxPipeline.__dict__["__call__"]
    y_other, _ = _run(other)
    y_pipe, _ = _run(pipe)
    shared = JiTFluxPipeline.from_pipe(pipe)  # same transformer object
    assert shared.transformer is pipe.transformer
    enable_cache_dit(pipe, _config())
    assert JiTFluxPipeline.__call__ is call_cls and JiTFluxPipeline.__dict__.get("__call__") is own_cls
    assert FluxPipeline.__dict__["__call__"] is call_base
    assert not hasattr(JiTFluxPipeline, "_is_cached") and not hasattr(FluxPipeline, "_is_cached")
    assert "_call_contexts" not in JiTFluxPipeline.__dict__ or JiTFluxPipeline._call_contexts == ()
    _, cached = _run(pipe)
    y2, log2 = _run(other)
    y3, log3 = _run(shared)
    assert cached.blocks < 44
    assert torch.equal(y2, y_other) and log2.blocks == 44  # another instance: untouched
    assert torch.equal(y3, y_pipe) and log3.blocks == 44  # sharing the transformer, outside pipe's calls
    with pytest.raises(ValueError, match="already carries cache-dit"):
        enable_cache_dit(shared)


def test_cache_dit_jit_none_is_stock_pipeline_with_cache_dit():
    pipe = _pipe()
    y_plain, _ = _run(pipe, jit=None, num_inference_steps=8)
    enable_cache_dit(pipe, _config())
    y, log = _run(pipe, jit=None, num_inference_steps=8)
    assert log.blocks < 32 and not torch.equal(y, y_plain)
    stock = _pipe(FluxPipeline)  # the same weights in a stock FluxPipeline, cached by cache-dit itself
    tr = stock.transformer
    adapter = cache_dit.BlockAdapter(pipe=stock, transformer=tr, blocks=[tr.transformer_blocks, tr.single_transformer_blocks],
                                     forward_pattern=[cache_dit.ForwardPattern.Pattern_1] * 2, check_forward_pattern=True)
    cache_dit.enable_cache(adapter, cache_config=_config())
    try:
        y_ref = stock(**prompt_inputs(), height=H, width=W, output_type="latent", num_inference_steps=8,
                      generator=torch.Generator().manual_seed(0)).images
    finally:
        cache_dit.disable_cache(stock)
    assert torch.equal(y, y_ref)


def test_cache_dit_true_cfg_separate_contexts():
    pipe = _pipe()
    y0, dense = _run(pipe, **_negative())
    state = enable_cache_dit(pipe, _config())
    y1, cached = _run(pipe, **_negative())
    ctx = state._manager.get_context(state._names[0])
    assert ctx.cache_config.enable_separate_cfg is True and ctx.cache_config.cfg_compute_first is False
    assert len(dense.calls) == len(cached.calls) == 22 and cached.blocks < dense.blocks
    # Cond and uncond keep their own cache: both branches skip blocks, cond at even forwards.
    assert ctx.get_cached_steps() and ctx.get_cfg_cached_steps()
    y2, _ = _run(pipe, **_negative())
    assert torch.equal(y1, y2) and not torch.equal(y0, y1)
    _run(pipe)  # the next call without CFG switches the mode back
    assert state._manager.get_context(state._names[0]).cache_config.enable_separate_cfg is False
    assert state.cache_config.enable_separate_cfg is False  # the stored config is untouched


def test_cache_dit_disable_restores_the_pipeline():
    pipe = _pipe()
    tr = pipe.transformer
    order = list(tr._modules)
    y0, _ = _run(pipe)
    y0_anchor, _ = _run(pipe, anchor_attention=True)
    state = enable_cache_dit(pipe, _config())
    _, log_anchor = _run(pipe, anchor_attention=True)  # composes with the fused attention processor
    assert log_anchor.blocks < 44 and state.calls == 1  # the nested anchor_attention call is one call
    disable_cache_dit(pipe)
    assert state.removed and "cache_dit" not in pipe.__dict__ and pipe._call_contexts == ()
    for m in [tr, *tr.transformer_blocks, *tr.single_transformer_blocks]:
        assert "forward" not in m.__dict__
    for attr in ("_is_cached", "_context_manager", "_context_names", "_jit_cache_dit", "_jit_stage_hook"):
        assert not hasattr(tr, attr), attr
    y1, log = _run(pipe)
    assert torch.equal(y0, y1) and log.blocks == 44
    assert list(tr._modules) == order  # cache-dit's block swap moved the block lists to the end
    assert torch.equal(y0_anchor, _run(pipe, anchor_attention=True)[0])
    with pytest.raises(ValueError, match="not enabled"):
        disable_cache_dit(pipe)
    enable_cache_dit(pipe, _config())  # and it can be enabled again
    assert _run(pipe)[1].blocks < 44
    disable_cache_dit(pipe)


def test_cache_dit_bad_inputs_raise_before_work():
    pipe = _pipe()
    with pytest.raises(TypeError, match="JiT pipeline"):
        enable_cache_dit(_pipe(FluxPipeline))
    with pytest.raises(TypeError, match="unsupported cache-dit options"):
        enable_cache_dit(pipe, parallelism_config=object())
    with pytest.raises(TypeError, match="DBCacheConfig"):
        enable_cache_dit(pipe, {"Fn_compute_blocks": 1})
    assert "forward" not in pipe.transformer.__dict__ and not hasattr(pipe.transformer, "_is_cached")
    user = _config()
    state = enable_cache_dit(pipe, user)
    assert user.enable_separate_cfg is None  # cache-dit fills in a copy, not the caller's config
    with pytest.raises(ValueError, match="already enabled"):
        enable_cache_dit(pipe, _config())
    batch = {k: v.repeat(2, *[1] * (v.dim() - 1)) for k, v in prompt_inputs().items()}
    with BlockLog(pipe.transformer) as log, pytest.raises(NotImplementedError, match="per-sample"):
        pipe(**batch, height=H, width=W, output_type="latent", jit=JiTConfig.preset("7x", anchor_policy="per_sample"))
    assert log.calls == [] and "forward" not in pipe.transformer.__dict__  # nothing ran; cache-dit off again
    disable_cache_dit(pipe)
    assert state.removed


def test_cache_dit_flux2_klein():
    from diffusers import Flux2Transformer2DModel

    from tests._fixtures.flux2 import build_klein, embeds
    from jit_sampler import JiTFlux2KleinPipeline

    pipe = JiTFlux2KleinPipeline.from_pipe(build_klein())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        tr = Flux2Transformer2DModel.from_config({**pipe.transformer.config, "num_layers": 2,
                                                  "num_single_layers": 2}).eval()
    pipe.register_modules(transformer=tr)
    kw = dict(prompt_embeds=embeds(), negative_prompt_embeds=embeds(seed=2), guidance_scale=4.0, height=H, width=W,
              output_type="latent")

    def run():
        with BlockLog(tr) as log:
            return pipe(**kw, generator=torch.Generator().manual_seed(0), jit="7x").images, log

    y0, dense = run()
    state = enable_cache_dit(pipe, _config(residual_diff_threshold=5.0))
    y1, cached = run()
    assert cached.blocks < dense.blocks and state.transition_resets == 2 and not torch.equal(y0, y1)
    disable_cache_dit(pipe)
    y2, _ = run()
    assert torch.equal(y0, y2)


@pytest.mark.slow
def test_cache_dit_rows_in_the_quality_suite():
    from benchmarks import quality as q
    from jit_eval.rivals import BlockWorkCounter, cache_hook
    from jit_eval.tiny_flux import load_tiny_flux

    by = {m.name: m for m in q.build_methods(quick=True)}
    plain, cached = by["JiT 4x assign/independent"], by["JiT 4x + cache-dit F1B0 0.2"]
    assert cached.family == "jit+cache" and cached.headline
    model = load_tiny_flux()
    labels, noise = torch.arange(4), torch.randn(4, 256, 4, generator=torch.Generator().manual_seed(0))
    out = {}
    for m in (plain, cached, cached):  # run the suite's way; twice cached: the suite demands repeatable images
        with cache_hook(model.transformer, m.cache), BlockWorkCounter(model.transformer) as counter:
            y, steps = m.run(model, labels, noise, 0, 3.0)
        out.setdefault(m.name, []).append((y, counter.flops, counter.forwards))
    (y0, f0, n0), = out[plain.name]
    (y1, f1, n1), (y2, _, _) = out[cached.name]
    assert n1 == n0 and f1 < f0 and torch.equal(y1, y2) and not torch.equal(y0, y1)
    assert "forward" not in model.transformer.__dict__ and not hasattr(model.transformer, "_jit_cache_dit")
