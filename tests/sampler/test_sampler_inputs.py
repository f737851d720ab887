"""jit_sample's input checking: every bad argument gets a TypeError / ValueError before the
first model call (results of the callables are checked as they come back), the empty batch,
and what the step callback receives and may return."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from jit_sampler import JiTConfig, beta_sigmas, jit_sample, make_plan

H, W, C = 6, 8, 4
N = H * W
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Counting:
    """A velocity_fn that counts its calls."""

    def __init__(self, result=None):
        self.n = 0
        self.result = result

    def __call__(self, x, idx, sigma, step):
        self.n += 1
        return 0.5 * x if self.result is None else self.result(x)


def _cfg(**kw):
    return JiTConfig.preset("7x", **kw)


def _lat(b=2, dtype=torch.float32):
    return torch.randn(b, N, C, generator=torch.Generator().manual_seed(0)).to(dtype)


def _gen():
    return torch.Generator().manual_seed(1)


def _refused(exc, match, *, latents=None, height=H, width=W, sigmas=None, config=None, generator=None, **kw):
    """``jit_sample`` raises ``exc`` (message matching ``match``) before calling the model."""
    fn = kw.pop("velocity_fn", None) or Counting()
    config = config or _cfg()
    sigmas = beta_sigmas(config.total_steps) if sigmas is None else sigmas
    with pytest.raises(exc, match=match):
        jit_sample(fn, _lat() if latents is None else latents, height, width, sigmas, config, generator, **kw)
    if isinstance(fn, Counting):
        assert fn.n == 0, "the model was called before the error"


# ----------------------------------------------------------------------------- step_callback
def test_callback_result_is_not_broadcast():
    # Returning one sample of a batch-2 run used to be broadcast by copy_ (both samples identical).
    with pytest.raises(ValueError, match="no broadcasting"):
        jit_sample(Counting(), _lat(2), H, W, beta_sigmas(11), _cfg(), _gen(), step_callback=lambda i, s, y: y[:1])
    with pytest.raises(ValueError, match="exactly the latent's shape"):
        jit_sample(Counting(), _lat(2), H, W, beta_sigmas(11), _cfg(), _gen(), step_callback=lambda i, s, y: y.sum())
    with pytest.raises(ValueError, match="exactly the latent's shape"):
        jit_sample(Counting(), _lat(2), H, W, beta_sigmas(11), _cfg(), _gen(),
                   step_callback=lambda i, s, y: y[:, :, :1].clone())


@pytest.mark.parametrize("bad, exc, match", [
    (lambda y: [1.0], TypeError, "must return None or a tensor"),
    (lambda y: y.to(torch.int32), TypeError, "int32"),
    (lambda y: y.to(torch.complex64), TypeError, "complex64"),
    (lambda y: torch.empty(y.shape, device="meta"), ValueError, "on meta"),
])
def test_callback_result_type_dtype_device(bad, exc, match):
    with pytest.raises(exc, match=match):
        jit_sample(Counting(), _lat(2), H, W, beta_sigmas(11), _cfg(), _gen(), step_callback=lambda i, s, y: bad(y))


def test_callback_gets_a_tensor_it_may_keep():
    kept = []
    y, _ = jit_sample(Counting(), _lat(2), H, W, beta_sigmas(11), _cfg(), _gen(),
                      step_callback=lambda i, s, y: kept.append(y))
    assert len(kept) == 11
    # Each is the state after its step, not a view of the working latent that later steps overwrite.
    assert not torch.equal(kept[0], kept[-1]) and torch.equal(kept[-1], y)
    # A floating replacement of another dtype is still accepted (cast into the latent).
    y2, _ = jit_sample(Counting(), _lat(2), H, W, beta_sigmas(11), _cfg(), _gen(),
                       step_callback=lambda i, s, y: y.double() if i == 10 else None)
    assert torch.equal(y2, y)


# ----------------------------------------------------------------------------- velocity_fn
@pytest.mark.parametrize("result, exc, match", [
    (lambda x: None, TypeError, "must return a tensor.*got NoneType"),
    (lambda x: x.tolist(), TypeError, "must return a tensor.*got list"),
    (lambda x: x.to(torch.int64), TypeError, "floating-point.*int64"),
    (lambda x: x.to(torch.bool), TypeError, "floating-point.*bool"),
    (lambda x: x[:, :1], ValueError, "velocity_fn returned"),
    (lambda x: torch.empty(x.shape, device="meta"), ValueError, "on meta"),
])
def test_bad_velocity_results(result, exc, match):
    fn = Counting(result)
    with pytest.raises(exc, match=match):
        jit_sample(fn, _lat(), H, W, beta_sigmas(11), _cfg(), _gen())
    assert fn.n == 1  # caught at the first result


def test_callables_are_checked():
    _refused(TypeError, "velocity_fn must be callable", velocity_fn=42)
    _refused(TypeError, "step_callback must be callable", step_callback="every step")
    _refused(TypeError, "interrupt must be callable", interrupt=True)


# ----------------------------------------------------------------------------- latents
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_latents_refused(dtype):
    _refused(TypeError, "floating-point", latents=torch.ones(1, N, C, dtype=dtype))


def test_latents_must_be_a_tensor():
    _refused(TypeError, "latents must be a torch.Tensor", latents=_lat().tolist())


@pytest.mark.parametrize("policy", ["shared", "per_sample"])
def test_empty_batch_is_a_clean_empty_result(policy):
    fn, seen = Counting(), []
    for dtype in (torch.float32, torch.bfloat16):
        lat = torch.empty(0, N, C, dtype=dtype)
        y, rep = jit_sample(fn, lat, H, W, beta_sigmas(11), _cfg(anchor_policy=policy), _gen(),
                            step_callback=lambda i, s, y: seen.append(i))
        assert y.shape == (0, N, C) and y.dtype == dtype and y is not lat
        assert rep.steps == 0 and rep.model_calls == 0 and rep.batch_size == 0
    assert fn.n == 0 and seen == []
    # ... but the arguments are still checked.
    _refused(TypeError, "generator", latents=torch.empty(0, N, C), generator=7)
    _refused(ValueError, "sigmas", latents=torch.empty(0, N, C), sigmas=[1.0, 0.0])


@pytest.mark.slow
def test_zero_channels_refused_without_crashing():
    # C = 0 used to reach the kernels (a SIGFPE in the C++ extension): run it in a subprocess.
    code = textwrap.dedent("""
        import torch
        from jit_sampler import JiTConfig, beta_sigmas, jit_sample
        calls = []
        try:
            jit_sample(lambda x, i, s, k: calls.append(1) or x, torch.randn(1, 48, 0), 6, 8, beta_sigmas(11),
                       JiTConfig.preset("7x"))
        except ValueError as exc:
            print("ValueError:", exc, "calls", len(calls))
    """)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "ValueError: latents have no channels" in proc.stdout and "calls 0" in proc.stdout


# ----------------------------------------------------------------------------- generator, config, dmf_noise
def test_generator_types():
    _refused(TypeError, "generator must be a torch.Generator", generator=1234)
    _refused(TypeError, "generator must be a torch.Generator", generator="cpu")
    _refused(TypeError, "torch.Generator objects only", generator=[_gen(), 5])
    _refused(ValueError, "one per sample", generator=[_gen()])


def test_config_type():
    with pytest.raises(TypeError, match="config must be a JiTConfig"):
        jit_sample(Counting(), _lat(), H, W, beta_sigmas(11), "7x")
    with pytest.raises(TypeError, match="config must be a JiTConfig"):
        make_plan({"total_steps": 11}, H, W, beta_sigmas(11))


def test_dmf_noise_tensor_checked_before_the_first_model_call():
    # It used to be checked only at the first stage transition, after 4 model calls.
    for shape in [(1, 3, C), (3, N, C), (2, N, C + 1)]:
        _refused(ValueError, "dmf_noise", config=_cfg(dmf_noise=torch.zeros(shape)))
    y, _ = jit_sample(Counting(), _lat(2), H, W, beta_sigmas(11), _cfg(dmf_noise=torch.zeros(1, N, C)), _gen())
    assert torch.isfinite(y).all()


# ----------------------------------------------------------------------------- sigmas, grid
@pytest.mark.parametrize("edit, match", [
    (lambda s: s[:-1], "total_steps \\+ 1"),
    (lambda s: s[:5] + [float("nan")] + s[6:], "finite"),
    (lambda s: s[:5] + [float("inf")] + s[6:], "finite"),
    (lambda s: [s[0]] + [-float("inf")] + s[2:], "finite"),
    (lambda s: s[::-1], "non-increasing"),
    (lambda s: [1.5] + s[1:], "in \\[0, 1\\]"),
])
def test_bad_sigma_values(edit, match):
    _refused(ValueError, match, sigmas=edit(beta_sigmas(11)))


@pytest.mark.parametrize("sigmas", [5, "1.0 0.5 0.0", [str(s) for s in beta_sigmas(11)],
                                    [complex(s) for s in beta_sigmas(11)], [None] * 12])
def test_non_numeric_sigmas(sigmas):
    _refused(TypeError, "sigmas must be a sequence of floats", sigmas=sigmas)


def test_sigma_containers_accepted():
    ref, _ = jit_sample(Counting(), _lat(), H, W, beta_sigmas(11), _cfg(), _gen())
    for sig in (tuple(beta_sigmas(11)), torch.tensor(beta_sigmas(11), dtype=torch.float64)):
        y, _ = jit_sample(Counting(), _lat(), H, W, sig, _cfg(), _gen())
        assert torch.equal(y, ref)


@pytest.mark.parametrize("height, width, exc, match", [
    (6.0, W, TypeError, "height must be an int"),
    (H, "8", TypeError, "width must be an int"),
    (True, 48, TypeError, "height must be an int"),
    (H, None, TypeError, "width must be an int"),
    (0, W, ValueError, "height must be >= 1"),
    (-6, -8, ValueError, "height must be >= 1"),
])
def test_bad_grid(height, width, exc, match):
    _refused(exc, match, height=height, width=width)


def test_integer_like_grid_sizes_accepted():
    np = pytest.importorskip("numpy")
    ref, _ = jit_sample(Counting(), _lat(), H, W, beta_sigmas(11), _cfg(), _gen())
    y, rep = jit_sample(Counting(), _lat(), np.int64(H), torch.tensor(W), beta_sigmas(11), _cfg(), _gen())
    assert torch.equal(y, ref) and type(rep.height) is int and type(rep.width) is int
