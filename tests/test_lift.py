"""The lift family (``nearest_anchor_map``, ``lift_field``, ``lift_euler_``) on every backend.

Every (device, backend) pair of :func:`jit_kernels.testing.device_backends` (``cpu-cpp`` = the
compiled CPU extension, ``cpu-triton`` = Triton through TRITON_INTERPRET=1, see conftest.py;
``cuda-cuda`` / ``cuda-triton`` = the CUDA kernels and compiled Triton, ``gpu``-marked) against
the plain-PyTorch reference on the CPU, through the public functions: the nearest map bit for
bit, the lifts within :func:`jit_kernels.testing.tolerance`. Registration, backend choice and
the validation policy are tested for every op in test_op_table.py.
"""

from __future__ import annotations

import pytest
import torch

import jit_kernels as jk
from jit_kernels import reference as ref
from jit_kernels.testing import DTYPES, GRIDS, anchors, assert_close, counts, device_backends, on, tokens

DEVICE_BACKENDS = device_backends()


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
