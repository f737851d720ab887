"""Few-step runs (FLUX.1-schnell, distilled FLUX.2-klein, img2img): the stage layout for small step counts.

The rule (JiTConfig docstring, docs/method.md section 6): never an empty stage, never a
transition at step 0, the last stage dense; ``int(n * r)`` unchanged wherever it is valid;
colliding ends clamped; with fewer steps than stages the sparsest stages are dropped.
"""

from __future__ import annotations

import pathlib
import random

import pytest
import torch

import tests._fixtures.flux  # noqa: F401  (one torch thread)
from jit_sampler import JiTConfig, jit_sample, make_plan
from jit_sampler.schedule import beta_sigmas, resolve_stages, stage_layout

torch.set_num_threads(1)

FOUR_STAGE = dict(stage_ratios=(0.3, 0.5, 0.7, 1.0), token_ratios=(0.2, 0.4, 0.7, 1.0))
CONFIGS = {
    "4x": lambda n: JiTConfig.preset("4x", total_steps=n),
    "7x": lambda n: JiTConfig.preset("7x", total_steps=n),
    "4-stage": lambda n: JiTConfig(total_steps=n, **FOUR_STAGE),
}

#: The documented table (docs/method.md section 6): steps -> (steps per stage, tokens per stage at 64 x 64).
TABLE = {
    "4x": {1: ("1", "4096"), 2: ("1 / 1", "2539 / 4096"), 3: ("1 / 1 / 1", "1433 / 2539 / 4096"),
           4: ("1 / 1 / 2", "1433 / 2539 / 4096"), 5: ("2 / 1 / 2", "1433 / 2539 / 4096"),
           6: ("2 / 1 / 3", "1433 / 2539 / 4096"), 7: ("2 / 2 / 3", "1433 / 2539 / 4096"),
           8: ("3 / 2 / 3", "1433 / 2539 / 4096")},
    "7x": {1: ("1", "4096"), 2: ("1 / 1", "2457 / 4096"), 3: ("1 / 1 / 1", "1310 / 2457 / 4096"),
           4: ("1 / 1 / 2", "1310 / 2457 / 4096"), 5: ("2 / 1 / 2", "1310 / 2457 / 4096"),
           6: ("2 / 1 / 3", "1310 / 2457 / 4096"), 7: ("2 / 2 / 3", "1310 / 2457 / 4096"),
           8: ("3 / 2 / 3", "1310 / 2457 / 4096")},
}


def _raw_ends(n, ratios):
    return [int(n * r) for r in ratios]


def _raw_valid(ends):
    return ends[0] >= 1 and all(b > a for a, b in zip(ends, ends[1:]))


def _check_layout(cfg: JiTConfig, n_tokens: int = 4096):
    """Every invariant of a layout, through the config, schedule and plan views."""
    n, k_all = cfg.total_steps, len(cfg.stage_ratios)
    steps, ends = cfg.stage_steps, cfg.stage_ends
    assert cfg.num_stages == min(n, k_all) == len(steps) == len(ends)
    assert cfg.effective_stages == tuple(range(max(0, k_all - n), k_all))  # the densest stages
    assert all(s >= 1 for s in steps) and sum(steps) == n  # no empty stage
    assert ends[0] >= 1 and ends[-1] == n  # no transition at step 0
    assert cfg.stage_token_ratios[-1] == 1.0  # the last stage is dense
    counts = cfg.token_counts(n_tokens)
    assert len(counts) == cfg.num_stages and counts[-1] == n_tokens
    assert counts == [max(1, int(n_tokens * cfg.token_ratios[k])) for k in cfg.effective_stages[:-1]] + [n_tokens]
    layout = stage_layout(n, cfg.stage_ratios)
    assert layout == [s for s, c in enumerate(steps) for _ in range(c)]
    plan = make_plan(cfg, 64, 64, beta_sigmas(n))
    assert list(plan.stage_of_step) == layout and plan.token_counts == tuple(counts)
    assert not plan.is_transition(0) and plan.active_tokens[-1] == n_tokens
    assert sum(plan.is_transition(i) for i in range(n)) == cfg.num_stages - 1
    fse = sum(s * cfg.token_ratios[k] for s, k in zip(steps, cfg.effective_stages))
    assert cfg.full_step_equivalents() == pytest.approx(fse)
    assert cfg.full_step_equivalents() == pytest.approx(sum(plan.active_tokens) / n_tokens, abs=n * 1e-3)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("steps", range(1, 9))
def test_layout_invariants(name, steps):
    _check_layout(CONFIGS[name](steps))


def test_four_stage_layouts():
    # n < K drops the sparsest; n = 4 clamps 1 / 2 / 2 / 4 to 1 / 2 / 3 / 4; n >= 5 is int(n * r).
    want = {1: (3,), 2: (2, 3), 3: (1, 2, 3), 4: (0, 1, 2, 3), 5: (0, 1, 2, 3)}
    steps = {1: [1], 2: [1, 1], 3: [1, 1, 1], 4: [1, 1, 1, 1], 5: [1, 1, 1, 2], 6: [1, 2, 1, 2]}
    for n, kept in want.items():
        assert CONFIGS["4-stage"](n).effective_stages == kept
    for n, s in steps.items():
        assert CONFIGS["4-stage"](n).stage_steps == s
    assert CONFIGS["4-stage"](2).token_counts(100) == [70, 100]


@pytest.mark.parametrize("name", ["4x", "7x"])
def test_documented_table(name):
    doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "method.md").read_text()
    for n, (steps, tokens) in TABLE[name].items():
        cfg = CONFIGS[name](n)
        assert " / ".join(map(str, cfg.stage_steps)) == steps
        assert " / ".join(map(str, cfg.token_counts(4096))) == tokens
        fse = f"{cfg.full_step_equivalents():.2f}"
        assert f"| {name} | {n} | {steps} | {tokens} | {fse} |" in doc, f"docs/method.md lacks the {name} row for {n}"


def test_presets_unchanged():
    c4, c7 = JiTConfig.preset("4x"), JiTConfig.preset("7x")
    assert (c4.stage_ends, c4.stage_steps, c4.effective_stages) == ([7, 11, 18], [7, 4, 7], (0, 1, 2))
    assert (c7.stage_ends, c7.stage_steps, c7.effective_stages) == ([4, 7, 11], [4, 3, 4], (0, 1, 2))
    assert stage_layout(18, c4.stage_ratios) == [0] * 7 + [1] * 4 + [2] * 7
    assert c4.full_step_equivalents() == pytest.approx(11.93) and c7.full_step_equivalents() == pytest.approx(7.08)
    for name in ("reference", "7x-reference"):
        ref = JiTConfig.preset(name)
        assert ref.stage_ends == _raw_ends(ref.total_steps, ref.stage_ratios) and ref.num_stages == 3


def test_int_rule_kept_wherever_it_was_valid():
    # Every (ratios, n) the old validation accepted keeps exactly int(n * r); every other one
    # is now valid too. Random ratio sets, including ones crowded near 0 and near 1.
    rng = random.Random(0)
    sets = [(0.4, 0.65, 1.0), (0.25, 0.5, 0.75, 1.0), (0.3, 0.5, 0.7, 1.0), (0.9, 0.95, 1.0), (0.01, 0.02, 1.0),
            (0.5, 1.0), (1.0,)]
    for _ in range(40):
        k = rng.randint(1, 6)
        sets.append(tuple(sorted(rng.sample([rng.random() for _ in range(20)], k - 1))) + (1.0,))
    changed = 0
    for ratios in sets:
        for n in range(1, 120):
            lay = resolve_stages(n, ratios)
            ends, raw = list(lay.ends), _raw_ends(n, ratios)
            assert ends[0] >= 1 and ends[-1] == n and all(b > a for a, b in zip(ends, ends[1:]))
            assert lay.stages[-1] == len(ratios) - 1 and len(lay.stages) == min(n, len(ratios))
            if _raw_valid(raw):
                assert ends == raw, (ratios, n)
            elif n >= len(ratios):
                changed += 1
                # Minimal fix-up: an end moves only if it collides, and never past its neighbours' room.
                for j, (e, r) in enumerate(zip(ends, raw)):
                    lo = ends[j - 1] + 1 if j else 1
                    hi = n - (len(ratios) - 1 - j)
                    assert e == min(max(r, lo), hi), (ratios, n, ends, raw)
    assert changed > 0  # the fix-up was exercised


def test_bad_layout_inputs():
    with pytest.raises(ValueError, match="total_steps"):
        resolve_stages(0, (0.4, 1.0))
    with pytest.raises(ValueError, match="total_steps"):
        stage_layout(True, (0.4, 1.0))
    with pytest.raises(ValueError, match="stage_ratios"):
        resolve_stages(3, ())
    with pytest.raises(ValueError, match="JiTConfig.total_steps"):
        JiTConfig.preset("7x", total_steps=0)


# --------------------------------------------------------------------------- jit_sample
H = W = 8
N, C = H * W, 4


class _Recorder:
    """A dummy velocity field that records the active-token count of every call."""

    def __init__(self):
        self.tokens = []

    def __call__(self, x, idx, sigma, step):
        self.tokens.append(int(x.shape[1]))
        pos = idx.to(x.dtype).unsqueeze(-1) / N
        return 0.6 * x + torch.sin(3.0 * pos + sigma) + 0.1 * x.roll(1, dims=-1)


def _run(cfg, seed=1):
    x = torch.randn(2, N, C, generator=torch.Generator().manual_seed(0))
    rec = _Recorder()
    y, rep = jit_sample(rec, x, H, W, beta_sigmas(cfg.total_steps), cfg, torch.Generator().manual_seed(seed))
    return y, rep, rec


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("steps", range(1, 9))
def test_jit_sample_runs_the_layout(name, steps):
    cfg = CONFIGS[name](steps)
    y, rep, rec = _run(cfg)
    counts = cfg.token_counts(N)
    want = [counts[s] for s in stage_layout(steps, cfg.stage_ratios)]
    assert rep.active_tokens == want == rec.tokens and rep.model_evals == steps
    assert rep.stage_of_step == stage_layout(steps, cfg.stage_ratios)
    # One transition at the start of every stage after the first (never at step 0), adding the budget difference.
    assert rep.new_tokens == {e: counts[k + 1] - counts[k] for k, e in enumerate(cfg.stage_ends[:-1])}
    assert 0 not in rep.new_tokens
    assert rep.full_step_equivalents == pytest.approx(sum(want) / N)
    assert y.shape == (2, N, C) and torch.isfinite(y).all()
    y2, _, _ = _run(cfg)
    assert torch.equal(y, y2)  # same seed, same inputs: bit-identical


def test_one_step_is_dense_euler():
    x = torch.randn(2, N, C, generator=torch.Generator().manual_seed(0))
    y, rep, _ = _run(JiTConfig.preset("7x", total_steps=1))
    yd, _, _ = _run(JiTConfig.dense(1))
    v = _Recorder()(x, torch.arange(N), 1.0, 0)
    assert torch.equal(y, yd) and torch.equal(y, x - v)  # sigmas [1, 0]: y = x + (0 - 1) * v
    assert rep.active_tokens == [N] and rep.new_tokens == {}


def test_two_steps_run_the_two_densest_stages():
    # 7x at 2 steps is exactly a two-stage (60 % -> 100 %) config: same budgets, same draws.
    y, rep, _ = _run(JiTConfig.preset("7x", total_steps=2))
    two = JiTConfig(total_steps=2, stage_ratios=(0.5, 1.0), token_ratios=(0.60, 1.0))
    y2, rep2, _ = _run(two)
    assert rep.active_tokens == rep2.active_tokens == [int(N * 0.6), N]
    assert torch.equal(y, y2)
    assert rep.new_tokens == {1: N - int(N * 0.6)}


def test_init_anchors_follow_the_first_stage_that_runs():
    cfg = JiTConfig.preset("7x", total_steps=2)
    m0 = cfg.token_counts(N)[0]
    anchors = torch.randperm(N, generator=torch.Generator().manual_seed(3))[:m0]
    x = torch.randn(1, N, C)
    y, rep = jit_sample(_Recorder(), x, H, W, beta_sigmas(2), cfg.replace(init_anchors=anchors))
    assert rep.active_tokens == [m0, N]
    wrong = torch.arange(JiTConfig.preset("7x").token_counts(N)[0])  # sized for the dropped 32 % stage
    calls = _Recorder()
    with pytest.raises(ValueError, match="drop the 1 sparsest stage"):
        jit_sample(calls, x, H, W, beta_sigmas(2), cfg.replace(init_anchors=wrong))
    assert calls.tokens == []  # refused before the first model call


# --------------------------------------------------------------------------- pipelines
@pytest.fixture(scope="module")
def flux_pipe():
    from tests._fixtures.flux import build_pipe

    from jit_sampler import JiTFluxPipeline

    p = JiTFluxPipeline.from_pipe(build_pipe())
    p.set_progress_bar_config(disable=True)
    return p


class _TokenLog:
    def __init__(self, tr):
        self.tr, self.tokens = tr, []

    def __enter__(self):
        orig = self.tr.forward

        def fwd(*a, **kw):
            self.tokens.append(kw["hidden_states"].shape[1])
            return orig(*a, **kw)

        self.tr.forward = fwd
        return self

    def __exit__(self, *exc):
        del self.tr.forward


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_flux_pipeline_7x_few_steps(flux_pipe, steps):
    from tests._fixtures.flux import prompt_inputs

    kw = dict(height=128, width=128, output_type="latent", num_inference_steps=steps, **prompt_inputs())
    with _TokenLog(flux_pipe.transformer) as log:
        out = flux_pipe(generator=torch.Generator().manual_seed(0), jit="7x", **kw).images
    rep = flux_pipe.last_jit_report
    cfg = JiTConfig.preset("7x", total_steps=steps)
    counts = cfg.token_counts(64)  # 128 x 128 -> an 8 x 8 token grid
    want = [counts[s] for s in stage_layout(steps, cfg.stage_ratios)]
    assert rep.active_tokens == want == log.tokens and rep.steps == steps
    assert torch.isfinite(out).all()
    again = flux_pipe(generator=torch.Generator().manual_seed(0), jit="7x", **kw).images
    assert torch.equal(out, again)
    if steps == 1:  # one step: dense Euler on the same Beta schedule
        dense = flux_pipe(generator=torch.Generator().manual_seed(0), jit=JiTConfig.dense(1), **kw).images
        assert torch.equal(out, dense)


def test_klein_distilled_four_steps():
    from tests._fixtures.flux2 import build_klein, embeds

    from jit_sampler.pipelines.flux2_klein import JiTFlux2KleinPipeline

    p = JiTFlux2KleinPipeline.from_pipe(build_klein(is_distilled=True))
    p.set_progress_bar_config(disable=True)
    kw = dict(prompt_embeds=embeds(1), height=256, width=256, output_type="latent", num_inference_steps=4)
    with _TokenLog(p.transformer) as log:
        out = p(jit="7x", generator=torch.Generator().manual_seed(0), **kw).images
    rep = p.last_jit_report
    assert rep.active_tokens == [81, 153, 256, 256] == log.tokens  # 16 x 16 grid: 1 / 1 / 2 steps
    assert rep.model_calls == 4 and rep.new_tokens == {1: 72, 2: 103}
    # FLOP accounting follows the stages that ran (image-linear FLOPs are linear in the tokens).
    assert rep.flops["speedup_vs_same_steps"]["image_linear"] == pytest.approx(4 * 256 / (81 + 153 + 2 * 256))
    assert out.shape == (1, 8, 32, 32) and torch.isfinite(out).all()
    again = p(jit="7x", generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(out, again)


def test_schnell_like_four_steps_on_the_pipeline_schedule():
    # FLUX.1-schnell: no guidance embedding, 4 steps, the scheduler's own sigmas.
    from tests._fixtures.flux import build_pipe, prompt_inputs

    from jit_sampler import JiTFluxPipeline

    p = JiTFluxPipeline.from_pipe(build_pipe(guidance_embeds=False))
    p.set_progress_bar_config(disable=True)
    cfg = JiTConfig.preset("7x", sigma_schedule="pipeline")
    kw = dict(height=128, width=128, output_type="latent", num_inference_steps=4, **prompt_inputs())
    with _TokenLog(p.transformer) as log:
        out = p(generator=torch.Generator().manual_seed(0), jit=cfg, **kw).images
    rep = p.last_jit_report
    assert rep.active_tokens == [20, 38, 64, 64] == log.tokens and rep.stage_of_step == [0, 1, 2, 2]
    assert rep.sigmas[0] == pytest.approx(1.0) and rep.sigmas[-1] == 0.0 and len(rep.sigmas) == 5
    assert torch.isfinite(out).all()
