"""pytest-benchmark view of the op cases (CPU):  pytest benchmarks/test_bench_ops.py --benchmark-only

The committed tables come from benchmarks/bench_ops.py (interleaved medians with
GB/s); this file lets pytest-benchmark users compare and track the same cases.
"""

import pytest
import torch

from benchmarks.cases import SIZES, make_cases

_CASES = make_cases("cpu", (torch.float32,), SIZES[:1])


@pytest.mark.parametrize("case", _CASES, ids=[c.op for c in _CASES])
@pytest.mark.parametrize("impl", ["ours", "torch", "published"])
def test_op(benchmark, case, impl):
    if impl not in case.impls:
        pytest.skip(f"{case.op} has no {impl} baseline")
    benchmark.group = f"{case.op} {case.size}"
    benchmark(case.impls[impl])
