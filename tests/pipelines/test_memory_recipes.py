"""The recipes of docs/memory.md, run as written on a tiny random FLUX.1 (CPU), and its computed table.

Each ```python block after a ``<!-- recipe: NAME -->`` marker is executed with only these
substitutions, each of which must apply (so the doc cannot drift from what runs here):
``MODEL`` -> a tiny pipeline folder saved here, ``DEVICE`` -> ``"cpu"``, the GGUF address -> a
Q8_0 / Q4_0 file written here, ``use_stream=True`` -> ``False`` (a CPU has no streams), and the
pipeline's ``from_pretrained`` gets ``text_encoder=None`` etc. (the tiny folder has no text
encoders; the call passes ``prompt_embeds`` instead of a prompt). The nf4 recipe needs CUDA
(bitsandbytes) and runs only where there is one.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests._fixtures.flux import build_pipe, prompt_inputs
from tests._fixtures.quant import write_gguf

DOC = Path(__file__).resolve().parents[2] / "docs" / "memory.md"
NO_TEXT = "text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None"


def recipes() -> dict:
    text = DOC.read_text()
    found = re.findall(r"<!-- recipe: ([\w-]+) -->\n```python\n(.*?)```", text, re.S)
    return dict(found)


def _sub(code: str, old: str, new: str) -> str:
    assert old in code, f"docs/memory.md no longer has {old!r}"
    return code.replace(old, new)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_flux")
    pipe = build_pipe()
    pipe.transformer.eval()
    pipe.save_pretrained(root / "model")
    for q in ("Q8_0", "Q4_0"):
        write_gguf(root / f"transformer-{q}.gguf", pipe.transformer.state_dict(), q)
    return root


def _run(folder, name: str, gguf: str | None = None):
    r = recipes()
    setup = _sub(_sub(r["setup"], '"black-forest-labs/FLUX.1-dev"', repr(str(folder / "model"))),
                 'DEVICE = "cuda"', 'DEVICE = "cpu"')
    code = _sub(r[name], "FluxPipeline.from_pretrained(MODEL, ", f"FluxPipeline.from_pretrained(MODEL, {NO_TEXT}, ")
    if name == "bf16-group-offload":
        code = _sub(code, "use_stream=True", "use_stream=False")
    if gguf is not None:
        code = re.sub(r'GGUF = "https://[^"]+"', f"GGUF = {str(folder / f'transformer-{gguf}.gguf')!r}", code)
        assert str(folder) in code
    ns: dict = {}
    exec(compile(setup, "docs/memory.md:setup", "exec"), ns)
    exec(compile(code, f"docs/memory.md:{name}", "exec"), ns)
    pipe = ns["pipe"]
    pipe.set_progress_bar_config(disable=True)
    inputs = {k: v.to(torch.bfloat16) for k, v in prompt_inputs().items()}
    out = pipe(**inputs, height=128, width=128, guidance_scale=3.5, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    assert type(pipe).__name__ == "JiTFluxPipeline" and pipe._default_jit.name == "7x"
    tokens = pipe.last_jit_report.active_tokens
    assert min(tokens) < max(tokens) == 64
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    return pipe


def test_doc_has_every_recipe():
    assert set(recipes()) == {"setup", "bf16-model-offload", "bf16-group-offload", "fp8-layerwise", "gguf", "nf4"}


def test_bf16_model_offload(folder):
    pipe = _run(folder, "bf16-model-offload")
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}
    assert len(pipe._all_hooks) == 2  # transformer, vae (no text encoders here); re-installed after the call


def test_bf16_group_offload(folder):
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    pipe = _run(folder, "bf16-group-offload")
    assert _is_group_offload_enabled(pipe.transformer)
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}


def test_fp8_layerwise(folder):
    pipe = _run(folder, "fp8-layerwise")
    dtypes = {p.dtype for p in pipe.transformer.parameters()}
    assert torch.float8_e4m3fn in dtypes and dtypes <= {torch.float8_e4m3fn, torch.bfloat16}


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gguf(folder, qtype):
    pytest.importorskip("gguf")
    from diffusers.quantizers.gguf.utils import GGUFParameter

    pipe = _run(folder, "gguf", gguf=qtype)
    assert any(isinstance(p, GGUFParameter) and p.dtype == torch.uint8 for p in pipe.transformer.parameters())


@pytest.mark.gpu
def test_nf4(folder):
    pytest.importorskip("bitsandbytes")
    code = recipes()["nf4"]
    assert "bnb_4bit_quant_type=\"nf4\"" in code
    # on a CUDA machine the recipe runs on the GPU, as written (only MODEL and the text encoders swapped)
    r = recipes()
    ns: dict = {}
    exec(_sub(r["setup"], '"black-forest-labs/FLUX.1-dev"', repr(str(folder / "model"))), ns)
    exec(_sub(code, "FluxPipeline.from_pretrained(MODEL, ", f"FluxPipeline.from_pretrained(MODEL, {NO_TEXT}, "), ns)
    pipe = ns["pipe"]
    inputs = {k: v.to(torch.bfloat16) for k, v in prompt_inputs().items()}
    out = pipe(**inputs, height=128, width=128, output_type="latent",
               generator=torch.Generator("cuda").manual_seed(0)).images
    assert torch.isfinite(out.float()).all()


def test_doc_table_is_the_budget_scripts_output():
    from benchmarks.memory_budget import tables

    text = DOC.read_text()
    table = text.split("<!-- memory-budget:start -->\n", 1)[1].split("\n<!-- memory-budget:end -->", 1)[0]
    assert table == tables()
