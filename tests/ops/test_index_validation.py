"""Index values are validated on every public call, by one implementation for every backend.

Covers the policy of jit_kernels._checks (docs/architecture.md, "Validation policy"): no cache
(every call with validate=True checks, whatever happened to the tensor since), the trusted path
(validate=False: no value check), the nearest-map consistency rule, the kernels' own checks when
called directly (C++ and the Triton launchers, which are also the CUDA kernels of ops without
CUDA C++), and the sampler's steps running no value check at all (its indices are its own).
"""

import pytest
import torch

import jit_kernels as jk
from jit_kernels import testing as T
from jit_kernels.triton import CUDA_ROUTABLE, KERNELS, LAUNCHERS
from jit_sampler import JiTConfig, beta_sigmas, jit_sample

BACKENDS = T.compiled_backends() + ["reference"]
H, W, C = 6, 8, 3
N = H * W


def _passes(op=None):
    p = jk.validation_passes()
    return sum(p.values()) if op is None else p.get(op, 0)


# validation_passes counts the Python value checks (the host reads of index values). On CPU with
# the cpp backend the token ops go straight to their C++ kernel, which checks the values itself
# (docs/architecture.md, "Call route"): no Python pass to count, and every call still refuses a
# bad index (test_an_in_place_write_after_a_check_is_caught, the stale-index corpus).
PYTHON_CHECKED = [b for b in BACKENDS if b != "cpp"]


@pytest.mark.parametrize("backend", PYTHON_CHECKED)
def test_every_call_checks_the_values_and_the_trusted_path_none(backend):
    x = T.tokens(2, N, C)
    idx = T.anchors(N, 9)
    before = _passes("gather_tokens")
    for _ in range(5):
        jk.gather_tokens(x, idx, backend=backend)
    assert _passes("gather_tokens") == before + 5
    for _ in range(3):
        jk.gather_tokens(x, idx, validate=False, backend=backend)
    assert _passes("gather_tokens") == before + 5
    assert torch.equal(jk.gather_tokens(x, idx, validate=False, backend=backend), jk.gather_tokens(x, idx))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the C++ extension is not built")
def test_the_cpp_route_checks_in_the_kernel_on_every_call():
    x = T.tokens(2, N, C)
    idx = T.anchors(N, 9)
    want = jk.gather_tokens(x, idx, backend="reference")
    before = _passes()
    for validate in (True, False):
        assert torch.equal(jk.gather_tokens(x, idx, validate=validate), want)
    assert _passes() == before  # no Python pass: the kernel checked
    bad = idx.clone()
    bad[2] = N
    for validate in (True, False):  # the range is checked whatever validate says (memory safety)
        with pytest.raises(IndexError, match="gather_tokens: idx"):
            jk.gather_tokens(x, bad, validate=validate)
    dup = torch.tensor([1, 2, 2])
    with pytest.raises(ValueError, match="duplicate"):
        jk.scatter_tokens(x, dup, T.tokens(2, 3, C))
    with pytest.raises(ValueError, match="duplicate"):
        jk.scatter_tokens_(x.clone(), dup, T.tokens(2, 3, C))


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_in_place_write_after_a_check_is_caught(backend):
    x = T.tokens(1, N, C)
    idx = T.anchors(N, 9)
    jk.gather_tokens(x, idx, backend=backend)
    idx[3] = N + 5  # bumps the version counter
    with pytest.raises(IndexError, match="outside"):
        jk.gather_tokens(x, idx, backend=backend)
    view = idx.view(3, 3)  # a write through a view shares the counter
    idx[3] = 0
    jk.gather_tokens(x, idx, backend=backend)
    view[0, 0] = -1
    with pytest.raises(IndexError):
        jk.gather_tokens(x, idx, backend=backend)


def test_duplicates_are_refused_only_where_they_matter():
    x = T.tokens(1, N, C)
    dup = torch.tensor([1, 2, 2, 5])
    jk.gather_tokens(x, dup)  # duplicates are fine for a gather
    with pytest.raises(ValueError, match="duplicate"):
        jk.scatter_tokens(x, dup, T.tokens(1, 4, C))
    jk.scatter_tokens(x, torch.tensor([1, 2, 5]), T.tokens(1, 3, C))


@pytest.mark.parametrize("backend", PYTHON_CHECKED)
def test_inference_tensors_are_checked_every_call(backend):
    x = T.tokens(1, N, C)
    with torch.inference_mode():
        idx = T.anchors(N, 9)
        before = _passes("gather_tokens")
        jk.gather_tokens(x, idx, backend=backend)
        jk.gather_tokens(x, idx, backend=backend)
        assert _passes("gather_tokens") == before + 2


@pytest.mark.parametrize("route", ["numpy", "data"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_write_behind_torchs_back_is_caught_by_the_next_call(backend, route):
    # No cache keyed on the version counter, so writes that do not bump it are caught too
    # (the corpus of such writes over every op is tests/ops/test_stale_indices.py).
    x = T.tokens(1, N, C)
    idx = T.anchors(N, 9)
    jk.gather_tokens(x, idx, backend=backend)
    v = idx._version
    if route == "numpy":
        idx.numpy()[3] = N + 5
    else:
        idx.data[3] = N + 5
    assert idx._version == v
    with pytest.raises(IndexError, match="outside"):
        jk.gather_tokens(x, idx, backend=backend)


# ---------------------------------------------------------------- nearest maps


def _lift_ops(values, anchors, nearest, backend):
    y = T.tokens(values.shape[0], N, C)
    prev = T.tokens(values.shape[0], N, C, seed=3)
    new = torch.tensor([0, 7]) if anchors.dim() == 1 else torch.tensor([[0, 7]] * values.shape[0])
    if bool(torch.isin(new, anchors).any()):
        new = new + 1
    eps = T.tokens(values.shape[0], 2, C, seed=4)
    yield lambda: jk.lift_field(values, anchors, H, W, nearest=nearest, backend=backend)
    yield lambda: jk.lift_euler_(y, values, anchors, H, W, 0.1, nearest=nearest, backend=backend)
    yield lambda: jk.microflow_target(prev, prev, anchors, new, eps, 0.8, 0.6, H, W, nearest=nearest,
                                      backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_inconsistent_nearest_map_is_refused(backend):
    anchors = torch.tensor([3, 10, 20, 40])
    values = T.tokens(1, 4, C)
    nearest = jk.nearest_anchor_map(anchors, H, W)
    bad = nearest.clone()
    bad[10] = 0  # anchor 1 no longer maps to itself (still in range)
    for call in _lift_ops(values, anchors, bad, backend):
        with pytest.raises(ValueError, match="its own nearest anchor"):
            call()
    for call in _lift_ops(values, anchors, nearest, backend):
        call()  # the real map passes


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicate_anchors_with_a_nearest_map_are_refused(backend):
    anchors = torch.tensor([3, 10, 10, 40])
    values = T.tokens(1, 4, C)
    nearest = jk.nearest_anchor_map(torch.tensor([3, 10, 11, 40]), H, W)  # some in-range map
    for call in _lift_ops(values, anchors, nearest, backend):
        with pytest.raises(ValueError, match="its own nearest anchor"):
            call()
    per_sample = torch.stack([torch.tensor([3, 10, 20, 40]), anchors])
    maps = torch.stack([jk.nearest_anchor_map(per_sample[0], H, W), nearest])
    for call in _lift_ops(T.tokens(2, 4, C), per_sample, maps, backend):
        with pytest.raises(ValueError, match="its own nearest anchor"):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_map_values_out_of_range_are_an_index_error(backend):
    anchors = torch.tensor([3, 10, 20, 40])
    nearest = jk.nearest_anchor_map(anchors, H, W).clone()
    nearest[5] = 4
    with pytest.raises(IndexError, match="nearest has values"):
        jk.lift_field(T.tokens(1, 4, C), anchors, H, W, nearest=nearest, backend=backend)


def test_a_nearest_map_is_checked_on_every_call_unless_trusted():
    anchors = T.anchors(N, 10)
    nearest = jk.nearest_anchor_map(anchors, H, W)
    before = _passes("lift_field")
    jk.lift_field(T.tokens(1, 10, C), anchors, H, W, nearest=nearest)
    jk.lift_field(T.tokens(1, 10, C), anchors, H, W, nearest=nearest)
    assert _passes("lift_field") == before + 2
    jk.lift_field(T.tokens(1, 10, C), anchors, H, W, nearest=nearest, validate=False)
    assert _passes("lift_field") == before + 2


# ---------------------------------------------------------------- kernels called directly


def test_direct_cpp_calls_validate_by_default():
    if "cpp" not in T.compiled_backends():
        pytest.skip("the compiled extension is not loaded")
    ops = torch.ops.jit_kernels
    x = T.tokens(1, N, C)
    bad = torch.tensor([0, N])
    with pytest.raises(IndexError):
        ops.gather_tokens(x, bad)
    good = torch.tensor([0, N - 1])
    assert torch.equal(ops.gather_tokens(x, good, False), x[:, good])
    anchors = torch.tensor([3, 10, 20, 40])
    nearest = jk.nearest_anchor_map(anchors, H, W).clone()
    nearest[20] = 0
    w = jk.lift_weights(4, N)
    with pytest.raises(ValueError, match="its own nearest anchor"):
        ops.lift_field(T.tokens(1, 4, C), anchors, nearest, w, H, W)
    with pytest.raises(IndexError):
        ops.anchor_attention(*T.qkv(1, 5, 2, 4), torch.ones(5, 4), torch.zeros(5, 4), torch.tensor([6]), 0.5)


@pytest.mark.skipif("triton" not in T.compiled_backends(), reason="triton is not importable")
def test_triton_twins_and_routed_cuda_kernels_validate_by_default():
    ops = torch.ops.jit_kernels
    x = T.tokens(1, N, C)
    with pytest.raises(IndexError):
        ops.gather_tokens_triton(x, torch.tensor([0, N]))
    with pytest.raises(ValueError, match="duplicate"):
        ops.scatter_tokens_triton(x, torch.tensor([1, 1]), T.tokens(1, 2, C))
    # The CUDA kernels of the ops without CUDA C++ are these same checked launchers.
    assert set(CUDA_ROUTABLE) == {n for n, op in jk._library.OPS.items() if op.cuda_via_triton}
    for name, fn in CUDA_ROUTABLE.items():
        assert fn is KERNELS[name]
    y = T.tokens(1, N, C)
    keep = y.clone()
    with pytest.raises(IndexError):
        CUDA_ROUTABLE["microflow_update_"](y, torch.tensor([N]), T.tokens(1, 1, C), 1.0)
    with pytest.raises(ValueError, match="duplicate"):
        CUDA_ROUTABLE["select_new_tokens"](torch.rand(1, N), torch.tensor([2, 2]), 3)
    with pytest.raises(IndexError):
        CUDA_ROUTABLE["anchor_attention"](*T.qkv(1, 5, 2, 4), torch.ones(5, 4), torch.zeros(5, 4),
                                          torch.tensor([0]), 0.5)
    assert torch.equal(y, keep)


def test_the_guarded_launchers_keep_the_launcher_parameters():
    import inspect

    for name, fn in KERNELS.items():
        launcher = list(inspect.signature(LAUNCHERS[name]).parameters)
        assert list(inspect.signature(fn).parameters) == launcher + ["validate"]
        assert inspect.signature(fn).parameters["validate"].default is True


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_triton_launches_on_the_tensors_device():
    x = T.tokens(2, N, C).to("cuda:1")
    idx = T.anchors(N, 9).to("cuda:1")
    with torch.cuda.device(0):
        out = torch.ops.jit_kernels.gather_tokens_triton(x, idx)
    assert out.device == x.device
    assert torch.equal(out.cpu(), x.cpu()[:, idx.cpu()])


# ---------------------------------------------------------------- the sampler


def _velocity(x, idx, sigma, step):
    return 0.5 * x + torch.tanh(x.roll(1, dims=-1)) * sigma


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("preset", ["4x", "7x"])
@pytest.mark.parametrize("policy", ["shared", "per_sample"])
def test_the_sampler_runs_no_value_check(preset, policy, mode):
    """The sampler builds its own index tensors and takes the trusted path: no value check (on CUDA, no
    host sync) in any step, whatever the number of steps; also under a caller's inference mode."""
    outs = []
    for steps in (18, 36):
        cfg = JiTConfig.preset(preset, total_steps=steps, anchor_policy=policy)
        x = torch.randn(2, N, C, generator=torch.Generator().manual_seed(0))
        jk.reset_validation_passes()
        with torch.inference_mode() if mode == "inference_mode" else torch.no_grad():
            outs.append(jit_sample(_velocity, x, H, W, beta_sigmas(steps), cfg, torch.Generator().manual_seed(1))[0])
        assert jk.validation_passes() == {}
    if mode == "inference_mode":  # the same result as outside it
        x = torch.randn(2, N, C, generator=torch.Generator().manual_seed(0))
        cfg = JiTConfig.preset(preset, total_steps=36, anchor_policy=policy)
        want, _ = jit_sample(_velocity, x, H, W, beta_sigmas(36), cfg, torch.Generator().manual_seed(1))
        assert torch.equal(outs[1], want)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_user_init_anchors_are_checked_once(mode):
    cfg = JiTConfig.preset("4x", total_steps=18)
    from jit_sampler import make_plan

    m0 = make_plan(cfg, H, W, beta_sigmas(18)).token_counts[0]
    given = torch.randperm(N, generator=torch.Generator().manual_seed(2))[:m0]
    x = torch.randn(1, N, C, generator=torch.Generator().manual_seed(0))
    jk.reset_validation_passes()
    with torch.inference_mode() if mode == "inference_mode" else torch.no_grad():
        jit_sample(_velocity, x, H, W, beta_sigmas(18), cfg.replace(init_anchors=given),
                   torch.Generator().manual_seed(1))
    assert jk.validation_passes() == {"jit_sample": 1}


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_a_velocity_that_writes_the_active_indices_is_caught(mode):
    cfg = JiTConfig.preset("4x", total_steps=18)
    x = torch.randn(1, N, C, generator=torch.Generator().manual_seed(0))

    def vandal(x_act, idx, sigma, step):
        if step == 2:
            idx.numpy()  # a read through numpy is fine
            idx[0] = 10**9  # a write through torch is not
        return 0.5 * x_act

    with torch.inference_mode() if mode == "inference_mode" else torch.no_grad():
        with pytest.raises(RuntimeError, match="wrote the active-index tensor"):
            jit_sample(vandal, x, H, W, beta_sigmas(18), cfg, torch.Generator().manual_seed(1))
