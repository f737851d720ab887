"""The main job (README's first command) end to end on the committed tiny FLUX checkpoint."""

import json

import pytest

from jit_eval.demo import run_demo


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    res = run_demo(str(tmp_path), presets=("7x",), seeds=1, repeats=1, dense_steps=6, log=lambda *_: None)
    rows = {r["method"]: r for r in res["rows"]}
    # CFG 3 by default: two passes per step
    assert rows["JiT 7x"]["model_calls"] == 22 and rows["dense-6"]["model_calls"] == 12
    # 4 steps at 81/256 + 3 at 153/256 + 4 full steps
    assert rows["JiT 7x"]["full_step_equivalents"] == pytest.approx(7.06, abs=0.01)
    assert 0 < rows["JiT 7x"]["psnr_db"] < 100 and -1 <= rows["JiT 7x"]["ssim"] <= 1
    for f in ("jit_demo.png", "jit_demo.json", "jit_demo.md"):
        assert (tmp_path / f).stat().st_size > 0
    assert json.loads((tmp_path / "jit_demo.json").read_text())["rows"] == res["rows"]
    assert res["model"] == "tiny"
    # one row per method (dense-6, JiT 7x) of 10 digits, 32 px + 2 px padding, x2, a name strip on the left
    from PIL import Image

    w, h = Image.open(tmp_path / "jit_demo.png").size
    assert (w, h) == (84 + 2 * (10 * 34 + 2), 2 * (2 * 34 + 2))


@pytest.mark.slow
def test_demo_runs_a_scenes_model(tmp_path):
    """A (random, one block of each kind) 32 x 32-token scenes model: ten scene prompts, 1,024 tokens."""
    import copy

    from jit_eval.tiny_flux import build_tiny_flux
    from jit_eval.tiny_flux.model import SCENES_CONFIG

    cfg = copy.deepcopy(SCENES_CONFIG)
    cfg["transformer"].update(num_layers=1, num_single_layers=1)
    model = build_tiny_flux(cfg, seed=0).eval().requires_grad_(False)
    res = run_demo(str(tmp_path), presets=("7x",), seeds=1, repeats=1, dense_steps=3, model=model,
                   log=lambda *_: None)
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"dense-3", "JiT 7x"} and rows["dense-3"]["full_step_equivalents"] == 3.0
    assert rows["JiT 7x"]["full_step_equivalents"] < rows["JiT 7x"]["steps"]  # sparse stages on 1,024 tokens
    assert "scene prompts" in res["images"] and (tmp_path / "jit_demo.png").stat().st_size > 0
