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

