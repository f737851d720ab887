"""The lift kernels' A/B switch (``JIT_KERNELS_LIFT_VARIANT``): v2 (default) against v1.

v2 changes how the Triton lift finds each tap's reflected cell (a phase stepped per tap, no
remainder per tap) and, on a GPU, its launch shape (enough programs at B = 1); v1 is the
kernel before, kept selectable for benchmarks (benchmarks/README.md, "Kernel variants"). Both
visit the same cells in the same order, so on the same device they agree bit for bit; each is
also compared with the reference on grids smaller than the blur window, where the reflection
wraps more than once. The CUDA kernels read the same switch (``gpu``-marked test).
"""

from __future__ import annotations

import pytest
import torch

import jit_kernels as jk
from jit_kernels import reference as ref
from jit_kernels._env import LIFT_VARIANT, lift_variant
from jit_kernels.testing import anchors, assert_close, device_backends, on, tokens

triton = pytest.importorskip("triton")
from jit_kernels.triton import lift  # noqa: E402

# The two backends whose lift kernels have variants.
VARIANT_BACKENDS = device_backends(("cuda", "triton"))


def _lifts(device, backend, h, w, dtype, **blur):
    """lift_field, lift_euler_ and microflow_target on one per-sample case: results on the CPU."""
    n, b, c, m = h * w, 2, 5, max(1, (h * w) // 3)
    perm = anchors(n, n, batch=b)
    a, new = perm[:, :m].contiguous(), perm[:, m:m + max(1, m // 2)].contiguous()
    vals = tokens(b, m, c, dtype, seed=1)
    y = tokens(b, n, c, dtype, seed=2)
    v = tokens(b, n, c, dtype, seed=3, offset=0.0)
    eps = tokens(b, new.shape[1], c, dtype, seed=4, offset=0.0)
    ad, vd, yd, veld, newd, epsd = on(device, a, vals, y, v, new, eps)
    field = jk.lift_field(vd, ad, h, w, backend=backend, **blur).cpu()
    ye = yd.clone()
    jk.lift_euler_(ye, vd, ad, h, w, -0.3, backend=backend, **blur)
    target = jk.microflow_target(yd, veld, ad, newd, epsd, 0.8, 0.6, h, w, backend=backend).cpu()
    return field, ye.cpu(), target, (a, vals, y, v, new, eps)


@pytest.mark.parametrize("device,backend", VARIANT_BACKENDS)
@pytest.mark.parametrize("hw,blur", [((7, 13), {}), ((3, 2), {"sigma": 3.0, "kernel_size": 9}),
                                     ((1, 17), {"sigma": 2.0}), ((9, 1), {})])
def test_v2_equals_v1_and_the_reference(monkeypatch, device, backend, hw, blur):
    h, w = hw
    got = {}
    for variant in ("v1", "v2"):
        monkeypatch.setenv(LIFT_VARIANT, variant)
        got[variant] = _lifts(device, backend, h, w, torch.float32, **blur)
    for x1, x2 in zip(got["v1"][:3], got["v2"][:3]):
        assert torch.equal(x1, x2), "v1 and v2 must visit the same cells in the same order"
    field, ye, target, (a, vals, y, v, new, eps) = got["v2"]
    near = ref.nearest_anchor_map_ref(a, h, w)
    wts = jk.lift_weights(a.shape[1], h * w, **blur)
    assert_close(field, ref.lift_field_ref(vals, a, near, wts, h, w), torch.float32)
    assert_close(ye, ref.lift_euler_ref_(y.clone(), vals, a, near, wts, h, w, -0.3), torch.float32)
    want = ref.microflow_target_ref(y, v, a, near, jk.lift_weights(a.shape[1], h * w), new, eps, 0.8, 0.6, h, w)
    assert_close(target, want, torch.float32)


def test_variant_switch_reads_the_environment(monkeypatch):
    monkeypatch.delenv(LIFT_VARIANT, raising=False)
    assert lift_variant() == "v2"
    monkeypatch.setenv(LIFT_VARIANT, "")
    assert lift_variant() == "v2"
    monkeypatch.setenv(LIFT_VARIANT, "v1")
    assert lift_variant() == "v1"
    monkeypatch.setenv(LIFT_VARIANT, "v3")
    with pytest.raises(ValueError, match="JIT_KERNELS_LIFT_VARIANT='v3'"):
        lift_variant()


@pytest.mark.skipif(not lift.INTERPRET, reason="the interpreter's launch (the bad value must raise before it)")
def test_bad_variant_raises_before_any_launch(monkeypatch):
    vals, a = tokens(1, 3, 2), torch.tensor([0, 4, 8])
    monkeypatch.setenv(LIFT_VARIANT, "fast")
    y = tokens(1, 9, 2, seed=1)
    keep = y.clone()
    with pytest.raises(ValueError, match="expected one of"):
        jk.lift_field(vals, a, 3, 3, backend="triton")
    with pytest.raises(ValueError, match="expected one of"):
        jk.lift_euler_(y, vals, a, 3, 3, 0.5, backend="triton")
    assert torch.equal(y, keep)


def test_v2_launch_fills_the_gpu_at_batch_one():
    # FLUX 1024^2: a 64 x 64 grid of C = 64 latents; the DMF target at ~1150 new cells.
    def programs(rows, c, variant):
        br, bc, step = lift.lift_launch_shape(rows, c, variant, interpret=False)
        assert br & (br - 1) == 0 and bc & (bc - 1) == 0 and step == (variant == "v2")
        return triton.cdiv(rows, br) * triton.cdiv(c, bc), br * bc

    assert lift.lift_launch_shape(4096, 64, "v1", interpret=False) == (32, 64, False)  # the old launch
    assert programs(4096, 64, "v1")[0] == 128
    for rows, c in ((4096, 64), (2 * 4096, 64), (1147, 64), (4096, 128), (4096, 16)):
        n_v2, tile = programs(rows, c, "v2")
        n_v1, _ = programs(rows, c, "v1")
        assert n_v2 >= lift._LIFT_MIN_PROGRAMS or tile <= lift._LIFT_MIN_TILE
        assert n_v2 >= n_v1 and tile >= min(lift._LIFT_MIN_TILE, c)
    assert programs(4096, 64, "v2")[0] == 1024
    big = programs(16 * 4096, 64, "v2")  # enough programs already: the v1 tile is kept
    assert big == programs(16 * 4096, 64, "v1")
    # The interpreter keeps its large tiles in both variants.
    assert lift.lift_launch_shape(4096, 64, "v2", interpret=True)[:2] == lift.lift_launch_shape(4096, 64, "v1",
                                                                                                 interpret=True)[:2]


@pytest.mark.parametrize("device,backend", VARIANT_BACKENDS)
def test_nearest_map_both_variants_exact(monkeypatch, device, backend):
    # The CUDA v2 map splits the anchor list over 16 warps in tiles of 512: lists shorter than a
    # slice, spanning several tiles, not a multiple of 16; ties across slices go to the first listed.
    h, w = 37, 41
    n = h * w
    cases = [anchors(n, m, seed=m) for m in (1, 5, 600, n)] + [anchors(n, 513, batch=3)]
    ring = torch.tensor([20 * w + 20 + d for d in (-2 * w, 2 * w, -2, 2)])  # four anchors tied at the centre
    cases += [ring, ring.flip(0), torch.cat([torch.arange(17) * 3, ring])]
    for variant in ("v1", "v2"):
        monkeypatch.setenv(LIFT_VARIANT, variant)
        for a in cases:
            got = jk.nearest_anchor_map(on(device, a), h, w, backend=backend).cpu()
            assert torch.equal(got, ref.nearest_anchor_map_ref(a, h, w)), (variant, a.shape)
