"""FLUX.2-klein reference images under JiT: ``JiTFlux2KleinPipeline(image=...)`` and
``JiTFlux2KleinKVPipeline`` (KV-cached references), on tiny random pipelines built offline.

The references are small random PIL images (FLUX.2's stock check wants sides >= 64 pixels):
a 64 x 96 and a 96 x 64 one, i.e. 4 x 6 + 6 x 4 = 48 reference tokens, with time ids 10 and 20.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinKVPipeline
from PIL import Image

import tests._fixtures.flux  # noqa: F401  (one torch thread)
from tests._fixtures.flux2 import build_klein, embeds
from jit_sampler import JiTConfig, JiTFlux2KleinKVPipeline, JiTFlux2KleinPipeline, enable_jit
from jit_sampler.pipelines.flux2_klein_kv import KVReferenceVelocity


def ref_image(h=64, w=96, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


def refs():
    return [ref_image(), ref_image(96, 64, seed=1)]


REF = 24 + 24


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def base():
    return build_klein()


@pytest.fixture(scope="module")
def pipe(base):
    p = JiTFlux2KleinPipeline.from_pipe(base)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def kv_base():
    return build_klein(cls=Flux2KleinKVPipeline, is_distilled=True)


@pytest.fixture(scope="module")
def kv(kv_base):
    p = JiTFlux2KleinKVPipeline.from_pipe(kv_base)
    p.set_progress_bar_config(disable=True)
    return p


def kw(batch=1, image=True, **over):
    d = dict(image=refs() if image is True else image, prompt_embeds=embeds(batch),
             negative_prompt_embeds=embeds(batch, seed=2), height=128, width=128, output_type="latent",
             guidance_scale=4.0, generator=gen())
    d.update(over)
    return d


def kv_kw(batch=1, image=True, **over):
    d = dict(image=refs() if image is True else image, prompt_embeds=embeds(batch), height=128, width=128,
             output_type="latent", generator=gen())
    d.update(over)
    return d


class SeqLog:
    """A forward pre-hook recording the sequence the transformer sees in every call."""

    def __init__(self, tr):
        self.tr, self.calls = tr, []

    def __enter__(self):
        def hook(module, args, kwargs):
            self.calls.append({"tokens": kwargs["hidden_states"].shape[1], "batch": kwargs["hidden_states"].shape[0],
                               "ids": kwargs["img_ids"].clone(), "x": kwargs["hidden_states"].clone(),
                               "enc": kwargs["encoder_hidden_states"].clone(), "mode": kwargs.get("kv_cache_mode"),
                               "cache": kwargs.get("kv_cache"),
                               "mask": (kwargs.get("joint_attention_kwargs") or {}).get("attention_mask")})
        self.handle = self.tr.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False


# --- JiTFlux2KleinPipeline(image=...) ---------------------------------------------------------


def test_klein_jit_none_is_the_stock_pipeline_with_references(base, pipe):
    a = base(num_inference_steps=3, **kw()).images
    b = pipe(num_inference_steps=3, jit=None, **kw()).images
    assert torch.equal(a, b) and pipe.last_jit_report is None


def test_klein_dense_config_matches_stock_with_references(base, pipe):
    """One dense stage on the pipeline's schedule is the stock loop: CFG, a batch of 2, two references."""
    a = base(num_inference_steps=4, **kw(batch=2)).images
    with SeqLog(pipe.transformer) as log:
        c = pipe(num_inference_steps=4, jit=JiTConfig.dense(4), **kw(batch=2)).images
    torch.testing.assert_close(c, a, rtol=0, atol=1e-5)
    assert [e["tokens"] for e in log.calls] == [64 + REF] * 8


def test_klein_reference_tokens_in_every_call(pipe):
    with SeqLog(pipe.transformer) as log:
        out = pipe(jit="7x", **kw()).images
    rep = pipe.last_jit_report
    counts = JiTConfig.preset("7x").token_counts(64)
    assert rep.active_tokens == [counts[0]] * 4 + [counts[1]] * 3 + [64] * 4
    assert rep.model_calls == 22 and len(log.calls) == 22  # cond + uncond, both with the references
    assert [c["tokens"] for c in log.calls] == [m + REF for m in rep.active_tokens for _ in range(2)]
    first_refs = log.calls[0]["x"][:, counts[0]:]
    for c, m in zip(log.calls, [m for m in rep.active_tokens for _ in range(2)]):
        ids = c["ids"]
        assert ids.shape == (m + REF, 4) and ids[:m, 0].eq(0).all()
        assert ids[m:m + 24, 0].eq(10).all() and ids[m + 24:, 0].eq(20).all()  # one time offset per reference
        assert torch.equal(c["x"][:, m:], first_refs)
    for cond, unc in zip(log.calls[::2], log.calls[1::2]):
        assert torch.equal(cond["ids"], unc["ids"]) and not torch.equal(cond["enc"], unc["enc"])
    assert out.shape == (1, 8, 16, 16) and torch.isfinite(out).all()


def test_klein_references_change_the_result_and_set_the_default_size(pipe):
    a = pipe(jit="7x", **kw()).images
    b = pipe(jit="7x", **kw(image=None)).images
    assert not torch.allclose(a, b)
    c = pipe(jit="7x", **kw(image=ref_image(), height=None, width=None)).images  # the first image's size
    assert c.shape == (1, 8, 8, 12) and pipe.last_jit_report.active_tokens[-1] == 24


def test_klein_seed_determinism_batch_and_images_per_prompt(pipe):
    a = pipe(jit="4x", num_images_per_prompt=2, **kw(batch=2)).images
    b = pipe(jit="4x", num_images_per_prompt=2, **kw(batch=2)).images
    c = pipe(jit="4x", num_images_per_prompt=2, **kw(batch=2, generator=gen(1))).images
    assert a.shape[0] == 4 and torch.equal(a, b) and not torch.equal(a, c)


def test_klein_per_sample_batch_matches_single_runs(pipe):
    cfg = JiTConfig.preset("7x", anchor_policy="per_sample")
    e, n = embeds(2), embeds(2, seed=2)
    both = pipe(jit=cfg, **kw(2, generator=[gen(1), gen(2)], prompt_embeds=e, negative_prompt_embeds=n)).images
    one = pipe(jit=cfg, **kw(1, generator=[gen(2)], prompt_embeds=e[1:], negative_prompt_embeds=n[1:])).images
    torch.testing.assert_close(both[1:], one, rtol=1e-4, atol=1e-5)


def test_klein_token_bucket_with_references(pipe):
    plain = pipe(jit="7x", **kw()).images
    with SeqLog(pipe.transformer) as log:
        bucketed = pipe(jit=JiTConfig.preset("7x", token_bucket=32), **kw()).images
    for c, m in zip(log.calls, [m for m in pipe.last_jit_report.active_tokens for _ in range(2)]):
        n = m + REF
        assert c["tokens"] % 32 == 0 and c["tokens"] - 32 < n <= c["tokens"]
        if c["tokens"] > n:
            keep = c["mask"].reshape(-1)
            text = c["enc"].shape[1]
            assert keep[:text + n].all() and not keep[text + n:].any()
    torch.testing.assert_close(bucketed, plain, rtol=1e-4, atol=1e-5)


def test_klein_report_counts_reference_tokens(pipe):
    pipe(jit="7x", **kw())
    rep = pipe.last_jit_report
    assert rep.flops["extra_tokens"] == [REF] * 11
    want = 11 * (64 + REF) / sum(m + REF for m in rep.active_tokens)
    assert rep.flops["speedup_vs_same_steps"]["image_linear"] == pytest.approx(want)


def test_klein_bad_references_raise_before_any_model_call(pipe):
    with SeqLog(pipe.transformer) as log:
        with pytest.raises(TypeError, match="PIL"):
            pipe(jit="7x", **kw(image=[ref_image(), np.zeros((64, 64, 3), np.uint8)]))
        with pytest.raises(ValueError):  # stock's check: sides of at least 64 pixels
            pipe(jit="7x", **kw(image=ref_image(32, 32)))
        with pytest.raises(ValueError, match="empty"):
            pipe(jit="7x", **kw(image=[]))
    assert log.calls == []


def test_klein_user_images_are_not_mutated(pipe):
    images = refs()
    before = [np.asarray(i).copy() for i in images]
    pipe(jit="7x", **kw(image=images))
    assert len(images) == 2 and all(np.array_equal(np.asarray(i), b) for i, b in zip(images, before))


# --- JiTFlux2KleinKVPipeline ------------------------------------------------------------------


def test_kv_jit_none_is_the_stock_pipeline(kv_base, kv):
    a = kv_base(num_inference_steps=3, **kv_kw()).images
    b = kv(num_inference_steps=3, jit=None, **kv_kw()).images
    assert torch.equal(a, b) and kv.last_jit_report is None


@pytest.mark.parametrize("image", [True, None])
def test_kv_dense_config_matches_stock(kv_base, kv, image):
    a = kv_base(num_inference_steps=4, **kv_kw(batch=2, image=image)).images
    with SeqLog(kv.transformer) as log:
        c = kv(num_inference_steps=4, jit=JiTConfig.dense(4), **kv_kw(batch=2, image=image)).images
    torch.testing.assert_close(c, a, rtol=0, atol=1e-5)
    if image is None:
        assert [e["tokens"] for e in log.calls] == [64] * 4 and all(e["mode"] is None for e in log.calls)
    else:
        assert [e["tokens"] for e in log.calls] == [REF + 64] + [64] * 3


def test_kv_extracts_once_then_reuses_the_cache_for_every_subset(kv):
    with SeqLog(kv.transformer) as log:
        out = kv(jit="7x", **kv_kw()).images
    rep = kv.last_jit_report
    counts = JiTConfig.preset("7x").token_counts(64)
    assert rep.active_tokens == [counts[0]] * 4 + [counts[1]] * 3 + [64] * 4 and rep.model_calls == 11
    assert [c["mode"] for c in log.calls] == ["extract"] + ["cached"] * 10
    # the first call: [reference, active] with the references' ids first, as stock lays it out
    first = log.calls[0]
    assert first["tokens"] == REF + counts[0] and first["ids"][:REF, 0].gt(0).all()
    assert first["ids"][REF:, 0].eq(0).all()
    # later calls: the active target tokens alone, all with the same cache
    assert [c["tokens"] for c in log.calls[1:]] == rep.active_tokens[1:]
    caches = {id(c["cache"]) for c in log.calls[1:]}
    assert len(caches) == 1 and log.calls[1]["cache"].num_ref_tokens == 0  # released after the run
    assert out.shape == (1, 8, 16, 16) and torch.isfinite(out).all()
    assert rep.flops["extra_tokens"] == [REF] + [0] * 10


def test_kv_cache_reuse_equals_extracting_in_every_call(kv, monkeypatch):
    """The cached reference K/V do not depend on the active subset: re-extracting them in every
    call (stage transitions included) gives the same result."""
    cached = kv(jit="7x", **kv_kw(batch=2)).images
    orig = KVReferenceVelocity._forward

    def fresh(self, *a, **k):
        self.release()
        return orig(self, *a, **k)

    monkeypatch.setattr(KVReferenceVelocity, "_forward", fresh)
    with SeqLog(kv.transformer) as log:
        extracted = kv(jit="7x", **kv_kw(batch=2)).images
    assert all(c["mode"] == "extract" for c in log.calls)
    torch.testing.assert_close(extracted, cached, rtol=1e-4, atol=1e-5)
    assert not torch.equal(cached, kv(jit="7x", **kv_kw(batch=2, image=None)).images)


def test_kv_per_sample_batch_matches_single_runs(kv):
    cfg = JiTConfig.preset("7x", anchor_policy="per_sample")
    e = embeds(2)
    with SeqLog(kv.transformer) as log:
        both = kv(jit=cfg, **kv_kw(2, generator=[gen(1), gen(2)], prompt_embeds=e)).images
    assert [c["mode"] for c in log.calls[:3]] == ["extract", "cached", "cached"]
    assert [c["batch"] for c in log.calls[:2]] == [1, 1] and log.calls[-1]["batch"] == 2
    one = kv(jit=cfg, **kv_kw(1, generator=[gen(2)], prompt_embeds=e[1:])).images
    torch.testing.assert_close(both[1:], one, rtol=1e-4, atol=1e-5)


def test_kv_seed_determinism_and_images_per_prompt(kv):
    a = kv(jit="4x", num_images_per_prompt=2, **kv_kw(batch=2)).images
    b = kv(jit="4x", num_images_per_prompt=2, **kv_kw(batch=2)).images
    c = kv(jit="4x", num_images_per_prompt=2, **kv_kw(batch=2, generator=gen(3))).images
    assert a.shape[0] == 4 and torch.equal(a, b) and not torch.equal(a, c)


def test_kv_token_bucket(kv):
    with SeqLog(kv.transformer) as log:
        with pytest.raises(NotImplementedError, match="token_bucket"):
            kv(jit=JiTConfig.preset("7x", token_bucket=32), **kv_kw())
    assert log.calls == []
    plain = kv(jit="7x", **kv_kw(image=None)).images  # without references the bucket is fine
    bucketed = kv(jit=JiTConfig.preset("7x", token_bucket=32), **kv_kw(image=None)).images
    torch.testing.assert_close(bucketed, plain, rtol=1e-4, atol=1e-5)


def test_kv_bad_inputs_raise_before_any_model_call(kv):
    with SeqLog(kv.transformer) as log:
        with pytest.raises(TypeError, match="PIL"):
            kv(jit="7x", **kv_kw(image=torch.zeros(1, 3, 64, 64)))
        with pytest.raises(TypeError):  # no CFG in the KV pipeline: its stock signature has no guidance_scale
            kv(jit="7x", guidance_scale=4.0, **kv_kw())
    assert log.calls == []


def test_enable_jit_picks_the_reference_pipelines(base, kv_base):
    e = enable_jit(kv_base, "7x")
    e.set_progress_bar_config(disable=True)
    assert type(e) is JiTFlux2KleinKVPipeline and e.transformer is kv_base.transformer
    e(**kv_kw())
    assert len(e.last_jit_report.active_tokens) == 11
    assert type(enable_jit(base, "7x")) is JiTFlux2KleinPipeline
