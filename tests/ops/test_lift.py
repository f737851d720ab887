"""The lift family (``nearest_anchor_map``, ``lift_field``, ``lift_euler_``, ``lift_weights``) on every backend.

Every (device, backend) pair of :func:`jit_kernels.testing.device_backends` (``cpu-cpp`` = the
compiled CPU extension, ``cpu-triton`` = Triton through TRITON_INTERPRET=1, see conftest.py;
``cuda-cuda`` / ``cuda-triton`` = the CUDA kernels and compiled Triton, ``gpu``-marked) against
the plain-PyTorch reference on the CPU, through the public functions: the nearest map bit for
bit, the lifts within :func:`jit_kernels.testing.tolerance`. Then the code paths only the C++
kernels have (the ring-search nearest map, the merged horizontal taps of the lift; called
directly, ``torch.ops.jit_kernels.<op>``), Triton's exact paths, the nearest map on grids whose
squared distances pass int32, the blur parameters (``lift_weights``, ``gaussian_weights``), and
the lift kernels' A/B switch (``JIT_KERNELS_LIFT_VARIANT``): v2 (default) against v1. v2 changes
how the Triton lift finds each tap's reflected cell (a phase stepped per tap, no remainder per
tap) and, on a GPU, its launch shape (enough programs at B = 1); v1 is the kernel before, kept
selectable for benchmarks (benchmarks/README.md, "Kernel variants"). Both visit the same cells
in the same order, so on the same device they agree bit for bit; each is also compared with the
reference on grids smaller than the blur window, where the reflection wraps more than once. The
CUDA kernels read the same switch (``gpu``-marked test). Registration, backend choice and the
validation policy are tested for every op in test_op_table.py.
"""

from __future__ import annotations

import pytest
import torch

import jit_kernels as jk
from jit_kernels import reference as ref
from jit_kernels._env import LIFT_VARIANT, lift_variant
from jit_kernels.testing import (DTYPES, GRIDS, anchors, assert_close, counts, device_backends, gen, on, tokens,
                                 tolerance)
from tests.ops._helpers import (BACKENDS, TRITON_DEV, TRITON_INTERPRET, interpreter_rows_slow, needs_cpp, needs_runner,
                                needs_triton, offset_tokens, ops, strided_tokens, triton, triton_randn)

try:
    from jit_kernels.triton import lift as triton_lift
except ImportError:  # triton is not importable: the tests that need it are skipped (needs_triton)
    triton_lift = None

DEVICE_BACKENDS = interpreter_rows_slow(device_backends())
# The two backends whose lift kernels have variants.
VARIANT_BACKENDS = interpreter_rows_slow(device_backends(("cuda", "triton")))
F32 = tolerance(torch.float32)
DEV = TRITON_DEV  # where the Triton tests below run (None: skipped by needs_runner)


# ---------------------------------------------------------------- nearest map


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("grid", GRIDS)
def test_nearest_map_exact(device, backend, grid):
    h, w = grid
    n = h * w
    for m in counts(n):
        a = anchors(n, m)
        got = jk.nearest_anchor_map(on(device, a), h, w, backend=backend)
        assert got.device.type == device and torch.equal(got.cpu(), ref.nearest_anchor_map_ref(a, h, w))
    ab = anchors(n, max(1, n // 4), batch=2)
    got = jk.nearest_anchor_map(on(device, ab), h, w, backend=backend)
    assert torch.equal(got.cpu(), ref.nearest_anchor_map_ref(ab, h, w))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nearest_map_ties_go_to_first_anchor(device, backend):
    # Cell (0, 1) is at distance 1 from both anchors (0, 0) and (0, 2).
    for order in ([0, 2], [2, 0]):
        a = torch.tensor(order)
        got = jk.nearest_anchor_map(on(device, a), 1, 3, backend=backend).cpu()
        assert got[1].item() == 0, "tie must go to the anchor listed first"
        assert torch.equal(got, ref.nearest_anchor_map_ref(a, 1, 3))


def test_nearest_map_reference_is_euclidean():
    # (0,0) and (3,3): cell (0,3) is 3 from (3,3) and 3 from (0,0) -> first; cell (1,3) is 2 vs sqrt(10).
    a = torch.tensor([0, 15])
    got = ref.nearest_anchor_map_ref(a, 4, 4)
    assert got[3].item() == 0 and got[7].item() == 1 and got[4].item() == 0


# ---------------------------------------------------------------- lift


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", GRIDS)
def test_lift_field_matches_reference(device, backend, dtype, grid):
    h, w = grid
    n, b, c = h * w, 2, 6
    for m in counts(n):
        a = anchors(n, m)
        vals = tokens(b, m, c, dtype, seed=m)
        got = jk.lift_field(*on(device, vals, a), h, w, backend=backend).cpu()
        want = ref.lift_field_ref(vals, a, ref.nearest_anchor_map_ref(a, h, w), jk.lift_weights(m, n), h, w)
        assert_close(got, want, dtype)
        assert torch.equal(got[:, a], vals), "anchors must keep their exact values"


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_lift_field_per_sample_and_explicit_blur(device, backend):
    h, w, b, c = 8, 11, 3, 4
    n = h * w
    a = anchors(n, 30, batch=b)
    vals = tokens(b, 30, c, torch.float32)
    near = jk.nearest_anchor_map(a, h, w)
    for kw in ({}, {"sigma": 2.5}, {"sigma": 1.0, "kernel_size": 3}):
        got = jk.lift_field(*on(device, vals, a), h, w, nearest=on(device, near), backend=backend, **kw).cpu()
        wts = jk.lift_weights(30, n, **kw)
        assert_close(got, ref.lift_field_ref(vals, a, near, wts, h, w), torch.float32)


def test_lift_reference_matches_published_composition():
    h = w = 16
    a = anchors(h * w, 80)
    vals = tokens(1, 80, 3, torch.float32)
    wts = jk.lift_weights(80, h * w)
    got = ref.lift_field_ref(vals, a, ref.nearest_anchor_map_ref(a, h, w), wts, h, w)
    torch.testing.assert_close(got, ref.lift_field_published(vals, a, wts, h, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lift_euler_inplace(device, backend, dtype):
    h, w, b, c = 7, 13, 2, 5
    n = h * w
    a = anchors(n, 25)
    vals = tokens(b, 25, c, dtype, seed=3)
    y0 = tokens(b, n, c, dtype, seed=4)
    y = on(device, y0.clone())
    out = jk.lift_euler_(y, *on(device, vals, a), h, w, -0.37, backend=backend)
    assert out is y
    want = ref.lift_euler_ref_(y0.clone(), vals, a, ref.nearest_anchor_map_ref(a, h, w), jk.lift_weights(25, n), h, w, -0.37)
    assert_close(y.cpu(), want, dtype)


# ---------------------------------------------------------------- the C++ kernels called directly


@needs_cpp
def test_lift_and_importance_noncontiguous():
    h, w, m, c = 7, 13, 20, 6
    n = h * w
    vals = strided_tokens(2, m, c)
    a = anchors(n, 2 * m)[::2]  # a strided anchor set
    near = torch.stack([ref.nearest_anchor_map_ref(a, h, w)] * 2, 1)[:, 0]  # strided [N]
    assert not (vals.is_contiguous() or a.is_contiguous() or near.is_contiguous())
    wt = jk.gaussian_weights(1.0, 7)
    want = ref.lift_field_ref(vals.contiguous(), a.contiguous(), near.contiguous(), wt, h, w)
    torch.testing.assert_close(ops.lift_field(vals, a, near, wt, h, w), want, **F32)
    assert torch.equal(ops.nearest_anchor_map(a, h, w), near)
    field = strided_tokens(2, n, c, seed=4)
    torch.testing.assert_close(ops.token_importance(field, h, w), ref.token_importance_ref(field.contiguous(), h, w),
                               **F32)
    imp = torch.rand(n, 2, generator=gen(5)).t()
    assert torch.equal(ops.select_new_tokens(imp, a, 9), ref.select_new_tokens_ref(imp.contiguous(), a, 9))


def _tie_heavy_anchors(h, w, m, seed):
    """Anchors on a coarse lattice (many equidistant pairs) plus random ones, in random order."""
    n = h * w
    lattice = torch.tensor([r * w + c for r in range(0, h, 3) for c in range(0, w, 3)])
    rest = torch.randperm(n, generator=gen(seed))
    pool = torch.cat([lattice, rest[~torch.isin(rest, lattice)]])[:m]
    return pool[torch.randperm(pool.numel(), generator=gen(seed + 1))]


@needs_cpp
@pytest.mark.parametrize("grid", [(1, 37), (37, 1), (7, 13), (32, 32), (20, 45)])
def test_nearest_map_both_search_paths_exact(grid):
    # Few anchors take the brute-force path, many take the ring search (m*m > 8n).
    h, w = grid
    n = h * w
    for m in sorted({1, 2, 3, max(1, n // 20), int((8 * n) ** 0.5) + 1, n // 3, n - 1, n}):
        a = _tie_heavy_anchors(h, w, m, seed=m)
        assert torch.equal(ops.nearest_anchor_map(a, h, w), ref.nearest_anchor_map_ref(a, h, w)), (grid, m)


@needs_cpp
def test_nearest_map_ties_prefer_first_listed_anchor():
    # Cell 12 (row 2, col 2) of a 5 x 5 grid is equidistant from all four anchors.
    for order in ([2, 10, 14, 22], [22, 14, 10, 2], [14, 2, 22, 10]):
        a = torch.tensor(order)
        got = ops.nearest_anchor_map(a, 5, 5)
        assert int(got[12]) == 0
        assert torch.equal(got, ref.nearest_anchor_map_ref(a, 5, 5))
    # The same on a dense set that takes the ring search.
    h = w = 16
    a = torch.tensor([r * w + c for r in range(0, h, 2) for c in range(0, w, 2)]).flip(0)
    assert torch.equal(ops.nearest_anchor_map(a, h, w), ref.nearest_anchor_map_ref(a, h, w))


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 3, 7, 15])
def test_lift_kernel_wider_than_grid_and_merged_taps(dtype, k):
    # Sparse anchors make long runs of equal nearest anchors (the merged-tap path);
    # a 2 x 3 grid with a 15-tap kernel exercises the periodic reflect extension.
    wt = jk.gaussian_weights(2.0, k)
    tol = tolerance(dtype)
    for h, w, m in ((2, 3, 1), (1, 23, 3), (9, 11, 4), (16, 16, 256)):
        a = anchors(h * w, m, seed=h + w)
        near = ref.nearest_anchor_map_ref(a, h, w)
        vals = offset_tokens(2, m, 5, dtype)
        got = ops.lift_field(vals, a, near, wt, h, w)
        want = ref.lift_field_ref(vals, a, near, wt, h, w)
        torch.testing.assert_close(got, want, **tol)
        # Anchors are exact copies, whatever the dtype.
        assert torch.equal(got[:, a], vals)


# ---------------------------------------------------------------- Triton


@needs_runner
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_exact_paths_in_half_precision(dtype):
    h, w, b, c = 7, 13, 3, 5
    n = h * w
    a = anchors(n, n, batch=b, device=DEV)[:, :20].contiguous()
    vals = triton_randn(b, 20, c, dtype=dtype)
    got = jk.lift_field(vals, a, h, w, backend="triton")
    assert torch.equal(ref.gather_tokens_ref(got, a), vals), "anchors must be exact"
    y = triton_randn(b, n, c, dtype=dtype, seed=3)
    tgt = triton_randn(b, 20, c, dtype=torch.float32, seed=4)
    out = jk.microflow_update(y, a, tgt, "assign", backend="triton")
    assert torch.equal(ref.gather_tokens_ref(out, a), tgt.to(dtype)), "assign must copy the target exactly"


@needs_triton
@pytest.mark.gpu
def test_flux_size_lift_on_cuda():
    h = w = 64
    n, b, c, m = h * w, 2, 64, 1310
    a = torch.randperm(n, device="cuda")[:m]
    vals = torch.randn(b, m, c, device="cuda", dtype=torch.bfloat16)
    near = jk.nearest_anchor_map(a, h, w, backend="triton")
    assert torch.equal(near, ref.nearest_anchor_map_ref(a, h, w))
    got = jk.lift_field(vals, a, h, w, nearest=near, backend="triton")
    want = ref.lift_field_ref(vals, a, near, jk.lift_weights(m, n, device="cuda"), h, w)
    assert_close(got, want, torch.bfloat16)


# ---------------------------------------------------------------- nearest map on wide grids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hw", [(1, 50000), (50000, 1), (46342, 3)])
def test_nearest_map_exact_where_squared_distances_exceed_int32(backend, hw):
    """The Triton kernel squared distances in int32: 7318 of 50000 cells were wrong on a 1 x 50000 grid."""
    h, w = hw
    n = h * w
    a = torch.stack([anchors(n, 5, seed=3), torch.tensor([0, n - 1, 17, n // 2, 123])])
    got = jk.nearest_anchor_map(a, h, w, backend=backend)
    assert torch.equal(got, ref.nearest_anchor_map_ref(a, h, w))
    # Ties go to the first-listed anchor in the wide variant too: anchors at both ends, probe the middle.
    b = torch.tensor([n - 1, 0]) if h == 1 or w == 1 else torch.tensor([0, n - 1])
    assert torch.equal(jk.nearest_anchor_map(b, h, w, backend=backend), ref.nearest_anchor_map_ref(b, h, w))


def test_triton_nearest_switches_to_int64_exactly_past_int32():
    lift = pytest.importorskip("jit_kernels.triton.lift")
    assert not lift.nearest_is_wide(1, 46341)  # 46340^2 = 2147395600 < 2^31
    assert lift.nearest_is_wide(1, 46342)
    assert not lift.nearest_is_wide(2**15, 2**15)  # the largest square grid: 2 (2^15 - 1)^2 < 2^31


# ---------------------------------------------------------------- blur parameters


def test_blur_parameter_bounds():
    with pytest.raises(ValueError, match="blur_scale must be finite"):
        jk.lift_weights(3, 10, blur_scale=float("inf"))
    with pytest.raises(ValueError, match="blur_scale must be finite"):
        jk.lift_weights(10, 10, blur_scale=float("nan"))  # rho = 1 used to skip the check
    with pytest.raises(ValueError, match="finite and positive"):
        jk.blur_params(10, 10, float("nan"))
    with pytest.raises(ValueError, match=r"sigma = 1000000000.0 asks for a 6000000001-tap blur"):
        jk.lift_weights(3, 10, sigma=1e9)
    with pytest.raises(ValueError, match="kernel_size 1099511627777 is larger than the 1025 supported"):
        jk.lift_weights(3, 10, kernel_size=2**40 + 1)
    with pytest.raises(ValueError, match="larger than the 1025 supported"):
        jk.gaussian_weights(1.0, 1027)
    with pytest.raises(TypeError, match="kernel_size must be a positive odd int"):
        jk.lift_weights(3, 10, kernel_size=3.0)
    with pytest.raises(ValueError, match="kernel_size must be a positive odd int"):
        jk.lift_weights(3, 10, kernel_size=4)
    with pytest.raises(ValueError, match="sigma must be finite and positive"):
        jk.gaussian_weights(float("inf"), 3)
    with pytest.raises(ValueError, match="lift_field: kernel_size"):
        jk.lift_field(tokens(1, 2, 2), torch.tensor([0, 3]), 2, 2, sigma=1.0, kernel_size=2**40 + 1)
    # The bound is generous: the largest accepted kernel and the defaults pass, values unchanged.
    assert jk.gaussian_weights(1.0, jk.blur.MAX_KERNEL_SIZE).shape == (1025,)
    assert jk.lift_weights(3, 10, sigma=1e9, kernel_size=5).shape == (5,)
    for m in range(1, 4097, 97):
        s, k = jk.blur_params(m, 4096)
        assert k <= 61
        assert torch.equal(jk.lift_weights(m, 4096), jk.gaussian_weights(s, k))
    # A sigma whose square underflows gave NaN taps; now the identity (the limit).
    tiny = jk.gaussian_weights(1e-200, 5)
    assert torch.equal(tiny, torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0]))


# ---------------------------------------------------------------- kernel variants (JIT_KERNELS_LIFT_VARIANT)


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


@needs_triton
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


@needs_triton
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


@needs_triton
@pytest.mark.skipif(not TRITON_INTERPRET, reason="the interpreter's launch (the bad value must raise before it)")
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


@needs_triton
def test_v2_launch_fills_the_gpu_at_batch_one():
    # FLUX 1024^2: a 64 x 64 grid of C = 64 latents; the DMF target at ~1150 new cells.
    def programs(rows, c, variant):
        br, bc, step = triton_lift.lift_launch_shape(rows, c, variant, interpret=False)
        assert br & (br - 1) == 0 and bc & (bc - 1) == 0 and step == (variant == "v2")
        return triton.cdiv(rows, br) * triton.cdiv(c, bc), br * bc

    assert triton_lift.lift_launch_shape(4096, 64, "v1", interpret=False) == (32, 64, False)  # the old launch
    assert programs(4096, 64, "v1")[0] == 128
    for rows, c in ((4096, 64), (2 * 4096, 64), (1147, 64), (4096, 128), (4096, 16)):
        n_v2, tile = programs(rows, c, "v2")
        n_v1, _ = programs(rows, c, "v1")
        assert n_v2 >= triton_lift._LIFT_MIN_PROGRAMS or tile <= triton_lift._LIFT_MIN_TILE
        assert n_v2 >= n_v1 and tile >= min(triton_lift._LIFT_MIN_TILE, c)
    assert programs(4096, 64, "v2")[0] == 1024
    big = programs(16 * 4096, 64, "v2")  # enough programs already: the v1 tile is kept
    assert big == programs(16 * 4096, 64, "v1")
    # The interpreter keeps its large tiles in both variants.
    assert (triton_lift.lift_launch_shape(4096, 64, "v2", interpret=True)[:2]
            == triton_lift.lift_launch_shape(4096, 64, "v1", interpret=True)[:2])


@needs_triton
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
