"""torch.compile under JiT: one transformer graph per stage, token buckets shared across presets,
and the compiled run gives the eager image."""

from __future__ import annotations

import pytest
import torch

import tests._fixtures.flux  # noqa: F401  (one torch thread)
from jit_sampler.config import JiTConfig
from jit_eval.tiny_flux import TinyVelocity, sample_tiny
from jit_eval.tiny_flux import load_tiny_flux


def _noise(b=2):
    return torch.randn(b, 256, 4, generator=torch.Generator().manual_seed(0))


class GraphCounter:
    """A torch.compile backend that records each compiled graph's 3-D input shapes and runs it eagerly."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(sorted(tuple(e.shape) for e in example_inputs if isinstance(e, torch.Tensor) and e.dim() == 3))
        return gm.forward


@pytest.fixture()
def compiled():
    """(model with a compiled transformer, counter, eager model)."""
    torch._dynamo.reset()
    eager = load_tiny_flux()
    model = load_tiny_flux()
    counter = GraphCounter()
    model.transformer = torch.compile(model.transformer, backend=counter, dynamic=False)
    yield model, counter, eager
    torch._dynamo.reset()


@pytest.mark.slow
def test_one_graph_per_stage_and_eager_parity(compiled):
    model, counter, eager = compiled
    labels, cfg = torch.tensor([1, 7]), JiTConfig.preset("7x")
    y, rep = sample_tiny(model, labels, _noise(), cfg)
    assert len(counter.graphs) == 3  # 81, 153 and 256 tokens
    assert sorted({s[1] for g in counter.graphs for s in g if s[2] == 4}) == [81, 153, 256]
    y_eager, _ = sample_tiny(eager, labels, _noise(), cfg)
    assert torch.equal(y, y_eager)
    sample_tiny(model, labels, _noise(), cfg)  # a second run: no recompilation
    assert len(counter.graphs) == 3


@pytest.mark.slow
def test_token_buckets_share_graphs_across_presets(compiled):
    model, counter, eager = compiled
    labels = torch.tensor([2, 5])
    for preset in ("7x", "4x"):
        y, _ = sample_tiny(model, labels, _noise(), JiTConfig.preset(preset, token_bucket=64))
        y_plain, _ = sample_tiny(eager, labels, _noise(), JiTConfig.preset(preset))
        torch.testing.assert_close(y, y_plain, rtol=0, atol=1e-4)  # padding is masked out
    # 7x: 81/153/256 and 4x: 89/158/256 tokens all land in the buckets 128/192/256
    assert len(counter.graphs) == 3


def test_bucketed_rows_equal_unpadded_rows():
    model = load_tiny_flux()
    labels, x = torch.tensor([4, 9]), _noise()[:, :81]
    active = torch.arange(0, 162, 2)
    plain = TinyVelocity(model, labels)(x, active, 0.7, 0)
    padded = TinyVelocity(model, labels, token_bucket=64)(x, active, 0.7, 0)
    assert padded.shape == plain.shape == x.shape
    torch.testing.assert_close(padded, plain, rtol=0, atol=1e-5)
    # true CFG (two passes) pads both branches
    torch.testing.assert_close(TinyVelocity(model, labels, 2.0, token_bucket=64)(x, active, 0.7, 0),
                               TinyVelocity(model, labels, 2.0)(x, active, 0.7, 0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "64"])
def test_token_bucket_validation(bad):
    with pytest.raises(ValueError, match="token_bucket"):
        JiTConfig.preset("4x", token_bucket=bad)
    with pytest.raises(ValueError, match="token_bucket"):
        TinyVelocity(load_tiny_flux(), torch.tensor([1]), token_bucket=bad)


def test_token_bucket_refuses_user_mask():
    from jit_sampler import FluxVelocity

    m = load_tiny_flux()
    with pytest.raises(ValueError, match="attention_mask"):
        FluxVelocity(m.transformer, None, None, None, None, token_bucket=64,
                     joint_attention_kwargs={"attention_mask": torch.ones(1, 1)})


@pytest.mark.slow
def test_inductor_compiled_transformer_matches_eager():
    """The real compiler (inductor; C++ codegen on CPU, Triton on GPU) within float tolerance."""
    torch._dynamo.reset()
    eager, model = load_tiny_flux(), load_tiny_flux()
    model.transformer = torch.compile(model.transformer, dynamic=False)
    labels, cfg = torch.tensor([3, 6]), JiTConfig.preset("7x", token_bucket=64)
    y, _ = sample_tiny(model, labels, _noise(), cfg)
    y_eager, _ = sample_tiny(eager, labels, _noise(), cfg)
    torch.testing.assert_close(y, y_eager, rtol=0, atol=2e-3)
    torch._dynamo.reset()
