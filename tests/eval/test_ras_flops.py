"""benchmarks.ras_flops: RAS / JiT / RAS in JiT's final stage, tokens chosen by the samplers, real dimensions."""

from benchmarks import ras_flops
from jit_sampler import JiTConfig
from jit_sampler.ras import RASConfig


def test_rows_follow_the_schedules():
    n = ras_flops.N
    rows = {(r["model"], r["method"]): r for r in ras_flops.rows()}
    for model in ("FLUX.1-dev", "SD3.5 Large"):
        ras = rows[(model, "RAS (published defaults: 30 steps, ratio 0.5, start 4, resets 12, 22)")]
        assert ras["full_step_equivalents"] == round(sum(RASConfig().token_counts(n)) / n, 2) == 18.0
        # image-linear FLOPs are linear in the computed tokens
        assert abs(ras["image_linear_vs_same_steps"] - 30 / 18) < 2e-3
        jit7 = rows[(model, "JiT 7x")]
        both = rows[(model, "JiT 7x + RAS 0.5 in the final stage")]
        last = JiTConfig.preset("7x").stage_steps[-1]
        assert abs(both["full_step_equivalents"] - (jit7["full_step_equivalents"] - 0.5 * (last - 1))) < 0.011
        assert both["total_vs_dense50"] > jit7["total_vs_dense50"] > ras["total_vs_dense50"]
        # the K/V cache's attention makes RAS's total ratio smaller than its linear one
        assert ras["total_vs_same_steps"] < ras["image_linear_vs_same_steps"]


def test_tokens_are_the_samplers():
    cfg = RASConfig(num_steps=8, scheduler_start_step=2, error_reset_steps=(5,))
    assert ras_flops.ras_tokens(cfg) == cfg.token_counts(ras_flops.N)
    p7 = JiTConfig.preset("7x")
    assert ras_flops.composed_tokens(p7)[:-p7.stage_steps[-1]] == ras_flops.jit_tokens(p7)[:-p7.stage_steps[-1]]


def test_ras_quality_method_list():
    from benchmarks import quality, ras_quality

    ms = ras_quality.methods()
    names = [m.name for m in ms]
    assert names[0] == quality.REF and len(set(names)) == len(names)
    assert {m.family for m in ms} == {"dense", "jit", "ras", "jit+ras"}
    # the suite's verdicts compare JiT rows of these names with the nearest-FLOP "ras" row
    assert "JiT 4x assign/independent" in names and "JiT 7x assign/independent" in names
