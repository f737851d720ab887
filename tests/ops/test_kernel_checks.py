"""The kernels called directly (``torch.ops.jit_kernels.<op>`` and the Triton twins ``<op>_triton``)
check their own arguments: a clear Python exception of the right type before any work, never a crash
or a silent out-of-bounds access, and nothing written.

The C++ CPU kernels, bypassing the Python validation of the public functions, against a list of bad
calls per op (metadata and index values); then one table of bad metadata per op run on every kernel
(the C++ CPU kernels, the Triton twins, and on a CUDA machine the CUDA kernels), which must refuse it
with and without ``validate`` and before looking at index values. The corpus of bad inputs through
the public functions is test_bad_inputs.py; in-place targets are test_inplace_targets.py; sizes and
devices are test_sizes_and_devices.py.
"""

from __future__ import annotations

import pytest
import torch

from jit_kernels._library import OPS
from jit_kernels.testing import device_backends, gen
from tests.ops._helpers import (BACKENDS, direct_kernel, kernel_args, lift_inputs, needs_cpp, offset_tokens, ops,
                                python, schema_args)


# ---------------------------------------------------------------- the C++ kernels: a bad call of every kind per op


def _bad_cases():
    x = offset_tokens(2, 10, 4)
    idx = torch.tensor([1, 3, 5])
    src = offset_tokens(2, 3, 4, seed=1)
    vals, a, near, wt = lift_inputs()
    h, w = 7, 13
    n = h * w
    y = offset_tokens(2, n, 5, seed=2)
    field = offset_tokens(2, n, 5, seed=3)
    imp = torch.rand(2, n, generator=gen(4))
    eps = offset_tokens(2, 3, 5, seed=5)
    new = torch.tensor([i for i in range(n) if i not in set(a.tolist())][:3])
    return [
        # gather_tokens
        ("gather rank", lambda: ops.gather_tokens(x[0], idx), ValueError, r"gather_tokens: x must be \[B, N, C\]"),
        ("gather dtype", lambda: ops.gather_tokens(x.double(), idx), TypeError, r"gather_tokens: x must be float32"),
        ("gather int x", lambda: ops.gather_tokens(x.long(), idx), TypeError, r"gather_tokens: x must be float32"),
        ("gather idx dtype", lambda: ops.gather_tokens(x, idx.int()), TypeError, r"gather_tokens: idx must be int64"),
        ("gather idx rank", lambda: ops.gather_tokens(x, idx.view(1, 1, 3)), ValueError, r"idx must be \[M\]"),
        ("gather idx batch", lambda: ops.gather_tokens(x, idx.expand(3, 3)), ValueError, r"per sample with batch 3"),
        ("gather idx high", lambda: ops.gather_tokens(x, torch.tensor([0, 10])), IndexError,
         r"gather_tokens: idx has value 10 outside \[0, 10\)"),
        ("gather idx negative", lambda: ops.gather_tokens(x, torch.tensor([-1])), IndexError, r"value -1 outside"),
        # scatter_tokens / scatter_tokens_
        ("scatter duplicate", lambda: ops.scatter_tokens(x, torch.tensor([1, 3, 1]), src), ValueError,
         r"scatter_tokens: idx contains duplicate indices \(1\)"),
        ("scatter_ duplicate", lambda: ops.scatter_tokens_(x, torch.tensor([[1, 2, 3], [4, 4, 5]]), src), ValueError,
         r"scatter_tokens_: idx contains duplicate indices \(4\)"),
        ("scatter src shape", lambda: ops.scatter_tokens(x, idx, src[:, :2]), ValueError, r"src must be \[B, M, C\]"),
        ("scatter src channels", lambda: ops.scatter_tokens_(x, idx, src[..., :3]), ValueError, r"src must be"),
        ("scatter idx high", lambda: ops.scatter_tokens_(x, torch.tensor([1, 2, 99]), src), IndexError, r"99 outside"),
        ("scatter src rank", lambda: ops.scatter_tokens(x, idx, src[0]), ValueError, r"src must be \[B, N, C\]"),
        # nearest_anchor_map
        ("nearest duplicate", lambda: ops.nearest_anchor_map(torch.tensor([3, 5, 3]), 4, 4), ValueError,
         r"nearest_anchor_map: anchor_idx contains duplicate"),
        ("nearest empty", lambda: ops.nearest_anchor_map(torch.empty(0, dtype=torch.long), 4, 4), ValueError,
         r"anchor_idx is empty"),
        ("nearest out of grid", lambda: ops.nearest_anchor_map(torch.tensor([0, 16]), 4, 4), IndexError,
         r"16 outside \[0, 16\)"),
        ("nearest zero grid", lambda: ops.nearest_anchor_map(torch.tensor([0]), 0, 4), ValueError,
         r"height and width must be >= 1"),
        ("nearest dtype", lambda: ops.nearest_anchor_map(torch.tensor([0.0]), 4, 4), TypeError, r"must be int64"),
        # lift_field
        ("lift nearest size", lambda: ops.lift_field(vals, a, near[:-1], wt, h, w), ValueError,
         r"lift_field: nearest has 90 entries, expected N = 91"),
        ("lift grid mismatch", lambda: ops.lift_field(vals, a, near, wt, 7, 12), ValueError,
         r"nearest has 91 entries, expected N = 84"),
        ("lift nearest range", lambda: ops.lift_field(vals, a, near.clamp(max=5) + 15, wt, h, w), IndexError,
         r"lift_field: nearest has value 20 outside \[0, 20\)"),
        ("lift anchors range", lambda: ops.lift_field(vals, a.clamp(min=0) + 91, near, wt, h, w), IndexError,
         r"anchor_idx has value"),
        ("lift anchor count", lambda: ops.lift_field(vals[:, :19], a, near, wt, h, w), ValueError,
         r"values has 19 rows but anchor_idx has 20"),
        ("lift empty", lambda: ops.lift_field(vals[:, :0], a[:0], near, wt, h, w), ValueError, r"anchor_idx is empty"),
        ("lift weights even", lambda: ops.lift_field(vals, a, near, wt[:6], h, w), ValueError, r"odd-length"),
        ("lift weights dtype", lambda: ops.lift_field(vals, a, near, wt.double(), h, w), TypeError,
         r"weights must be float32"),
        ("lift per-sample mix", lambda: ops.lift_field(vals, a.expand(2, -1), near, wt, h, w), ValueError,
         r"nearest must be per sample exactly when"),
        ("lift values dtype", lambda: ops.lift_field(vals.double(), a, near, wt, h, w), TypeError, r"values must be"),
        # lift_euler_
        ("euler y shape", lambda: ops.lift_euler_(y[:, :-1], vals, a, near, wt, h, w, 0.1), ValueError,
         r"lift_euler_: y must be \[B, H\*W, C\]"),
        ("euler y expanded", lambda: ops.lift_euler_(y[:1].expand(2, -1, -1), vals, a, near, wt, h, w, 0.1),
         ValueError, r"lift_euler_: y has internally overlapping memory"),
        ("euler values alias y", lambda: ops.lift_euler_(y, y[:, :20], a, near, wt, h, w, 0.1), ValueError,
         r"lift_euler_: values overlaps the memory of y"),
        ("euler nearest size", lambda: ops.lift_euler_(y, vals, a, near[:10], wt, h, w, 0.1), ValueError,
         r"lift_euler_: nearest has 10 entries"),
        # token_importance / select_new_tokens
        ("importance grid", lambda: ops.token_importance(field, 7, 12), ValueError,
         r"token_importance: grid 7 x 12 = 84 does not match N = 91"),
        ("importance rank", lambda: ops.token_importance(field[0], 7, 13), ValueError, r"field must be \[B, N, C\]"),
        ("importance dtype", lambda: ops.token_importance(field.double(), 7, 13), TypeError, r"field must be float32"),
        ("select count", lambda: ops.select_new_tokens(imp, a, n - 19), ValueError,
         r"select_new_tokens: count must be in \[0, 71\]"),
        ("select negative count", lambda: ops.select_new_tokens(imp, a, -1), ValueError, r"count must be in"),
        ("select duplicate", lambda: ops.select_new_tokens(imp, torch.tensor([1, 1]), 2), ValueError,
         r"active_idx contains duplicate"),
        ("select range", lambda: ops.select_new_tokens(imp, torch.tensor([n]), 2), IndexError, r"outside"),
        ("select rank", lambda: ops.select_new_tokens(imp[0], a, 2), ValueError, r"importance must be a float"),
        ("select int", lambda: ops.select_new_tokens(imp.long(), a, 2), ValueError, r"importance must be a float"),
        # microflow_update_ / microflow_target
        ("update weight 0", lambda: ops.microflow_update_(y, new, eps, 0.0), ValueError, r"weight must be in \(0, 1\]"),
        ("update weight > 1", lambda: ops.microflow_update_(y, new, eps, 1.5), ValueError, r"weight must be in"),
        ("update duplicate", lambda: ops.microflow_update_(y, torch.tensor([2, 2, 3]), eps, 0.5), ValueError,
         r"microflow_update_: new_idx contains duplicate"),
        ("update target shape", lambda: ops.microflow_update_(y, new, eps[:, :2], 0.5), ValueError,
         r"target must be \[B, R, C\]"),
        ("update range", lambda: ops.microflow_update_(y, torch.tensor([0, 1, n]), eps, 0.5), IndexError, r"outside"),
        ("update y expanded", lambda: ops.microflow_update_(y[:1].expand(2, -1, -1), new, eps, 0.5), ValueError,
         r"microflow_update_: y has internally overlapping memory"),
        ("update target alias y", lambda: ops.microflow_update_(y, new, y[:, 10:13], 0.5), ValueError,
         r"microflow_update_: target overlaps the memory of y"),
        ("scatter_ base expanded", lambda: ops.scatter_tokens_(x[:1].expand(2, -1, -1), idx, src), ValueError,
         r"scatter_tokens_: base has internally overlapping memory"),
        ("scatter_ src alias base", lambda: ops.scatter_tokens_(x, idx, x[:, 5:8]), ValueError,
         r"scatter_tokens_: src overlaps the memory of base"),
        ("importance no channels", lambda: ops.token_importance(field[..., :0], 7, 13), ValueError,
         r"token_importance: field has no channels"),
        ("importance huge grid", lambda: ops.token_importance(field, 2**40, 2**40), ValueError,
         r"token_importance: grid 1099511627776 x 1099511627776 is too large"),
        ("nearest huge grid", lambda: ops.nearest_anchor_map(torch.tensor([0]), 2**62 + 1, 4), ValueError,
         r"nearest_anchor_map: grid 4611686018427387905 x 4 is too large"),
        ("target sigma order", lambda: ops.microflow_target(y, y, a, near, wt, new, eps, 0.3, 0.5, h, w), ValueError,
         r"need 0 <= sigma <= sigma_prev <= 1"),
        ("target grid", lambda: ops.microflow_target(y, y, a, near, wt, new, eps, 0.5, 0.3, 7, 7), ValueError,
         r"does not match N = 91"),
        ("target eps", lambda: ops.microflow_target(y, y, a, near, wt, new, eps[:, :1], 0.5, 0.3, h, w), ValueError,
         r"eps must be \[B, R, C\]"),
        ("target v shape", lambda: ops.microflow_target(y, y[:1], a, near, wt, new, eps, 0.5, 0.3, h, w), ValueError,
         r"v_prev .* must match y_prev"),
        ("target nearest", lambda: ops.microflow_target(y, y, a, near[1:], wt, new, eps, 0.5, 0.3, h, w), ValueError,
         r"nearest has 90 entries"),
        ("target new dup", lambda: ops.microflow_target(y, y, a, near, wt, new[[0, 0, 1]], eps, 0.5, 0.3, h, w),
         ValueError, r"new_idx contains duplicate"),
    ]


_CASES = _bad_cases()


@needs_cpp
@pytest.mark.parametrize("case", _CASES, ids=[c[0] for c in _CASES])
def test_bad_inputs_raise_clear_errors(case):
    _, fn, exc, pattern = case
    # TORCH_CHECK_VALUE / _TYPE / _INDEX surface as ValueError / TypeError /
    # IndexError (what the public Python functions raise too); check the exact type.
    with pytest.raises(exc, match=pattern):
        fn()


# ---------------------------------------------------------------- metadata of direct kernel calls, every kernel
#
# Every kernel checks its arguments' metadata (ranks, shapes, dtypes, devices, in-place targets) itself,
# before any work, whatever validate says: the C++ kernels with TORCH_CHECK (csrc/checks.h), the Triton
# launchers through jit_kernels._metadata (jit_kernels.triton.guarded). One table of bad calls per op,
# with the exception type the C++ CPU kernel raises (the cpu-cpp rows check that the table says what
# C++ does), run on every kernel: the C++ CPU kernels, the Triton twins (interpreted on CPU, compiled on
# CUDA) and, on a CUDA machine, torch.ops.jit_kernels.<op> on CUDA tensors (CUDA C++, or the Triton
# launcher for the ops routed to it). Before, the Triton kernels checked index values only: a target too
# short, a per-sample index of a larger batch or an odd head dim read (or wrote) out of bounds.

# (op, label, exception type, message pattern, overrides, devices); an override maps an argument to a value
# or to a function of the arguments (on the test's device). devices="cuda": a mixed-device call (the
# arguments named in ``cpu`` stay on the CPU), which only a CUDA machine can make.
META_CASES = []


def meta_bad(op, label, exc, match, cpu=(), **over):
    META_CASES.append(pytest.param(op, over, exc, match, tuple(cpu), id=f"{op}: {label}"))


_I32 = lambda name: lambda a: a[name].int()  # noqa: E731
_F64 = lambda name: lambda a: a[name].double()  # noqa: E731
_RANK2 = lambda name: lambda a: a[name][0]  # noqa: E731
_EXPANDED = lambda name: lambda a: a[name][:1].expand(a[name].shape[0], -1, -1)  # noqa: E731
_EMPTY = torch.zeros(0, dtype=torch.int64)

meta_bad("gather_tokens", "x rank 2", ValueError, r"gather_tokens: x must be \[B, N, C\]", x=_RANK2("x"))
meta_bad("gather_tokens", "x float64", TypeError, "gather_tokens: x must be float32", x=_F64("x"))
meta_bad("gather_tokens", "idx int32", TypeError, "gather_tokens: idx must be int64", idx=_I32("idx"))
meta_bad("gather_tokens", "idx rank 3", ValueError, r"gather_tokens: idx must be \[M\] \(shared\) or \[B, M\]",
         idx=lambda a: a["idx"].view(1, 1, 3))
meta_bad("gather_tokens", "idx of a larger batch", ValueError, "gather_tokens: idx is per sample with batch 3",
         idx=torch.zeros(3, 2, dtype=torch.int64))
meta_bad("gather_tokens", "idx on the CPU", ValueError, "gather_tokens: .*one device", cpu=("idx",))
for _op in ("scatter_tokens", "scatter_tokens_"):
    meta_bad(_op, "src rows", ValueError, rf"{_op}: src must be \[B, M, C\] = \[2, 3, 3\]",
             src=lambda a: a["src"][:, :2])
    meta_bad(_op, "src channels", ValueError, rf"{_op}: src must be \[B, M, C\]", src=lambda a: a["src"][..., :2])
    meta_bad(_op, "src int64", TypeError, f"{_op}: src must be float32", src=lambda a: a["src"].long())
    meta_bad(_op, "base rank 2", ValueError, rf"{_op}: base must be \[B, N, C\]", base=_RANK2("base"))
    meta_bad(_op, "idx of a larger batch", ValueError, f"{_op}: idx is per sample with batch 3",
             idx=torch.zeros(3, 3, dtype=torch.int64))
    meta_bad(_op, "src on the CPU", ValueError, f"{_op}: .*one device", cpu=("src",))
meta_bad("scatter_tokens_", "base expanded", ValueError, "scatter_tokens_: base has internally overlapping memory",
         base=_EXPANDED("base"))
meta_bad("scatter_tokens_", "src a view of base", ValueError, "scatter_tokens_: src overlaps the memory of base",
         src=lambda a: a["base"][:, 5:8])
meta_bad("nearest_anchor_map", "no anchors (M = 0)", ValueError, "nearest_anchor_map: anchor_idx is empty",
         anchor_idx=_EMPTY)
meta_bad("nearest_anchor_map", "per-sample, no anchors", ValueError, "nearest_anchor_map: anchor_idx is empty",
         anchor_idx=torch.zeros(2, 0, dtype=torch.int64))
meta_bad("nearest_anchor_map", "anchor_idx int32", TypeError, "nearest_anchor_map: anchor_idx must be int64",
         anchor_idx=_I32("anchor_idx"))
meta_bad("nearest_anchor_map", "anchor_idx rank 3", ValueError, r"nearest_anchor_map: anchor_idx must be \[M\]",
         anchor_idx=lambda a: a["anchor_idx"].view(1, 1, 3))
meta_bad("nearest_anchor_map", "height 0", ValueError, "nearest_anchor_map: .*must be >= 1", height=0)
meta_bad("nearest_anchor_map", "grid past 2^30", ValueError, "nearest_anchor_map: grid 65536 x 32768 is too large",
         height=1 << 16, width=1 << 15)
meta_bad("lift_field", "values rank 2", ValueError, r"lift_field: values must be \[B, N, C\]", values=_RANK2("values"))
meta_bad("lift_field", "values float64", TypeError, "lift_field: values must be float32", values=_F64("values"))
meta_bad("lift_field", "weights float64", TypeError, "lift_field: weights must be float32", weights=_F64("weights"))
meta_bad("lift_field", "weights of even length", ValueError, "lift_field: weights must be an odd-length",
         weights=lambda a: a["weights"][1:])
meta_bad("lift_field", "nearest too short", ValueError, "lift_field: nearest has 19 entries, expected N = 20",
         nearest=lambda a: a["nearest"][:-1])
meta_bad("lift_field", "grid larger than nearest", ValueError, "lift_field: nearest has 20 entries, expected N = 25",
         height=5)
meta_bad("lift_field", "fewer values rows than anchors", ValueError,
         "lift_field: values has 2 rows but anchor_idx has 3 anchors", values=lambda a: a["values"][:, :2])
meta_bad("lift_field", "per-sample nearest, shared anchors", ValueError, "lift_field: nearest must be per sample",
         nearest=lambda a: a["nearest"].expand(2, -1))
meta_bad("lift_field", "anchor_idx of a larger batch", ValueError, "lift_field: anchor_idx is per sample with batch 3",
         anchor_idx=lambda a: a["anchor_idx"].expand(3, -1))
meta_bad("lift_field", "nearest int32", TypeError, "lift_field: nearest must be int64", nearest=_I32("nearest"))
meta_bad("lift_field", "values on the CPU", ValueError, "lift_field: .*one device", cpu=("values",))
meta_bad("lift_field", "weights on the CPU", ValueError, "lift_field: .*one device", cpu=("weights",))
meta_bad("lift_euler_", "y too short", ValueError, r"lift_euler_: y must be \[B, H\*W, C\] = \[2, 20, 3\]",
         y=lambda a: a["y"][:, :10])
meta_bad("lift_euler_", "y float64", TypeError, "lift_euler_: y must be float32", y=_F64("y"))
meta_bad("lift_euler_", "y rank 2", ValueError, r"lift_euler_: y must be \[B, N, C\]", y=_RANK2("y"))
meta_bad("lift_euler_", "y expanded", ValueError, "lift_euler_: y has internally overlapping memory",
         y=_EXPANDED("y"))
meta_bad("lift_euler_", "values a view of y", ValueError, "lift_euler_: values overlaps the memory of y",
         values=lambda a: a["y"][:, 2:5])
meta_bad("lift_euler_", "weights of even length", ValueError, "lift_euler_: weights must be an odd-length",
         weights=lambda a: a["weights"][1:])
meta_bad("lift_euler_", "y on the CPU", ValueError, "lift_euler_: .*one device", cpu=("y",))
meta_bad("token_importance", "field rank 2", ValueError, r"token_importance: field must be \[B, N, C\]",
         field=_RANK2("field"))
meta_bad("token_importance", "field int64", TypeError, "token_importance: field must be float32",
         field=lambda a: a["field"].long())
meta_bad("token_importance", "no channels", ValueError, r"token_importance: field has no channels \(C = 0\)",
         field=lambda a: a["field"][..., :0])
meta_bad("token_importance", "grid does not match N", ValueError, "token_importance: grid 5 x 5 = 25 does not match",
         height=5)
meta_bad("select_new_tokens", "importance rank 1", ValueError, r"select_new_tokens: importance must be a float \[B, N\]",
         importance=lambda a: a["importance"][0])
meta_bad("select_new_tokens", "importance int64", ValueError, r"select_new_tokens: importance must be a float \[B, N\]",
         importance=lambda a: a["importance"].long())
meta_bad("select_new_tokens", "active_idx int32", TypeError, "select_new_tokens: active_idx must be int64",
         active_idx=_I32("active_idx"))
meta_bad("select_new_tokens", "active_idx of a larger batch", ValueError,
         "select_new_tokens: active_idx is per sample with batch 3", active_idx=lambda a: a["active_idx"].expand(3, -1))
meta_bad("select_new_tokens", "count past the inactive tokens", ValueError,
         r"select_new_tokens: count must be in \[0, 17\]", count=18)
meta_bad("select_new_tokens", "count negative", ValueError, r"select_new_tokens: count must be in \[0, 17\]", count=-1)
meta_bad("select_new_tokens", "active_idx on the CPU", ValueError, "select_new_tokens: .*one device",
         cpu=("active_idx",))
meta_bad("microflow_update_", "target shorter than new_idx", ValueError,
         r"microflow_update_: target must be \[B, R, C\] = \[2, 4, 3\], got \[2, 2, 3\]",
         target=lambda a: a["target"][:, :2])
meta_bad("microflow_update_", "target channels", ValueError, r"microflow_update_: target must be \[B, R, C\]",
         target=lambda a: a["target"][..., :2])
meta_bad("microflow_update_", "target float64", TypeError, "microflow_update_: target must be float32",
         target=_F64("target"))
meta_bad("microflow_update_", "new_idx int32", TypeError, "microflow_update_: new_idx must be int64",
         new_idx=_I32("new_idx"))
meta_bad("microflow_update_", "new_idx of a larger batch", ValueError,
         "microflow_update_: new_idx is per sample with batch 3", new_idx=lambda a: a["new_idx"].expand(3, -1))
meta_bad("microflow_update_", "y rank 2", ValueError, r"microflow_update_: y must be \[B, N, C\]", y=_RANK2("y"))
for _w in (0.0, 1.5, float("nan")):
    meta_bad("microflow_update_", f"weight {_w}", ValueError, r"microflow_update_: weight must be in \(0, 1\]",
             weight=_w)
meta_bad("microflow_update_", "y expanded", ValueError, "microflow_update_: y has internally overlapping memory",
         y=_EXPANDED("y"))
meta_bad("microflow_update_", "target a view of y", ValueError, "microflow_update_: target overlaps the memory of y",
         target=lambda a: a["y"][:, 10:14])
meta_bad("microflow_update_", "target on the CPU", ValueError, "microflow_update_: .*one device", cpu=("target",))
meta_bad("microflow_target", "v_prev shape", ValueError, "microflow_target: v_prev .* must match y_prev",
         v_prev=lambda a: a["v_prev"][:, :10])
meta_bad("microflow_target", "eps shorter than new_idx", ValueError, r"microflow_target: eps must be \[B, R, C\]",
         eps=lambda a: a["eps"][:, :2])
meta_bad("microflow_target", "eps float64", TypeError, "microflow_target: eps must be float32", eps=_F64("eps"))
meta_bad("microflow_target", "grid does not match N", ValueError, "microflow_target: grid 5 x 5 = 25 does not match",
         height=5)
meta_bad("microflow_target", "weights float64", TypeError, "microflow_target: weights must be float32",
         weights=_F64("weights"))
meta_bad("microflow_target", "no anchors", ValueError, "microflow_target: anchor_idx is empty", anchor_idx=_EMPTY)
meta_bad("microflow_target", "nearest too short", ValueError, "microflow_target: nearest has 19 entries",
         nearest=lambda a: a["nearest"][:-1])
meta_bad("microflow_target", "new_idx of a larger batch", ValueError,
         "microflow_target: new_idx is per sample with batch 3", new_idx=lambda a: a["new_idx"].expand(3, -1))
meta_bad("microflow_target", "sigma above sigma_prev", ValueError, "microflow_target: need 0 <= sigma <= sigma_prev",
         sigma=0.9)
meta_bad("microflow_target", "eps on the CPU", ValueError, "microflow_target: .*one device", cpu=("eps",))
_ODD = {name: (lambda a, name=name: a[name][..., :3]) for name in ("q", "k", "v", "cos", "sin")}
meta_bad("anchor_attention", "odd head dim", ValueError, r"anchor_attention: the head dim D must be even .*D = 3",
         **_ODD)
meta_bad("anchor_attention", "q rank 3", ValueError, r"anchor_attention: q must be \[B, L, H, D\]", q=_RANK2("q"))
meta_bad("anchor_attention", "q float64", TypeError, "anchor_attention: q must be float32", q=_F64("q"))
meta_bad("anchor_attention", "k shape", ValueError, "anchor_attention: k .* must match q",
         k=lambda a: a["k"][:, :4])
meta_bad("anchor_attention", "v dtype", TypeError, "anchor_attention: v is .* but q is", v=lambda a: a["v"].half())
meta_bad("anchor_attention", "cos shape", ValueError, r"anchor_attention: cos must be \[L, D\] = \[5, 4\]",
         cos=lambda a: a["cos"][:4])
meta_bad("anchor_attention", "sin int64", TypeError, "anchor_attention: sin must be a floating tensor",
         sin=lambda a: a["sin"].long())
meta_bad("anchor_attention", "cos per sample, sin shared", ValueError,
         r"anchor_attention: cos and sin must both be \[L, D\] or both \[B, L, D\]",
         cos=lambda a: a["cos"].expand(2, -1, -1))
meta_bad("anchor_attention", "key_lengths int32", TypeError, "anchor_attention: key_lengths must be int64",
         key_lengths=_I32("key_lengths"))
meta_bad("anchor_attention", "key_lengths shape", ValueError, r"anchor_attention: key_lengths must be \[B\] = \[2\]",
         key_lengths=torch.tensor([5, 3, 1]))
for _s in (0.0, float("inf"), float("nan")):
    meta_bad("anchor_attention", f"scale {_s}", ValueError, "anchor_attention: scale must be finite and > 0", scale=_s)
meta_bad("anchor_attention", "cos on the CPU", ValueError, "anchor_attention: .*one device", cpu=("cos",))


def test_the_metadata_table_covers_every_op():
    assert {p.values[0] for p in META_CASES} == set(OPS)


def _build_args(op: str, over: dict, device: str, cpu: tuple = ()) -> dict:
    """:func:`_kernel_args` on ``device`` (those named in ``cpu`` left on the CPU), with ``over`` applied."""
    args = {k: v.to(device) if isinstance(v, torch.Tensor) and k not in cpu else v
            for k, v in kernel_args(op).items()}
    for k, v in over.items():
        v = v(args) if callable(v) else v
        args[k] = v.to(device) if isinstance(v, torch.Tensor) and v.device.type != device else v
    return args


@pytest.mark.parametrize("device,backend", device_backends(("cuda", "cpp", "triton")))
@pytest.mark.parametrize("op,over,exc,match,cpu", META_CASES)
def test_kernels_refuse_bad_metadata(device, backend, op, over, exc, match, cpu):
    if cpu and device == "cpu":
        pytest.skip("a mixed-device call needs a CUDA device")
    args = _build_args(op, over, device, cpu)
    written = {name: args[name].clone() for name in OPS[op].mutates}
    kernel = direct_kernel(op, backend)
    with pytest.raises(exc, match=match):
        kernel(*schema_args(op, args))  # validate=True: the metadata must be refused before the value checks
    with pytest.raises(exc, match=match):
        kernel(*schema_args(op, args), False)  # and also without them
    for name, before in written.items():
        assert torch.equal(args[name], before), f"{name} was written"


@pytest.mark.parametrize("backend", ["main", "triton"])
@pytest.mark.parametrize("op", [op for op in sorted(OPS)  # the ops taking two or more tensors
                                if sum(isinstance(v, torch.Tensor) for v in kernel_args(op).values()) > 1])
def test_a_meta_tensor_among_others_is_refused(op, backend):
    """Any ``meta`` tensor sends a call to the fake kernel, whatever the devices of the others: the fake
    refuses a mix (before, a direct call mixing CPU and meta tensors returned an empty result)."""
    if backend == "triton" and "triton" not in BACKENDS:
        pytest.skip("triton is not importable")
    kernel = getattr(ops, OPS[op].triton_op if backend == "triton" else op)
    args = kernel_args(op)
    first = next(k for k, v in args.items() if isinstance(v, torch.Tensor))
    mixed = dict(args, **{first: args[first].to("meta")})
    with pytest.raises(ValueError, match=f"{op}: all tensors must be on one device"):
        kernel(*schema_args(op, mixed))
    every = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    kernel(*schema_args(op, every))  # all on meta: shapes only, no error


@pytest.mark.parametrize("device,backend", device_backends(("cuda", "cpp", "triton")))
@pytest.mark.parametrize("op,over,exc,match", [
    ("lift_euler_", dict(y=lambda a: a["y"][:, :10], anchor_idx=torch.tensor([0, 7, 99])), ValueError,
     r"lift_euler_: y must be \[B, H\*W, C\]"),
    ("lift_euler_", dict(y=lambda a: a["y"][:1].expand(2, -1, -1), nearest=lambda a: a["nearest"] + 5), ValueError,
     "lift_euler_: y has internally overlapping memory"),
    ("anchor_attention", dict(cos=lambda a: a["cos"].expand(2, -1, -1), key_lengths=torch.tensor([9, 3])),
     ValueError, "anchor_attention: cos and sin must both be"),
    ("microflow_update_", dict(target=lambda a: a["target"][:, :2], new_idx=torch.tensor([1, 2, 3, 99])), ValueError,
     r"microflow_update_: target must be \[B, R, C\]"),
    ("gather_tokens", dict(x=_F64("x"), idx=torch.tensor([99])), TypeError, "gather_tokens: x must be float32"),
], ids=["lift_euler_ y shape", "lift_euler_ y expanded", "attention tables", "microflow_update_ target",
        "gather_tokens x dtype"])
def test_metadata_is_refused_before_index_values(device, backend, op, over, exc, match):
    """Bad metadata and a bad index value in one call: every kernel reports the metadata (checked first, as
    the public functions do), not the index. The C++ lift_euler_ and anchor_attention checked the anchors
    and key lengths before the shape of y and the rank of the rotary tables."""
    args = _build_args(op, over, device)
    with pytest.raises(exc, match=match):
        direct_kernel(op, backend)(*schema_args(op, args))


@pytest.mark.slow
@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not importable")
def test_compiled_triton_refuses_cpu_tensors():
    """Without the interpreter, a Triton twin called with CPU tensors is a ValueError (as the CUDA C++
    kernels' check_cuda), not an error from inside Triton's launcher."""
    proc = python("""
        import os
        os.environ["TRITON_INTERPRET"] = "0"
        import torch, jit_kernels
        import jit_kernels.triton  # noqa: F401
        x = torch.randn(1, 4, 2)
        for call in (lambda: torch.ops.jit_kernels.gather_tokens_triton(x, torch.tensor([1])),
                     lambda: torch.ops.jit_kernels.token_importance_triton(x, 2, 2, False)):
            try:
                call()
            except ValueError as e:
                print("refused:", e)
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("the Triton kernels need CUDA tensors") == 2, proc.stdout + proc.stderr[-2000:]
