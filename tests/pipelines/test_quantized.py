"""Quantized FLUX transformers loaded the standard ways, under enable_jit (issue 21).

A tiny random FLUX.1 transformer is saved to a folder, then loaded quantized as users do:
torchao (``from_pretrained(..., quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))``),
optimum-quanto (diffusers' ``QuantoConfig(weights_dtype="int8")``) and GGUF (``from_single_file``
of a Q8_0 / Q4_0 file written here with the ``gguf`` package, ``GGUFQuantizationConfig``).
enable_jit must take the pipeline as it is (no cast: diffusers refuses to cast a quantized
model), run JiT, and give what the same JiT run gives with the dequantized weights in a plain
transformer.

Tolerance: the reference holds exactly the values the quantized layers compute with (torchao's
and quanto's own ``dequantize()``; for GGUF the ``gguf`` package's dequantization rounded to
fp16, the precision in which diffusers' GGUF layers dequantize); everything runs in float32. What
is left is the order of float32 operations inside the quantized matmuls, about 1e-7 relative
per layer: measured 1e-7 over the whole 11-step "7x" run. ``RTOL`` = 1e-5 is 100x that and far below
what quantization itself changes (1.8e-3 relative for Q8_0, 0.38 for Q4_0 vs. the unquantized
weights, asserted below so that the comparison can tell the two apart).
"""

from __future__ import annotations

import pytest
import torch

from tests._fixtures.flux import build_pipe, prompt_inputs, stock_pipe
from tests._fixtures.quant import write_gguf
from jit_sampler import enable_jit

RTOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(folder, state_dict)`` of a tiny random FLUX.1 transformer saved with ``save_pretrained``."""
    folder = tmp_path_factory.mktemp("flux_transformer")
    transformer = build_pipe().transformer
    transformer.save_pretrained(folder)
    return folder, {k: v.clone() for k, v in transformer.state_dict().items()}


def _pipe(transformer):
    return stock_pipe(build_pipe(), transformer=transformer)


def _jit(transformer) -> torch.Tensor:
    pipe = enable_jit(_pipe(transformer), "7x")
    assert pipe.transformer is transformer
    out = pipe(**prompt_inputs(), height=128, width=128, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    tokens = pipe.last_jit_report.active_tokens
    assert min(tokens) < max(tokens) == 64  # JiT ran: sparse stages, then the full 8 x 8 grid
    return out


def _plain(tiny, weights: dict):
    """The saved transformer in float32 with ``weights`` (name -> tensor) swapped in."""
    from diffusers import FluxTransformer2DModel

    folder, state = tiny
    t = FluxTransformer2DModel.from_pretrained(folder, torch_dtype=torch.float32)
    missing = set(weights) - set(state)
    assert not missing, missing
    t.load_state_dict({**state, **{k: v.float() for k, v in weights.items()}})
    return t


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _check(tiny, quantized, dequantized: dict, min_weights: int):
    """enable_jit on the quantized transformer: storage unchanged, and the JiT run equals the dequantized one."""
    storage = {n: (type(p), p.dtype) for n, p in quantized.named_parameters()}
    assert len(dequantized) >= min_weights
    out = _jit(quantized)
    assert {n: (type(p), p.dtype) for n, p in quantized.named_parameters()} == storage
    ref = _jit(_plain(tiny, dequantized))
    unquantized = _jit(_plain(tiny, {}))
    err = _rel(out, ref)
    assert err < RTOL, err
    assert _rel(out, unquantized) > 100 * RTOL  # the reference tells the quantized model from the original
    return out


def test_torchao_int8_weight_only_from_pretrained(tiny):
    pytest.importorskip("torchao")
    from diffusers import FluxTransformer2DModel, TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    t = FluxTransformer2DModel.from_pretrained(tiny[0], quantization_config=TorchAoConfig(Int8WeightOnlyConfig()),
                                               torch_dtype=torch.float32)
    deq = {f"{n}.weight": m.weight.dequantize() for n, m in t.named_modules()
           if isinstance(m, torch.nn.Linear) and type(m.weight) is not torch.nn.Parameter}
    _check(tiny, t, deq, min_weights=20)


def test_optimum_quanto_int8_through_diffusers(tiny):
    pytest.importorskip("optimum.quanto")
    from diffusers import FluxTransformer2DModel, QuantoConfig
    from optimum.quanto import QModuleMixin

    with pytest.warns(FutureWarning):  # diffusers deprecates QuantoConfig (still the documented way in 0.42)
        t = FluxTransformer2DModel.from_pretrained(tiny[0], quantization_config=QuantoConfig(weights_dtype="int8"),
                                                   torch_dtype=torch.float32)
    deq = {f"{n}.weight": m.qweight.dequantize() for n, m in t.named_modules() if isinstance(m, QModuleMixin)}
    _check(tiny, t, deq, min_weights=20)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gguf_from_single_file(tiny, tmp_path, qtype):
    pytest.importorskip("gguf")
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig
    from diffusers.quantizers.gguf.utils import GGUFParameter

    path = tmp_path / f"tiny-flux-{qtype}.gguf"
    deq = write_gguf(path, tiny[1], qtype)
    t = FluxTransformer2DModel.from_single_file(
        str(path), quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32), config=str(tiny[0]),
        torch_dtype=torch.float32)
    assert sum(isinstance(p, GGUFParameter) and p.dtype == torch.uint8 for p in t.parameters()) == len(deq)
    _check(tiny, t, deq, min_weights=20)
