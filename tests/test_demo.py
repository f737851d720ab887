"""The main job (README's first command) end to end on the committed tiny FLUX checkpoint."""

import json

import pytest

from jit_eval.demo import run_demo


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
