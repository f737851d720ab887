"""The compiled CPU kernels give the same bits whatever the thread count, on every op."""

from __future__ import annotations

import torch

import jit_kernels as jk
from jit_kernels.testing import anchors
from tests.ops._helpers import needs_cpp, offset_tokens, ops


def _run_all_ops():
    h = w = 48
    n, c, m, b = h * w, 24, 700, 2
    x = offset_tokens(b, n, c)
    a = anchors(n, m)
    pa = torch.stack([anchors(n, m, seed=5), anchors(n, m, seed=6)])
    wt = jk.gaussian_weights(1.0, 7)
    out = {}
    out["near"] = ops.nearest_anchor_map(a, h, w)
    out["near_ps"] = ops.nearest_anchor_map(pa, h, w)
    out["near_few"] = ops.nearest_anchor_map(a[:30], h, w)  # brute-force path
    out["gather"] = ops.gather_tokens(x, pa)
    out["scatter"] = ops.scatter_tokens(x, a, x[:, :m] * 2)
    vals = x[:, :m].contiguous()
    out["lift"] = ops.lift_field(vals, a, out["near"], wt, h, w)
    out["lift_ps_bf16"] = ops.lift_field(vals.bfloat16(), pa, out["near_ps"], wt, h, w)
    y = x.clone()
    ops.lift_euler_(y, vals, a, out["near"], wt, h, w, -0.1)
    out["euler"] = y
    out["imp"] = ops.token_importance(x, h, w)
    out["select"] = ops.select_new_tokens(out["imp"], pa, 500)
    new = out["select"][0]
    out["target"] = ops.microflow_target(x, x * 0.5, a, out["near"], wt, new, x[:, :500], 0.7, 0.5, h, w)
    y = x.clone()
    ops.microflow_update_(y, new, out["target"], 1 / 3)
    out["update"] = y
    return out


@needs_cpp
def test_results_do_not_depend_on_thread_count():
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run_all_ops()
        torch.set_num_threads(2)
        two = _run_all_ops()
    finally:
        torch.set_num_threads(prev)
    for k in one:
        assert torch.equal(one[k], two[k]), f"{k} differs between 1 and 2 threads"
