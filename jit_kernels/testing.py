"""Testing helpers of jit_kernels: per-dtype tolerances, deterministic input generators, ``assert_close``.

Shared by the test suite and the benchmarks, so that every comparison of a backend with the
reference (:mod:`jit_kernels.reference`) uses the same inputs and the same tolerances.
Every generator is seeded and runs on the CPU (then moves the result to ``device``), so a
test draws the same values on every machine.
"""

from __future__ import annotations

import torch

__all__ = [
    "DTYPES",
    "TOLERANCES",
    "tolerance",
    "assert_close",
    "gen",
    "randn",
    "tokens",
    "anchors",
    "qkv",
    "GRIDS",
    "counts",
    "compiled_backends",
    "DEVICE_BACKENDS",
    "device_backends",
    "on",
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (height, width) token grids that cover the edge cases of the 2-D ops: odd, single row, single column, square.
GRIDS = [(7, 13), (1, 17), (9, 1), (16, 16)]

# Tolerances of a result against the reference, per input dtype, by kind of op:
# - "op": the token ops (arithmetic in fp32): fp32 results differ by summation order only,
#   half types by one rounding of the output;
# - "attention": anchor_attention (fp32 online softmax; outputs rounded once to the dtype);
# - "stock": anchor_attention against diffusers' stock rotary + SDPA path, which also rounds
#   the rotated q and k to the input dtype (the kernels do not).
TOLERANCES: dict[str, dict[torch.dtype, dict[str, float]]] = {
    "op": {
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
    },
    "attention": {
        torch.float32: dict(rtol=1e-5, atol=2e-5),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
    },
    "stock": {
        torch.float32: dict(rtol=1e-5, atol=2e-5),
        torch.float16: dict(rtol=5e-3, atol=5e-3),
        torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    },
}


def tolerance(dtype: torch.dtype, kind: str = "op") -> dict[str, float]:
    """``dict(rtol=..., atol=...)`` for results computed from ``dtype`` inputs (see :data:`TOLERANCES`)."""
    return dict(TOLERANCES[kind][dtype])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, *,
                 kind: str = "op", **kwargs) -> None:
    """``torch.testing.assert_close`` with the tolerances of ``dtype`` (default ``actual.dtype``) for ``kind``."""
    tol = tolerance(dtype if dtype is not None else actual.dtype, kind)
    tol.update(kwargs)
    torch.testing.assert_close(actual, expected, **tol)


def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0, offset: float = 0.0,
          device=None) -> torch.Tensor:
    """``randn(*shape) + offset`` drawn in fp32 from ``gen(seed)``, then cast to ``dtype`` and moved to ``device``."""
    t = (torch.randn(*shape, generator=gen(seed)) + offset).to(dtype)
    return t if device is None else t.to(device)


def tokens(b: int, n: int, c: int, dtype: torch.dtype = torch.float32, seed: int = 0, offset: float = 3.0,
           device=None) -> torch.Tensor:
    """Token tensor ``[b, n, c]``; the default offset keeps values away from zero, so a row a
    kernel forgot to write (zeros or garbage) cannot pass a comparison."""
    return randn(b, n, c, dtype=dtype, seed=seed, offset=offset, device=device)


def anchors(n: int, m: int, seed: int = 1, batch: int | None = None, device=None) -> torch.Tensor:
    """``m`` distinct token indices in ``[0, n)`` in random order: int64 ``[m]``, or ``[batch, m]``
    (sample ``i`` drawn with seed ``seed + i``)."""
    if batch is None:
        idx = torch.randperm(n, generator=gen(seed))[:m]
    else:
        idx = torch.stack([torch.randperm(n, generator=gen(seed + i))[:m] for i in range(batch)])
    return idx if device is None else idx.to(device)


def qkv(b: int, n: int, h: int, d: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """Attention inputs ``q, k, v [b, n, h, d]`` (standard normal, one generator)."""
    g = gen(seed)
    return [torch.randn(b, n, h, d, generator=g).to(dtype) for _ in range(3)]


def counts(n: int) -> list[int]:
    """Index counts to try among ``n`` tokens: one, about a third, all."""
    return sorted({1, max(1, n // 3), n})


def compiled_backends(device: str = "cpu") -> list[str]:
    """The non-reference backends present for ``device`` (on a CPU-only machine: ``cpp``, and
    ``triton`` when the interpreter is on), in the order the op tests parametrise over."""
    import jit_kernels as jk

    return [b for b in ("cuda", "cpp", "triton") if b in jk.available_backends(device)]



# Every (device, backend) pair a parametrised op test covers, in its order. ``triton`` on CPU is
# the Triton interpreter (TRITON_INTERPRET=1, which tests/conftest.py sets where no CUDA device
# is found); on CUDA it is the compiled kernels.
DEVICE_BACKENDS = (("cpu", "cpp"), ("cpu", "triton"), ("cpu", "reference"),
                   ("cuda", "cuda"), ("cuda", "triton"), ("cuda", "reference"))


def _unavailable_reason(device: str, backend: str) -> str | None:
    """Why ``backend`` cannot run on ``device`` on this machine (``None`` when it can)."""
    import jit_kernels as jk

    if device == "cuda" and not torch.cuda.is_available():
        return None  # the ``gpu`` marker skips it (tests/conftest.py), with the marker's reason
    if backend in jk.available_backends(device):
        return None
    if backend == "triton" and device == "cpu":
        return "Triton runs on CPU tensors only through its interpreter (TRITON_INTERPRET=1 before import)"
    if backend in ("cpp", "cuda"):
        return (f"the {backend!r} kernels of jit_kernels._C are not loaded "
                f"(build: python setup.py build_ext --inplace; {jk.extension_error()})")
    return f"backend {backend!r} is not available on {device!r}"


def device_backends(backends: tuple[str, ...] = ("cuda", "cpp", "triton"), devices: tuple[str, ...] = ("cpu", "cuda")):
    """``pytest.param(device, backend, id="cpu-cpp")`` for every pair of :data:`DEVICE_BACKENDS`
    whose backend is in ``backends`` and device in ``devices``.

    For ``@pytest.mark.parametrize("device,backend", device_backends())``. Every pair is always
    collected, so a test's ids are the same on every machine: CUDA pairs carry the ``gpu`` marker
    (skipped where no CUDA device is found), and a pair whose backend is not present here (the
    extension not built, Triton compiled rather than interpreted on a CUDA machine) is skipped
    with the reason. ``reference`` is left out by default: the op tests compare against it.
    """
    import pytest

    params = []
    for device, backend in DEVICE_BACKENDS:
        if backend not in backends or device not in devices:
            continue
        marks = [pytest.mark.gpu] if device == "cuda" else []
        reason = _unavailable_reason(device, backend)
        if reason is not None:
            marks.append(pytest.mark.skip(reason=reason))
        params.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return params


def on(device, *tensors):
    """``tensors`` moved to ``device`` (``None`` stays ``None``); one tensor alone is returned
    unwrapped. A tensor already there is returned as is, not copied (clone first before an
    in-place op). Inputs are drawn on the CPU (see :func:`gen`) and moved, so every device sees
    the same values and the reference can run on the CPU tensors."""
    out = tuple(None if t is None else t.to(device) for t in tensors)
    return out[0] if len(out) == 1 else out
