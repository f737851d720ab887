"""Every backend of every jit_kernels op against the plain-PyTorch reference.

Backends under test are those present on the machine (``cpp`` = the compiled
CPU extension, ``triton`` = Triton kernels, on CPU through TRITON_INTERPRET=1
only, see conftest.py). ``test_backends_present`` fails if the build lost one,
so a missing backend can never hide behind a skip.
"""

from __future__ import annotations

import pytest
import torch

import jit_kernels as jk
from jit_kernels import reference as ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Tolerances of a backend against the reference in the same dtype: fp32 differ
# by summation order only; half types by one rounding of the output.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
BACKENDS = [b for b in ("cpp", "triton") if b in jk.available_backends("cpu")]
# (height, width): odd, single row, single column, square.
GRIDS = [(7, 13), (1, 17), (9, 1), (16, 16)]


def test_backends_present():
    have = jk.available_backends("cpu")
    assert "reference" in have
    assert "cpp" in have, f"compiled extension missing: {jk.extension_error()}"
    assert "triton" in have, "Triton backend missing (triton not importable or TRITON_INTERPRET unset)"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _tokens(b, n, c, dtype, seed=0, offset=3.0):
    # Offset away from zero: a row a kernel forgot to write (zeros or garbage) cannot pass.
    return (torch.randn(b, n, c, generator=_gen(seed)) + offset).to(dtype)


def _anchors(n, m, seed=1, batch=None):
    if batch is None:
        return torch.randperm(n, generator=_gen(seed))[:m]
    return torch.stack([torch.randperm(n, generator=_gen(seed + i))[:m] for i in range(batch)])


def _counts(n):
    return sorted({1, max(1, n // 3), n})


# ---------------------------------------------------------------- gather / scatter


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_gather_scatter_exact(backend, dtype, per_sample):
    b, n, c = 3, 91, 5
    x = _tokens(b, n, c, dtype)
    for m in _counts(n):
        idx = _anchors(n, m, batch=b if per_sample else None)
        g = jk.gather_tokens(x, idx, backend=backend)
        assert torch.equal(g, ref.gather_tokens_ref(x, idx))
        src = _tokens(b, m, c, dtype, seed=5, offset=-3.0)
        base = x.clone()
        out = jk.scatter_tokens(base, idx, src, backend=backend)
        assert torch.equal(base, x), "out-of-place scatter modified its input"
        assert torch.equal(out, ref.scatter_tokens_ref(x, idx, src))
        poisoned = x.clone()
        ref.scatter_tokens_ref_(poisoned, idx, torch.full_like(src, float("nan")))
        res = jk.scatter_tokens_(poisoned, idx, src, backend=backend)
        assert res is poisoned
        assert torch.equal(poisoned, out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_noncontiguous(backend):
    x = _tokens(2, 40, 12, torch.float32)[:, :, ::2]  # stride 2 on C
    idx = torch.arange(39, -1, -3)
    assert torch.equal(jk.gather_tokens(x, idx, backend=backend), ref.gather_tokens_ref(x, idx))
    xt = _tokens(40, 2, 6, torch.float32).transpose(0, 1)  # batch-major view
    assert torch.equal(jk.gather_tokens(xt, idx, backend=backend), ref.gather_tokens_ref(xt, idx))


# ---------------------------------------------------------------- nearest map


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid", GRIDS)
def test_nearest_map_exact(backend, grid):
    h, w = grid
    n = h * w
    for m in _counts(n):
        a = _anchors(n, m)
        assert torch.equal(jk.nearest_anchor_map(a, h, w, backend=backend), ref.nearest_anchor_map_ref(a, h, w))
    ab = _anchors(n, max(1, n // 4), batch=2)
    assert torch.equal(jk.nearest_anchor_map(ab, h, w, backend=backend), ref.nearest_anchor_map_ref(ab, h, w))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_map_ties_go_to_first_anchor(backend):
    # Cell (0, 1) is at distance 1 from both anchors (0, 0) and (0, 2).
    for order in ([0, 2], [2, 0]):
        a = torch.tensor(order)
        got = jk.nearest_anchor_map(a, 1, 3, backend=backend)
        assert got[1].item() == 0, "tie must go to the anchor listed first"
        assert torch.equal(got, ref.nearest_anchor_map_ref(a, 1, 3))


def test_nearest_map_reference_is_euclidean():
    # (0,0) and (3,3): cell (0,3) is 3 from (3,3) and 3 from (0,0) -> first; cell (1,3) is 2 vs sqrt(10).
    a = torch.tensor([0, 15])
    got = ref.nearest_anchor_map_ref(a, 4, 4)
    assert got[3].item() == 0 and got[7].item() == 1 and got[4].item() == 0


# ---------------------------------------------------------------- lift


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", GRIDS)
def test_lift_field_matches_reference(backend, dtype, grid):
    h, w = grid
    n, b, c = h * w, 2, 6
    for m in _counts(n):
        a = _anchors(n, m)
        vals = _tokens(b, m, c, dtype, seed=m)
        got = jk.lift_field(vals, a, h, w, backend=backend)
        want = ref.lift_field_ref(vals, a, ref.nearest_anchor_map_ref(a, h, w), jk.lift_weights(m, n), h, w)
        torch.testing.assert_close(got, want, **TOL[dtype])
        assert torch.equal(got[:, a], vals), "anchors must keep their exact values"


@pytest.mark.parametrize("backend", BACKENDS)
def test_lift_field_per_sample_and_explicit_blur(backend):
    h, w, b, c = 8, 11, 3, 4
    n = h * w
    a = _anchors(n, 30, batch=b)
    vals = _tokens(b, 30, c, torch.float32)
    near = jk.nearest_anchor_map(a, h, w)
    for kw in ({}, {"sigma": 2.5}, {"sigma": 1.0, "kernel_size": 3}):
        got = jk.lift_field(vals, a, h, w, nearest=near, backend=backend, **kw)
        wts = jk.lift_weights(30, n, **kw)
        torch.testing.assert_close(got, ref.lift_field_ref(vals, a, near, wts, h, w), **TOL[torch.float32])


def test_lift_reference_matches_published_composition():
    h = w = 16
    a = _anchors(h * w, 80)
    vals = _tokens(1, 80, 3, torch.float32)
    wts = jk.lift_weights(80, h * w)
    got = ref.lift_field_ref(vals, a, ref.nearest_anchor_map_ref(a, h, w), wts, h, w)
    torch.testing.assert_close(got, ref.lift_field_published(vals, a, wts, h, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lift_euler_inplace(backend, dtype):
    h, w, b, c = 7, 13, 2, 5
    n = h * w
    a = _anchors(n, 25)
    vals = _tokens(b, 25, c, dtype, seed=3)
    y = _tokens(b, n, c, dtype, seed=4)
    y0 = y.clone()
    out = jk.lift_euler_(y, vals, a, h, w, -0.37, backend=backend)
    assert out is y
    want = ref.lift_euler_ref_(y0.clone(), vals, a, ref.nearest_anchor_map_ref(a, h, w), jk.lift_weights(25, n), h, w, -0.37)
    torch.testing.assert_close(y, want, **TOL[dtype])


# ---------------------------------------------------------------- importance


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grid", GRIDS)
def test_token_importance(backend, dtype, grid):
    h, w = grid
    f = _tokens(2, h * w, 7, dtype, offset=0.5)
    got = jk.token_importance(f, h, w, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (2, h * w)
    torch.testing.assert_close(got, ref.token_importance_ref(f, h, w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_sample", [False, True])
def test_select_new_tokens_exact(backend, per_sample):
    b, n = 3, 200
    imp = torch.randn(b, n, generator=_gen(2))
    imp[:, 50:60] = 0.25  # ties: lower index first
    imp[0, 7] = float("nan")
    act = _anchors(n, 64, batch=b if per_sample else None)
    for count in (0, 1, 17, n - 64):
        got = jk.select_new_tokens(imp, act, count, backend=backend)
        assert torch.equal(got, ref.select_new_tokens_ref(imp, act, count))


def test_select_reference_rules():
    imp = torch.tensor([[0.5, 0.9, 0.5, 0.9, 0.1]])
    got = ref.select_new_tokens_ref(imp, torch.tensor([1]), 3)
    assert got.tolist() == [[3, 0, 2]]


# ---------------------------------------------------------------- micro-flow


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_microflow_update(backend, dtype):
    b, n, c = 2, 50, 6
    y = _tokens(b, n, c, dtype)
    r = _anchors(n, 12, seed=9)
    tgt = _tokens(b, 12, c, dtype, seed=10, offset=-2.0)
    # assign lands exactly on the target, even over poisoned rows
    poisoned = y.clone()
    ref.scatter_tokens_ref_(poisoned, r, torch.full_like(tgt, float("nan")))
    out = jk.microflow_update(poisoned, r, tgt, "assign", backend=backend)
    assert torch.equal(out[:, r], tgt) and torch.equal(out, ref.scatter_tokens_ref(y, r, tgt))
    assert torch.isnan(poisoned).any(), "out-of-place update modified its input"
    for wgt in (1 / 3, 0.5, 1.0):
        got = jk.microflow_update(y, r, tgt, "blend", wgt, backend=backend)
        torch.testing.assert_close(got, ref.microflow_update_ref_(y.clone(), r, tgt, wgt), **TOL[dtype])
    yi = y.clone()
    assert jk.microflow_update(yi, r, tgt, "blend", 0.25, inplace=True, backend=backend) is yi


def test_substeps_land_on_target():
    y = _tokens(1, 30, 4, torch.float32)
    r = torch.tensor([3, 7, 11])
    tgt = _tokens(1, 3, 4, torch.float32, seed=3)
    for k in range(4, 0, -1):  # weights 1/4, 1/3, 1/2, 1
        y = jk.microflow_update(y, r, tgt, "blend", 1.0 / k)
    assert torch.equal(y[:, r], tgt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_sample", [False, True])
def test_microflow_target(backend, dtype, per_sample):
    h, w, b, c = 9, 10, 2, 5
    n = h * w
    perm = _anchors(n, n, batch=b if per_sample else None)
    old, new = perm[..., :30], perm[..., 30:45]
    y = _tokens(b, n, c, dtype)
    v = _tokens(b, n, c, dtype, seed=1, offset=0.0)
    eps = _tokens(b, 15, c, dtype, seed=2, offset=0.0)
    got = jk.microflow_target(y, v, old, new, eps, 0.8, 0.7, h, w, backend=backend)
    near = ref.nearest_anchor_map_ref(old, h, w)
    want = ref.microflow_target_ref(y, v, old, near, jk.lift_weights(30, n), new, eps, 0.8, 0.7, h, w)
    torch.testing.assert_close(got, want, **TOL[dtype])


# ---------------------------------------------------------------- registration


def _op_samples():
    h, w, b, c = 5, 6, 2, 3
    n = h * w
    x = _tokens(b, n, c, torch.float32)
    a = _anchors(n, 10)
    near = ref.nearest_anchor_map_ref(a, h, w)
    wts = jk.lift_weights(10, n)
    vals = _tokens(b, 10, c, torch.float32, seed=4)
    new = torch.tensor([i for i in range(n) if i not in set(a.tolist())][:4])
    eps = _tokens(b, 4, c, torch.float32, seed=5)
    return {
        "gather_tokens": (x, a),
        "scatter_tokens": (x, a, vals),
        "scatter_tokens_": (x.clone(), a, vals),
        "nearest_anchor_map": (a, h, w),
        "lift_field": (vals, a, near, wts, h, w),
        "lift_euler_": (x.clone(), vals, a, near, wts, h, w, 0.1),
        "token_importance": (x, h, w),
        "select_new_tokens": (x[:, :, 0].contiguous(), a, 5),
        "microflow_update_": (x.clone(), new, eps, 0.5),
        "microflow_target": (x, x, a, near, wts, new, eps, 0.8, 0.6, h, w),
        "anchor_attention": (*(_tokens(b, n, 8, torch.float32, seed=6 + i).view(b, n, 2, 4) for i in range(3)),
                             torch.rand(n, 4, generator=_gen(9)), torch.rand(n, 4, generator=_gen(10)),
                             torch.tensor([n, 7]), 0.25),
    }


def test_every_schema_has_a_sample():
    assert set(_op_samples()) == set(jk._library.SCHEMAS)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(jk._library.SCHEMAS))
def test_opcheck(backend, name):
    args = _op_samples()[name]
    op = getattr(torch.ops.jit_kernels, name + ("_triton" if backend == "triton" else ""))
    torch.library.opcheck(op.default, args)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_torch_compile_fullgraph(backend):
    h, w = 6, 7
    n = h * w
    a = _anchors(n, 12)
    near = jk.nearest_anchor_map(a, h, w)
    x = _tokens(2, n, 4, torch.float32)

    def step(x):
        v = jk.gather_tokens(x, a, backend=backend)
        full = jk.lift_field(v, a, h, w, nearest=near, backend=backend)
        imp = jk.token_importance(full, h, w, backend=backend)
        return full, imp

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    want = step(x)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


# ---------------------------------------------------------------- bad inputs


BAD_BACKENDS = ["reference"] + BACKENDS


@pytest.mark.parametrize("backend", BAD_BACKENDS)
def test_bad_inputs_raise_before_work(backend):
    x = _tokens(2, 20, 3, torch.float32)
    a = torch.tensor([0, 5, 9])
    kw = {"backend": backend}
    with pytest.raises(ValueError, match=r"\[B, N, C\]"):
        jk.gather_tokens(x[0], a, **kw)
    with pytest.raises(TypeError, match="int64"):
        jk.gather_tokens(x, a.int(), **kw)
    with pytest.raises(TypeError, match="float32"):
        jk.gather_tokens(x.double(), a, **kw)
    with pytest.raises(IndexError, match="outside"):
        jk.gather_tokens(x, torch.tensor([0, 20]), **kw)
    with pytest.raises(IndexError, match="outside"):
        jk.gather_tokens(x, torch.tensor([-1]), **kw)
    with pytest.raises(ValueError, match="batch"):
        jk.gather_tokens(x, a.expand(3, -1), **kw)
    with pytest.raises(ValueError, match="duplicate"):
        jk.scatter_tokens(x, torch.tensor([1, 1]), x[:, :2], **kw)
    with pytest.raises(ValueError, match="src"):
        jk.scatter_tokens(x, a, x[:, :2], **kw)
    with pytest.raises(ValueError, match="duplicate"):
        jk.nearest_anchor_map(torch.tensor([3, 3]), 4, 5, **kw)
    with pytest.raises(ValueError, match="empty"):
        jk.nearest_anchor_map(torch.zeros(0, dtype=torch.int64), 4, 5, **kw)
    with pytest.raises(ValueError, match="does not match"):
        jk.token_importance(x, 4, 6, **kw)
    with pytest.raises(ValueError, match="rows"):
        jk.lift_field(x[:, :2], a, 4, 5, **kw)
    with pytest.raises(ValueError, match="nearest"):
        jk.lift_field(x[:, :3], a, 4, 5, nearest=torch.zeros(19, dtype=torch.int64), **kw)
    with pytest.raises(IndexError, match="nearest"):
        jk.lift_field(x[:, :3], a, 4, 5, nearest=torch.full((20,), 3), **kw)
    with pytest.raises(ValueError, match="count"):
        jk.select_new_tokens(x[:, :, 0], a, 18, **kw)
    with pytest.raises(ValueError, match="mode"):
        jk.microflow_update(x, a, x[:, :3], "teleport", **kw)
    with pytest.raises(ValueError, match="weight"):
        jk.microflow_update(x, a, x[:, :3], "blend", 1.5, **kw)
    with pytest.raises(ValueError, match="sigma"):
        jk.microflow_target(x, x, a, torch.tensor([1]), x[:, :1], 0.5, 0.7, 4, 5, **kw)
    with pytest.raises(TypeError, match="height"):
        jk.token_importance(x, 4.0, 5, **kw)


def test_unknown_and_unavailable_backend():
    x = _tokens(1, 4, 2, torch.float32)
    with pytest.raises(ValueError, match="unknown backend"):
        jk.gather_tokens(x, torch.tensor([0]), backend="metal")
    with pytest.raises(jk.BackendUnavailableError, match="cuda"):
        jk.gather_tokens(x, torch.tensor([0]), backend="cuda")

    with jk.use_backend("reference"):
        assert jk.get_backend() == "reference"
    assert jk.get_backend() != "reference" or __import__("os").environ.get("JIT_KERNELS_BACKEND") == "reference"
