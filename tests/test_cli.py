"""The jit-flux console script: tiny-model path, FLUX path (offline, faked text encoding), errors."""

import json
import sys

import pytest
from PIL import Image

from _flux_fixtures import build_pipe, prompt_inputs
from jit_sampler import cli


def test_parser_defaults():
    a = cli.build_parser().parse_args([])
    assert a.model is None and a.preset == "4x" and a.seed == 0 and not a.compare and a.dense_steps == 50


def test_tiny_random_compare(tmp_path, capsys):
    out = tmp_path / "sub" / "digit.png"
    rc = cli.main(["--model", "tiny:random", "--prompt", "3", "--preset", "7x", "--steps", "8", "--compare",
                   "--dense-steps", "4", "--seed", "5", "--out", str(out)])
    assert rc == 0
    img = Image.open(out)
    assert img.size == (2 * 128, 128 + 14)  # dense | JiT, each 32 x 32 upscaled 4x, plus captions
    rep = json.loads((tmp_path / "sub" / "digit.json").read_text())
    assert rep["label"] == 3 and rep["jit"]["report"]["steps"] == 8 and rep["dense"]["steps"] == 4
    assert rep["jit"]["seconds"] > 0 and rep["dense"]["seconds"] > 0 and "speedup_wall" in rep
    assert rep["jit"]["report"]["flops"]["speedup_vs_same_steps"]["image_linear"] > 1
    assert "wall-clock speed-up" in capsys.readouterr().out


def test_tiny_same_seed_same_image(tmp_path):
    for name in ("a", "b"):
        assert cli.main(["--model", "tiny:random", "--preset", "7x", "--cfg-scale", "2", "--out",
                         str(tmp_path / f"{name}.png")]) == 0
    assert Image.open(tmp_path / "a.png").tobytes() == Image.open(tmp_path / "b.png").tobytes()


def test_default_model_unavailable_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "jit_eval.tiny_flux", None)  # not importable
    assert cli.main(["--out", str(tmp_path / "x.png")]) == 2
    assert "embedded default model" in capsys.readouterr().err


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert cli.main(["--steps", "2", "--out", str(tmp_path / "x.png")]) == 2
    assert "JiTConfig.total_steps" in capsys.readouterr().err
    assert cli.main(["--model", "tiny:random", "--prompt", "cat", "--out", str(tmp_path / "x.png")]) == 2
    assert "digit" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--preset", "9x"])


def test_flux_path_with_compare(tmp_path, monkeypatch):
    from jit_sampler.pipelines.flux import JiTFluxPipeline

    def fake_from_pretrained(model, dtype=None, torch_dtype=None):
        assert model == "some/flux"
        p = build_pipe(JiTFluxPipeline)
        enc, pe = p.encode_prompt, prompt_inputs()

        def encode_prompt(prompt=None, prompt_2=None, prompt_embeds=None, pooled_prompt_embeds=None, **kw):
            # No text encoders offline: every prompt maps to fixed embeddings.
            return enc(prompt=None, prompt_embeds=pe["prompt_embeds"],
                       pooled_prompt_embeds=pe["pooled_prompt_embeds"], **kw)

        p.encode_prompt = encode_prompt
        return p

    monkeypatch.setattr(JiTFluxPipeline, "from_pretrained", staticmethod(fake_from_pretrained))
    out = tmp_path / "flux.png"
    rc = cli.main(["--model", "some/flux", "--prompt", "a cat", "--height", "64", "--width", "96", "--preset", "7x",
                   "--compare", "--dense-steps", "3", "--out", str(out)])
    assert rc == 0
    assert Image.open(out).size == (2 * 96, 64 + 14)
    rep = json.loads((tmp_path / "flux.json").read_text())
    assert rep["jit"]["report"]["model_calls"] == 11 and rep["dense"]["steps"] == 3
    assert cli.main(["--model", "some/flux", "--prompt", "x", "--height", "70", "--out", str(out)]) == 2


def test_flux_path_on_a_real_pipeline_folder(tmp_path):
    """A complete FLUX.1 folder (text encoders and tokenizers included) through from_pretrained."""
    from jit_eval.tiny_pipeline import build_tiny_flux_pipeline

    folder = build_tiny_flux_pipeline(str(tmp_path / "pipe"))
    out = tmp_path / "fox.png"
    assert cli.main(["--model", folder, "--prompt", "a red fox", "--height", "128", "--width", "128",
                     "--preset", "7x", "--out", str(out)]) == 0
    rep = json.loads((tmp_path / "fox.json").read_text())
    assert rep["model"] == folder and rep["jit"]["report"]["model_calls"] == 11
    assert Image.open(out).size == (128, 128)
