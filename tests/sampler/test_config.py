"""JiTConfig: presets, derived quantities, and every validation error naming its field."""

import pytest
import torch

from jit_sampler import JiTConfig, available_presets


def test_presets_match_method_md():
    c4, c7 = JiTConfig.preset("4x"), JiTConfig.preset("7x")
    assert (c4.total_steps, c4.token_ratios, c4.stage_ratios) == (18, (0.35, 0.62, 1.0), (0.4, 0.65, 1.0))
    assert (c7.total_steps, c7.token_ratios) == (11, (0.32, 0.60, 1.0))
    assert c4.stage_steps == [7, 4, 7] and c7.stage_steps == [4, 3, 4]
    assert c4.stage_ends == [7, 11, 18]
    assert c4.token_counts(4096) == [1433, 2539, 4096]
    assert c7.token_counts(4096) == [1310, 2457, 4096]
    assert c4.full_step_equivalents() == pytest.approx(11.93)
    assert c7.full_step_equivalents() == pytest.approx(7.08)
    for c in (c4, c7):
        assert (c.beta_alpha, c.beta_beta, c.init_grid, c.ita) == (1.4, 0.425, "checkerboard", True)
        assert c.dmf_mode == "assign" and c.dmf_noise == "independent" and c.anchor_policy == "shared"


def test_reference_presets_use_the_released_blend():
    for name, steps in (("reference", 18), ("4x-reference", 18), ("7x-reference", 11)):
        c = JiTConfig.preset(name)
        assert c.total_steps == steps and c.dmf_mode == "blend" and c.relax_steps == 3
        assert c.dmf_weights == (pytest.approx(1 / 3),)
        assert (c.init_grid, c.ita, c.beta_beta) == ("checkerboard", True, 0.425)
    assert set(available_presets()) >= {"4x", "7x", "reference"}


def test_preset_overrides_coerce_and_dense():
    c = JiTConfig.preset("7x", dmf_mode="substeps", dmf_substeps=4)
    assert c.dmf_weights == (0.25, 1 / 3, 0.5, 1.0)
    assert JiTConfig.preset("4x").dmf_weights == (1.0,)
    assert JiTConfig.coerce("7x") == JiTConfig.preset("7x")
    assert JiTConfig.coerce(None) is None and JiTConfig.coerce(c) is c
    with pytest.raises(TypeError):
        JiTConfig.coerce(3)
    d = JiTConfig.dense(5)
    assert d.stage_steps == [5] and d.token_counts(100) == [100]
    assert c.replace(total_steps=20).total_steps == 20


def test_token_counts_small_grids():
    c = JiTConfig.preset("7x")
    assert c.token_counts(1024) == [327, 614, 1024]
    assert c.token_counts(1) == [1, 1, 1]


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("total_steps", dict(total_steps=0)),
        ("total_steps", dict(total_steps=2.5)),
        ("total_steps", dict(total_steps=True)),  # a bool is not a step count (2 steps are fine: tests/sampler/test_few_steps.py)
        ("stage_ratios", dict(stage_ratios=(0.65, 0.4, 1.0))),
        ("stage_ratios", dict(stage_ratios=(0.0, 0.65, 1.0))),
        ("stage_ratios", dict(stage_ratios=(0.4, 0.65, 1.2))),
        ("stage_ratios", dict(stage_ratios=(0.4, 0.65, 0.9))),
        ("stage_ratios", dict(stage_ratios=())),
        ("stage_ratios", dict(stage_ratios="abc")),
        ("token_ratios", dict(token_ratios=(0.62, 0.35, 1.0))),
        ("token_ratios", dict(token_ratios=(-0.1, 0.5, 1.0))),
        ("token_ratios", dict(token_ratios=(0.35, 0.62, 0.9))),
        ("token_ratios", dict(token_ratios=(0.35, 1.0))),
        ("init_grid", dict(init_grid="hex")),
        ("sigma_schedule", dict(sigma_schedule="karras")),
        ("dmf_mode", dict(dmf_mode="ode")),
        ("dmf_noise", dict(dmf_noise="shared")),
        ("dmf_noise", dict(dmf_noise=torch.zeros(4, 3))),
        ("anchor_policy", dict(anchor_policy="mixed")),
        ("backend", dict(backend="metal")),
        ("ita", dict(ita="yes")),
        ("beta_alpha", dict(beta_alpha=0.0)),
        ("beta_beta", dict(beta_beta=float("nan"))),
        ("blur_scale", dict(blur_scale=-1.0)),
        ("relax_steps", dict(relax_steps=0)),
        ("dmf_substeps", dict(dmf_substeps=1.5)),
    ],
)
def test_validation_errors_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=rf"JiTConfig\.{field}\b"):
        JiTConfig(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        JiTConfig.preset("9x")


def test_tensor_noise_accepted():
    c = JiTConfig(dmf_noise=torch.zeros(1, 16, 4))
    assert isinstance(c.dmf_noise, torch.Tensor)


@pytest.mark.parametrize("q", [2, 8, 64])
def test_token_multiple_rounds_budgets_up(q):
    cfg = JiTConfig.preset("7x", token_multiple=q)
    counts = cfg.token_counts(4096)
    assert counts[-1] == 4096 and all(c % q == 0 for c in counts)
    plain = JiTConfig.preset("7x").token_counts(4096)
    assert all(p <= c < p + q for p, c in zip(plain, counts))


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_token_multiple_validation(bad):
    with pytest.raises(ValueError, match="token_multiple"):
        JiTConfig.preset("4x", token_multiple=bad)
