"""JiT under diffusers' context parallelism (Ulysses), ``jit_sampler.pipelines.parallel``.

The end-to-end tests run ``tests/pipelines/_cp_jit_worker.py`` once under torchrun with 2 gloo ranks on
the CPU: JiT 7x on the tiny FLUX.1 and FLUX.2-klein pipelines, with ``token_multiple=2`` and
with ``token_bucket=64``, must give the one-process latents of the same config (float32
summation order only), and configurations the ranks cannot split must be refused before the
first transformer call. The other tests check the same rules in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests._fixtures.flux import build_pipe, prompt_inputs
from jit_sampler import JiTConfig
from jit_sampler.pipelines.parallel import (check_context_parallel, context_parallel_degree, padding_keep,
                                            plan_wants_batched_ids)

TOL = 1e-5  # measured <= 1e-6 on latents of magnitude ~4 (float32, attention summed in another order)


def _cp(**kw):
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    return ParallelConfig(context_parallel_config=ContextParallelConfig(**kw))


class _Fake(torch.nn.Module):
    """Just enough of a transformer for the checks: the parallel config diffusers leaves on it."""

    def __init__(self, config=None):
        super().__init__()
        self._parallel_config = config


# ---------------------------------------------------------------- one process
def test_context_parallel_degree_and_check_rules():
    assert context_parallel_degree(_Fake()) == 1
    assert check_context_parallel(_Fake(), [57], [5]) == 1  # nothing to split without parallelism
    tr = _Fake(_cp(ulysses_degree=2))
    assert context_parallel_degree(tr) == 2
    assert check_context_parallel(tr, [30, 58, 96], [6]) == 2
    assert check_context_parallel(tr, [30, 57, 96], [6], token_bucket=64) == 2  # padded to 64, 64, 128
    with pytest.raises(ValueError, match=r"57 .*token_multiple=2"):
        check_context_parallel(tr, [30, 57, 96], [6])
    with pytest.raises(ValueError, match=r"30 \(padded to 35\)"):
        check_context_parallel(tr, [30, 57, 96], [6], token_bucket=7)
    with pytest.raises(ValueError, match=r"text length \[5\]"):
        check_context_parallel(tr, [30, 58, 96], [6, 5])
    assert check_context_parallel(_Fake(_cp(ulysses_degree=2, ulysses_anything=True)), [57], [5]) == 2
    ring = _Fake(_cp(ring_degree=2))
    assert check_context_parallel(ring, [30, 58, 96], [6]) == 2
    with pytest.raises(NotImplementedError, match="ring"):
        check_context_parallel(ring, [30, 58, 96], [6], token_bucket=64)
    tensor_parallel_only = _Fake()
    from diffusers.models._modeling_parallel import ParallelConfig, TensorParallelConfig

    tensor_parallel_only._parallel_config = ParallelConfig(tensor_parallel_config=TensorParallelConfig(tp_degree=2))
    assert context_parallel_degree(tensor_parallel_only) == 1


def test_context_parallel_padding_mask_follows_the_all_to_all_order():
    # 2 text tokens, 3 image tokens, 5 padding: plain order without parallelism ...
    plain = padding_keep(2, 3, 5, _Fake())
    assert plain.tolist() == [True, True, True, True, True] + [False] * 5
    # ... and under Ulysses over 2 ranks: [text chunk 0, image chunk 0, text chunk 1, image chunk 1],
    # where the padding fills all of rank 1's image chunk and one row of rank 0's.
    split = padding_keep(2, 3, 5, _Fake(_cp(ulysses_degree=2)))
    assert split.tolist() == [True, True, True, True, False, True, False, False, False, False]


def test_context_parallel_flux2_ids_are_batched():
    from tests._fixtures.flux2 import build_klein

    assert plan_wants_batched_ids(build_klein().transformer)  # its plan splits [B, N, 4] ids along N
    assert not plan_wants_batched_ids(build_pipe().transformer)  # FLUX.1 splits [N, 3]
    assert not plan_wants_batched_ids(_Fake())


def test_context_parallel_bad_config_raises_before_any_call(monkeypatch):
    from tests._fixtures.flux2 import build_klein

    from jit_sampler.pipelines.flux import JiTFluxPipeline
    from jit_sampler.pipelines.flux2_klein import JiTFlux2KleinPipeline

    flux1 = JiTFluxPipeline.from_pipe(build_pipe())
    klein = JiTFlux2KleinPipeline.from_pipe(build_klein())
    calls = []
    for pipe in (flux1, klein):
        pipe.transformer.register_forward_pre_hook(lambda *a: calls.append("transformer"))
        monkeypatch.setattr(pipe, "encode_prompt", lambda *a, **k: calls.append("encode"))
        pipe.transformer._parallel_config = _cp(ulysses_degree=2)  # what enable_parallelism leaves on the model
    g = torch.Generator().manual_seed(1)
    kw = dict(height=128, width=192, output_type="latent", generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="not divisible by 2.*token_multiple=2"):
        flux1(jit="7x", **prompt_inputs(), **kw)
    with pytest.raises(ValueError, match=r"\(padded to 35\)"):
        flux1(jit=JiTConfig.preset("7x", token_bucket=7), **prompt_inputs(), **kw)
    with pytest.raises(ValueError, match=r"text length \[5\]"):  # true CFG: the negative's 5 tokens
        flux1(jit=JiTConfig.preset("7x", token_multiple=2), **prompt_inputs(), true_cfg_scale=2.0,
              negative_prompt_embeds=torch.randn(1, 5, 32, generator=g),
              negative_pooled_prompt_embeds=torch.randn(1, 16, generator=g), **kw)
    with pytest.raises(ValueError, match="57"):
        klein(jit="7x", prompt_embeds=torch.randn(1, 6, 32, generator=g), guidance_scale=1.0, **kw)
    with pytest.raises(ValueError, match=r"text length \[5\]"):
        klein(jit=JiTConfig.preset("7x", token_multiple=2), prompt_embeds=torch.randn(1, 5, 32, generator=g),
              guidance_scale=1.0, **kw)
    assert calls == []  # neither the text encoder nor the transformer ran


# ---------------------------------------------------------------- 2 gloo ranks
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both ranks' results of tests/pipelines/_cp_jit_worker.py under ``torchrun --standalone --nproc_per_node 2``."""
    out = tmp_path_factory.mktemp("cp")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(root, "tests", "pipelines", "_cp_jit_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=str(out), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _same_as_one_process(res, tokens):
    assert res["finite"] and res["scale"] > 0.1
    assert res["diff"] < TOL * res["scale"], res
    assert sorted(set(res["tokens"])) == tokens


@pytest.mark.slow
def test_context_parallel_ranks_agree(ranks):
    assert ranks[0] == ranks[1]  # every rank gathers the whole output and sees the same errors


@pytest.mark.slow
def test_context_parallel_flux1_token_multiple(ranks):
    r = ranks[0]["flux1_token_multiple"]
    _same_as_one_process(r, [30, 58, 96])  # 57 rounded up to 58
    assert r["calls"] == 11


@pytest.mark.slow
def test_context_parallel_flux1_token_bucket_true_cfg(ranks):
    # token_bucket=64 pads the 30-token stage by 34, more than rank 1's image chunk of 32: a mask in
    # plain order would hide real keys of rank 0 (this diverged by ~3.8 before padding_keep).
    r = ranks[0]["flux1_token_bucket"]
    _same_as_one_process(r, [30, 57, 96])
    assert r["calls"] == 22  # cond + uncond


@pytest.mark.slow
def test_context_parallel_flux1_per_sample_anchors(ranks):
    r = ranks[0]["flux1_per_sample"]
    _same_as_one_process(r, [30, 58, 96])
    assert r["calls"] == 2 * 7 + 4  # one forward per sample while sparse


@pytest.mark.slow
def test_context_parallel_flux2_klein_token_multiple(ranks):
    _same_as_one_process(ranks[0]["flux2_token_multiple"], [30, 58, 96])


@pytest.mark.slow
def test_context_parallel_flux2_klein_token_bucket(ranks):
    _same_as_one_process(ranks[0]["flux2_token_bucket"], [30, 57, 96])


@pytest.mark.slow
def test_context_parallel_unsplittable_configs_raise_before_any_call(ranks):
    res = ranks[0]
    assert "57" in res["bad_flux1_counts"]["error"] and "token_multiple=2" in res["bad_flux1_counts"]["error"]
    assert "padded to 35" in res["bad_flux1_bucket"]["error"]
    assert "text length [5]" in res["bad_flux2_text"]["error"]
    assert all(res[k]["calls"] == 0 for k in ("bad_flux1_counts", "bad_flux1_bucket", "bad_flux2_text"))
