"""benchmarks.reach_flops: the sampler's own token choices, counted at the real models' dimensions."""

from benchmarks import reach_flops


def test_reach_rows_follow_the_layouts_and_the_cost_model(tmp_path):
    rows = {(r["case"], r["preset"]): r for r in reach_flops.cases()}
    t2i = rows[("text-to-image", "7x")]
    assert t2i["steps_per_stage"] == "4 / 3 / 4" and t2i["tokens_per_stage"] == "1310 / 2457 / 4096"
    for r in rows.values():
        # image-linear FLOPs are linear in tokens: the count is the model's prediction
        assert abs(r["image_linear_vs_same_steps"] - r["predicted_vs_same_steps"]) < 2e-3, r
    # a dense reference in every call takes much of the spatial saving; KV pays it once
    ref = rows[("Kontext / FLUX.2 image=, one 1024^2 reference", "7x")]["image_linear_vs_same_steps"]
    kv = rows[("FLUX.2-klein KV, one 1024^2 reference (first call only)", "7x")]["image_linear_vs_same_steps"]
    assert 1.0 < ref < kv < t2i["image_linear_vs_same_steps"]
    assert rows[("img2img / inpaint / Fill, strength 0.6", "7x")]["steps_per_stage"] == "2 / 2 / 3"
    assert rows[("few steps, 2 steps", "7x")]["tokens_per_stage"] == "2457 / 4096"


def test_active_tokens_are_the_samplers():
    cfg = reach_flops.JiTConfig.preset("7x", total_steps=4)
    assert reach_flops.active_tokens(cfg) == [1310, 2457, 4096, 4096]
