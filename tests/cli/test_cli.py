"""The jit-flux console script: tiny-model path, FLUX path (offline, faked text encoding), errors."""

import json
import sys

import pytest
from PIL import Image

from tests._fixtures.flux import build_pipe, prompt_inputs
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
    assert cli.main(["--steps", "0", "--out", str(tmp_path / "x.png")]) == 2
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


# ----------------------------------------------------------------------------- argument errors
@pytest.fixture
def no_work(monkeypatch):
    """Fail loudly if the CLI builds a model or samples (argument errors must come first)."""
    import jit_eval.tiny_flux as tiny_flux
    import jit_sampler.sampler as sampler
    from jit_sampler.pipelines.flux import JiTFluxPipeline

    def boom(*a, **k):
        raise AssertionError("the CLI did work before rejecting its arguments")

    for mod, name in ((tiny_flux, "build_tiny_flux"), (tiny_flux, "load_tiny_flux"), (sampler, "jit_sample")):
        monkeypatch.setattr(mod, name, boom)
    monkeypatch.setattr(JiTFluxPipeline, "from_pretrained", staticmethod(boom))


def _usage_error(capsys, argv, phrase):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.startswith("usage: jit-flux")
    last = err.strip().splitlines()[-1]
    assert last.startswith("jit-flux: error: ") and phrase in last, err
    return last


@pytest.mark.parametrize("extra, phrase", [
    (["--prompt", "²"], "digit 0-9"),  # str.isdigit() is True for '²', int('²') is not
    (["--prompt", "٣"], "digit 0-9"),  # an Arabic-Indic digit
    (["--compare", "--dense-steps", "0"], "--dense-steps must be >= 1"),
    (["--dense-steps", "-4"], "--dense-steps must be >= 1"),
    (["--device", "tpu"], "unknown device 'tpu'"),
    (["--device", "meta"], "not available"),
    (["--seed", str(2 ** 64)], "--seed must fit in 64 bits"),
    (["--seed", str(-(2 ** 63) - 1)], "--seed must fit in 64 bits"),
    (["--cfg-scale", "inf"], "--cfg-scale must be a finite number >= 0"),
    (["--cfg-scale", "nan"], "--cfg-scale must be a finite number >= 0"),
    (["--cfg-scale", "-2"], "--cfg-scale must be a finite number >= 0"),
    (["--guidance=-inf"], "--guidance must be a finite number >= 0"),
    (["--height", "64"], "32 x 32"),
    (["--steps", "0"], "JiTConfig.total_steps"),  # 2 steps run (few-step layouts)
])
def test_bad_arguments_are_usage_errors(tmp_path, capsys, no_work, extra, phrase):
    _usage_error(capsys, ["--model", "tiny:random", "--out", str(tmp_path / "x.png"), *extra], phrase)
    assert not list(tmp_path.iterdir())  # nothing written


def test_cuda_without_a_gpu_is_a_usage_error(tmp_path, capsys, no_work, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _usage_error(capsys, ["--model", "tiny:random", "--device", "cuda", "--out", str(tmp_path / "x.png")],
                 "no CUDA GPU")
    _usage_error(capsys, ["--model", "tiny:random", "--device", "cuda:1", "--out", str(tmp_path / "x.png")],
                 "no CUDA GPU")


def test_bad_out_paths_are_usage_errors(tmp_path, capsys, no_work):
    base = ["--model", "tiny:random"]
    _usage_error(capsys, base + ["--out", str(tmp_path)], "is a directory")
    _usage_error(capsys, base + ["--out", str(tmp_path / "x.xyz")], "unknown image file extension '.xyz'")
    _usage_error(capsys, base + ["--out", str(tmp_path / "x")], "unknown image file extension")
    _usage_error(capsys, base + ["--out", str(tmp_path / "x.xbm")], "cannot write L images as XBM")
    (tmp_path / "file").write_text("")
    _usage_error(capsys, base + ["--out", str(tmp_path / "file" / "x.png")], "is not a directory")
    (tmp_path / "r.json").mkdir()
    _usage_error(capsys, base + ["--out", str(tmp_path / "r.png")], "report path")


def test_uncreatable_out_directory_is_a_usage_error(tmp_path, capsys, no_work, monkeypatch):
    import os

    def refuse(path, exist_ok=False):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(os, "makedirs", refuse)
    _usage_error(capsys, ["--model", "tiny:random", "--out", str(tmp_path / "new" / "x.png")], "cannot create")


def test_flux_argument_errors_come_before_loading(tmp_path, capsys, no_work):
    base = ["--model", "some/flux", "--out", str(tmp_path / "x.png")]
    _usage_error(capsys, base, "--prompt is required")
    _usage_error(capsys, base + ["--prompt", "a cat", "--height", "70"], "--height must be a positive multiple of 16")
    _usage_error(capsys, base + ["--prompt", "a cat", "--width", "-16"], "--width must be a positive multiple of 16")
    _usage_error(capsys, base + ["--prompt", "caf\udce9"], "--prompt is not valid text")
    _usage_error(capsys, base + ["--prompt", "a cat", "--cfg-scale", "inf"], "--cfg-scale")


def test_valid_edge_arguments_still_run(tmp_path):
    # A negative seed (torch wraps it) and a zero CFG scale are accepted as before.
    assert cli.main(["--model", "tiny:random", "--preset", "7x", "--seed", "-1", "--cfg-scale", "0",
                     "--out", str(tmp_path / "x.PNG")]) == 0
    assert Image.open(tmp_path / "x.PNG").size == (128, 128)


# ----------------------------------------------------------------------------- FLUX sources and offload
@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    """A complete tiny FLUX.1 pipeline folder (text encoders and tokenizers included), written offline."""
    from jit_eval.tiny_pipeline import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(str(tmp_path_factory.mktemp("flux") / "pipe"))


def _write_gguf(folder, path):
    """The folder's transformer as a GGUF file: 2-D weights whose rows are a multiple of 32 in Q8_0, the
    rest F32, under diffusers' own key names (which from_single_file loads without conversion)."""
    import gguf
    import numpy as np
    from diffusers import FluxTransformer2DModel

    tr = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer")
    writer = gguf.GGUFWriter(str(path), arch="flux")
    q8 = 0
    for name, t in tr.state_dict().items():
        a = t.detach().float().numpy()
        if a.ndim == 2 and a.shape[-1] % 32 == 0:
            writer.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            q8 += 1
        else:
            writer.add_tensor(name, a.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert q8 > 0
    return str(path)


FLUX_ARGS = ["--prompt", "a red fox", "--height", "64", "--width", "64", "--preset", "7x"]


def test_folder_without_text_encoders_is_a_usage_error(tmp_path, capsys, no_work):
    """Before: a traceback from inside the pipeline (encode_prompt on a None text encoder)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "text_encoder=None cannot be saved", to a stream capsys may have closed
    try:
        build_pipe().save_pretrained(tmp_path / "no-text")
    finally:
        diffusers_logging.set_verbosity(level)
    capsys.readouterr()
    last = _usage_error(capsys, ["--model", str(tmp_path / "no-text"), *FLUX_ARGS, "--out", str(tmp_path / "x.png")],
                        "has no text_encoder / tokenizer / text_encoder_2 / tokenizer_2")
    assert "prompt_embeds" in last


@pytest.mark.parametrize("extra, phrase", [
    (["--offload", "model"], "--offload model moves weights between the CPU and an accelerator"),
    (["--offload", "group", "--device", "cpu"], "use --offload none"),
    (["--gguf", "missing.gguf"], "no such file"),
    (["--gguf", __file__, "--transformer", "x"], "give one of --gguf and --transformer"),
])
def test_flux_source_and_offload_errors(tmp_path, capsys, no_work, flux_folder, extra, phrase):
    _usage_error(capsys, ["--model", flux_folder, *FLUX_ARGS, *extra, "--out", str(tmp_path / "x.png")], phrase)


@pytest.mark.parametrize("flag", [["--offload", "group"], ["--gguf", "x.gguf"], ["--transformer", "t"]])
def test_flux_only_options_refused_for_the_tiny_model(tmp_path, capsys, no_work, flag):
    _usage_error(capsys, ["--model", "tiny:random", *flag, "--out", str(tmp_path / "x.png")],
                 "apply to a FLUX.1 --model")


def test_unloadable_file_is_one_line(tmp_path, capsys, flux_folder):
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a GGUF file")
    assert cli.main(["--model", flux_folder, "--gguf", str(bad), *FLUX_ARGS, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("jit-flux: error: cannot load")


def test_gguf_transformer(tmp_path, flux_folder):
    """``--gguf``: the transformer from a Q8_0 GGUF file written here, the rest from --model."""
    path = _write_gguf(flux_folder, tmp_path / "flux-q8_0.gguf")
    assert cli.main(["--model", flux_folder, "--gguf", path, *FLUX_ARGS, "--out", str(tmp_path / "g.png")]) == 0
    rep = json.loads((tmp_path / "g.json").read_text())
    assert rep["transformer"] == {"from": path, "quantization": "gguf"}
    assert rep["jit"]["report"]["model_calls"] == 11


def test_transformer_from_another_folder(tmp_path, flux_folder):
    assert cli.main(["--model", flux_folder, "--transformer", flux_folder, *FLUX_ARGS, "--out",
                     str(tmp_path / "t.png")]) == 0
    rep = json.loads((tmp_path / "t.json").read_text())
    assert rep["transformer"] == {"from": flux_folder, "quantization": None}


@pytest.mark.parametrize("offload", ["model", "group"])
def test_offload_hooks_keep_the_result(flux_folder, offload):
    """``--offload`` installs diffusers' hooks (here with the CPU as the 'accelerator', which the CLI
    refuses as pointless but diffusers runs) and the JiT result is the same as without."""
    import torch
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    def run(mode):
        args = cli.build_parser().parse_args(["--model", flux_folder, "--offload", mode, "--device", "cpu"])
        pipe = cli._load_flux(args, "cpu", torch.float32)
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a red fox", height=64, width=64, jit="7x", generator=torch.Generator().manual_seed(0),
                   output_type="latent").images
        return pipe, out

    _, ref = run("none")
    pipe, out = run(offload)
    if offload == "model":
        assert len(pipe._all_hooks) > 0
    else:
        assert _is_group_offload_enabled(pipe.transformer)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
