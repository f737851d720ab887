"""No host sync between stage transitions (CUDA only).

A step that is not the first of its stage runs the same ops on the same index tensors as the
step before it: gather, the model, lift + Euler (or the lifted field before a transition). None
of that may read a device value on the host (``.item()``, ``bool(t)``, a data-dependent branch),
so those steps run here under ``torch.cuda.set_sync_debug_mode("error")``, which turns every
synchronising call into an error. The first step of each stage (step 0, the transitions) may
sync: anchors, ITA, DMF and the kernels' one-time index validation happen there.

The kernels' index validation is cached per index tensor (repeated calls with the same tensors
do not re-validate), and a warm-up run compiles every kernel first, so nothing but the sampler
and the velocity callables is measured.

The CPU-side counterpart (mask -> key-length conversions per forward of the anchor-attention
processor) is in tests/pipelines/test_attention_processor.py.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from jit_sampler import JiTConfig, beta_sigmas, jit_sample, make_plan

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _compiled_triton():
    try:
        from jit_kernels.triton.common import INTERPRET
    except Exception:  # no triton: nothing runs through its interpreter
        INTERPRET = False
    if INTERPRET:
        pytest.skip("TRITON_INTERPRET=1 runs the Triton kernels through the host; export TRITON_INTERPRET=0")


def _quiet_steps(cfg: JiTConfig, h: int, w: int, sig) -> set[int]:
    """The steps that are not the first of their stage."""
    plan = make_plan(cfg, h, w, sig)
    return {i for i in range(1, plan.steps) if plan.stage_of_step[i] == plan.stage_of_step[i - 1]}


@contextlib.contextmanager
def _sync_debug_on(quiet: set[int], seen: list[int]):
    """``(interrupt, step_callback)`` for jit_sample that put the steps in ``quiet`` under sync debug "error"."""
    state = {"step": 0}

    def interrupt():  # called at the start of every step, before any of its work
        i = state["step"]
        state["step"] += 1
        if i in quiet:
            seen.append(i)
            torch.cuda.set_sync_debug_mode("error")
        return False

    def after(i, sigma, y):  # called at the end of every step
        torch.cuda.set_sync_debug_mode("default")

    try:
        yield interrupt, after
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_sync_debug_mode_catches_a_sync():
    # The tool itself works here (otherwise the tests below would pass vacuously).
    t = torch.ones(2, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):
            t.sum().item()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _field(x, idx, sigma, step):
    return 0.7 * x + torch.tanh(x.roll(1, dims=-1)) * sigma


@pytest.mark.parametrize("policy", ["shared", "per_sample"])
@pytest.mark.parametrize("preset", ["7x", "4x-reference"])
def test_jit_sample_steps_between_transitions_do_not_sync(policy, preset):
    h = w = 32
    cfg = JiTConfig.preset(preset, anchor_policy=policy)
    sig = beta_sigmas(cfg.total_steps)
    lat = torch.randn(2, h * w, 16, generator=torch.Generator().manual_seed(0)).cuda()
    ref, _ = jit_sample(_field, lat, h, w, sig, cfg, torch.Generator().manual_seed(1))  # warm-up: compiles kernels
    quiet, seen = _quiet_steps(cfg, h, w, sig), []
    with _sync_debug_on(quiet, seen) as (interrupt, after):
        y, rep = jit_sample(_field, lat, h, w, sig, cfg, torch.Generator().manual_seed(1),
                            interrupt=interrupt, step_callback=after)
    assert sorted(seen) == sorted(quiet) and len(quiet) == cfg.total_steps - cfg.num_stages
    assert rep.steps == cfg.total_steps
    torch.testing.assert_close(y, ref)


def test_flux_velocity_with_anchor_attention_does_not_sync():
    # FluxVelocity around a (tiny) FLUX.1 transformer with token_bucket padding and the fused
    # anchor-attention processor on CUDA: the padding mask is one tensor per stage, so its key
    # lengths are read on the host once per stage (at the first step), not per step or layer.
    from tests._fixtures.flux import TXT_TOKENS, build_pipe, prompt_inputs

    from jit_sampler import FluxVelocity
    from jit_sampler.pipelines.attention_processor import use_anchor_attention

    tr = build_pipe().transformer.cuda()
    h, w = 16, 16
    pe = prompt_inputs()
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.stack([torch.zeros(h * w), rows.flatten(), cols.flatten()], 1).float().cuda()
    cfg = JiTConfig.preset("7x", token_bucket=64)
    sig = beta_sigmas(cfg.total_steps)
    lat = torch.randn(1, h * w, 16, generator=torch.Generator().manual_seed(0)).cuda()

    def velocity():
        return FluxVelocity(tr, pe["prompt_embeds"].cuda(), pe["pooled_prompt_embeds"].cuda(),
                            torch.zeros(TXT_TOKENS, 3, device="cuda"), img_ids,
                            guidance=torch.full((1,), 3.5, device="cuda"), token_bucket=64)

    with torch.no_grad(), use_anchor_attention(tr, devices=("cuda",)):
        ref, _ = jit_sample(velocity(), lat, h, w, sig, cfg, torch.Generator().manual_seed(1))  # warm-up
        quiet, seen = _quiet_steps(cfg, h, w, sig), []
        with _sync_debug_on(quiet, seen) as (interrupt, after):
            y, rep = jit_sample(velocity(), lat, h, w, sig, cfg, torch.Generator().manual_seed(1),
                                interrupt=interrupt, step_callback=after)
    assert sorted(seen) == sorted(quiet) and rep.model_calls == cfg.total_steps
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("additive", [False, True])
def test_key_lengths_from_mask_reads_the_device_once(additive):
    import warnings

    from jit_sampler.pipelines.attention_processor import key_lengths_from_mask

    mask = torch.arange(20, device="cuda")[None, :] < torch.tensor([[20], [13]], device="cuda")
    if additive:
        mask = torch.zeros(mask.shape, device="cuda").masked_fill(~mask, float("-inf"))
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            lengths = key_lengths_from_mask(mask, 2, 20)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == 1, [str(w.message) for w in caught]
    assert lengths.tolist() == [20, 13]
