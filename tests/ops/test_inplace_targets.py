"""In-place targets (``scatter_tokens_``, ``lift_euler_``, ``microflow_update_``) on every backend.

A target whose memory overlaps itself (an expanded batch) or an input is refused before any work,
by the public functions (ATen's rule: intersecting address ranges) and by the compiled kernels themselves; a
rejected call writes nothing; strided targets are accepted and updated in place (their strides
kept); and every write bumps the target's autograd version counter, so overwriting a tensor saved
for backward is reported at backward. Every backend present on the machine (``reference``, ``cpp``,
``triton`` through the interpreter) through the public functions, plus the kernels called directly
(``torch.ops.jit_kernels.<op>``).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import jit_kernels as jk
from jit_kernels import _checks
from jit_kernels import reference as ref
from jit_kernels._library import OPS
from jit_kernels.testing import anchors, assert_close, device_backends, tokens
from tests.ops._helpers import (BACKENDS, MH, MW, direct_kernel, kernel_args, lift_inputs, needs_cpp, offset_tokens,
                                ops, schema_args)


# ---------------------------------------------------------------- memory overlap


def _brute_offsets(t: torch.Tensor) -> list[int]:
    return [sum(i * s for i, s in zip(ix, t.stride())) for ix in itertools.product(*map(range, t.shape))]


def _refused(t: torch.Tensor, u: torch.Tensor) -> bool:
    try:
        _checks.check_inplace("op", "t", t, u=u)
    except ValueError:
        return True
    return False


def test_overlap_rules_are_safe_and_clear_every_slice():
    """Internal overlap: never missed (a layout with two elements at one location is always refused)
    and never claimed for a slice of a dense tensor. Pairs: refused exactly when the byte ranges
    intersect (ATen's rule), so a shared element is never accepted."""
    g = torch.Generator().manual_seed(0)
    buf = torch.zeros(400)
    for _ in range(300):
        dims = int(torch.randint(1, 4, (1,), generator=g))
        sizes = torch.randint(1, 5, (dims,), generator=g).tolist()
        strides = torch.randint(0, 7, (dims,), generator=g).tolist()
        t = buf.as_strided(sizes, strides, int(torch.randint(0, 20, (1,), generator=g)))
        offs = _brute_offsets(t)
        if len(set(offs)) != len(offs):
            assert _checks.has_internal_overlap(t), (sizes, strides)
            continue
        if _checks.has_internal_overlap(t):
            continue  # a layout the stride proof cannot clear: refused, conservatively
        sizes2 = torch.randint(1, 5, (dims,), generator=g).tolist()
        strides2 = torch.randint(1, 7, (dims,), generator=g).tolist()
        u = buf.as_strided(sizes2, strides2, int(torch.randint(0, 40, (1,), generator=g)))
        lo_t, hi_t = t.storage_offset(), t.storage_offset() + max(offs) + 1
        offs_u = _brute_offsets(u)
        lo_u, hi_u = u.storage_offset(), u.storage_offset() + max(offs_u) + 1
        assert _refused(t, u) == (lo_t < hi_u and lo_u < hi_t), (sizes, strides, sizes2, strides2)
        if {lo_t + o for o in offs} & {lo_u + o for o in offs_u}:
            assert _refused(t, u)
    for sl in itertools.product([slice(None), slice(None, None, 2), slice(1, None, 3)], repeat=3):
        v = torch.zeros(4, 6, 5)[sl]
        assert not _checks.has_internal_overlap(v), sl
        assert not _checks.has_internal_overlap(v.transpose(0, 2)), sl
    # Byte ranges across dtypes: an int64 over two float32 cells.
    f = torch.zeros(8)
    assert _refused(f[1:2], f.view(torch.int64)[0:1])
    assert not _refused(f[2:3], f.view(torch.int64)[0:1])
    assert not _refused(f[0:4], torch.zeros(4)) and not _refused(f[:0], f)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_targets_must_not_overlap(backend):
    h, w, c = 4, 5, 3
    n = h * w
    a = torch.tensor([0, 7, 13])
    kw = dict(backend=backend)
    base = tokens(1, n, c)
    keep = base.clone()
    wide = base.expand(2, -1, -1)  # stride 0 over the batch: both samples are one memory
    with pytest.raises(ValueError, match="scatter_tokens_: base has internally overlapping memory"):
        jk.scatter_tokens_(wide, torch.tensor([[1], [2]]), tokens(2, 1, c, seed=1), **kw)
    with pytest.raises(ValueError, match="lift_euler_: y has internally overlapping memory"):
        jk.lift_euler_(wide, tokens(2, 3, c, seed=1), a, h, w, 0.5, **kw)
    with pytest.raises(ValueError, match="microflow_update_: y has internally overlapping memory"):
        jk.microflow_update_(wide, torch.tensor([1, 2]), tokens(2, 2, c, seed=1), "blend", 0.5, **kw)
    assert torch.equal(base, keep)
    # An input sharing memory with the target: lift_euler_ read values while it wrote y.
    y = tokens(2, n, c, seed=2)
    keep = y.clone()
    with pytest.raises(ValueError, match="lift_euler_: values overlaps the memory of y"):
        jk.lift_euler_(y, y[:, 3:6], a, h, w, 0.5, **kw)
    with pytest.raises(ValueError, match="scatter_tokens_: src overlaps the memory of base"):
        jk.scatter_tokens_(y, torch.tensor([0, 1, 2]), y[:, 1:4], **kw)
    with pytest.raises(ValueError, match="microflow_update_: target overlaps the memory of y"):
        jk.microflow_update_(y, torch.tensor([0, 1]), y[:, 5:7], "blend", 0.5, **kw)
    assert torch.equal(y, keep)
    # Views of one buffer that share no element but whose address ranges intersect (even vs odd
    # channels) are refused too, as ATen does; with a copy of the input the call goes through.
    buf = tokens(2, n, 2 * c, seed=3)
    keep = buf.clone()
    with pytest.raises(ValueError, match="scatter_tokens_: src overlaps the memory of base"):
        jk.scatter_tokens_(buf[..., 0::2], torch.tensor([4, 9]), buf[:, :2, 1::2], **kw)
    assert torch.equal(buf, keep)
    want = ref.scatter_tokens_ref(buf[..., 0::2].clone(), torch.tensor([4, 9]), buf[:, :2, 1::2].clone())
    got = jk.scatter_tokens_(buf[..., 0::2], torch.tensor([4, 9]), buf[:, :2, 1::2].clone(), **kw)
    assert torch.equal(got, want)
    # Out of place, an expanded y is copied first: fine.
    out = jk.microflow_update(wide, torch.tensor([1, 2]), tokens(2, 2, c, seed=1), "blend", 0.5, **kw)
    assert out.shape == (2, n, c)


@needs_cpp
def test_compiled_kernels_refuse_overlap_themselves():
    h, w, c = 4, 5, 3
    n = h * w
    a = torch.tensor([0, 7, 13])
    near = ref.nearest_anchor_map_ref(a, h, w)
    wt = jk.gaussian_weights(1.0, 3)
    y = tokens(2, n, c)
    keep = y.clone()
    with pytest.raises(ValueError, match="lift_euler_: values overlaps the memory of y"):
        ops.lift_euler_(y, y[:, :3], a, near, wt, h, w, 0.5)
    with pytest.raises(ValueError, match="lift_euler_: y has internally overlapping memory"):
        ops.lift_euler_(y[:1].expand(2, -1, -1), y[:, :3].clone(), a, near, wt, h, w, 0.5)
    with pytest.raises(ValueError, match="scatter_tokens_: base has internally overlapping memory"):
        ops.scatter_tokens_(y[:1].expand(2, -1, -1), torch.tensor([1]), tokens(2, 1, c))
    with pytest.raises(ValueError, match="microflow_update_: new_idx overlaps the memory of y"):
        ops.microflow_update_(y, y.view(-1)[:4].view(torch.int64), tokens(2, 2, c), 0.5)
    assert torch.equal(y, keep)
    buf = tokens(2, n, 2 * c, seed=3)  # interleaved, no element shared, but intersecting ranges: refused (ATen's rule)
    keep = buf.clone()
    with pytest.raises(ValueError, match="scatter_tokens_: src overlaps the memory of base"):
        ops.scatter_tokens_(buf[..., 0::2], torch.tensor([4, 9]), buf[:, :2, 1::2])
    assert torch.equal(buf, keep)
    ops.scatter_tokens_(buf[..., 0::2], torch.tensor([4, 9]), buf[:, :2, 1::2].clone())  # a copy is accepted


@needs_cpp
def test_failed_inplace_ops_write_nothing():
    """Validation runs before any work: a rejected in-place call leaves its tensor untouched."""
    x = offset_tokens(2, 10, 4)
    keep = x.clone()
    src = offset_tokens(2, 3, 4, seed=1)
    for bad in (torch.tensor([1, 2, 1]), torch.tensor([1, 2, 10]), torch.tensor([[1, 2, 3], [0, 0, 1]])):
        with pytest.raises((ValueError, IndexError)):
            ops.scatter_tokens_(x, bad, src)
        assert torch.equal(x, keep)
    with pytest.raises(ValueError):
        ops.microflow_update_(x, torch.tensor([4, 5, 4]), src, 0.5)
    assert torch.equal(x, keep)
    vals, a, near, wt = lift_inputs()
    y = offset_tokens(2, 91, 5)
    keep = y.clone()
    with pytest.raises(IndexError):
        ops.lift_euler_(y, vals, a, torch.full_like(near, 20), wt, 7, 13, 0.5)
    assert torch.equal(y, keep)


# ---------------------------------------------------------------- strided in-place targets


def _strided(b, n, c, seed=0, dtype=torch.float32):
    """Fresh strided [B, N, C] tensors: channel stride 2, and batch-major (non-contiguous rows)."""
    views = [tokens(b, n, 2 * c, dtype, seed=seed)[..., ::2], tokens(n, b, c, dtype, seed=seed + 1).transpose(0, 1)]
    return [_fresh(v) for v in views]


def _fresh(t):
    """A copy of ``t`` with its strides (``clone`` makes a gapped layout contiguous)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(t)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_y_is_accepted_and_updated_in_place(backend, dtype):
    """cpp refused a strided y (microflow_update out of place even cloned it with its strides and failed)."""
    h, w, c = 5, 6, 3
    n = h * w
    a = anchors(n, 7)
    vals = tokens(2, 7, c, dtype, seed=5)
    new = torch.tensor([i for i in range(n) if i not in set(a.tolist())][:4])
    tgt = tokens(2, 4, c, dtype, seed=6)
    near = ref.nearest_anchor_map_ref(a, h, w)
    for y in _strided(2, n, c, seed=7, dtype=dtype):
        assert not y.is_contiguous()
        want = ref.lift_euler_ref_(y.contiguous(), vals, a, near, jk.lift_weights(7, n), h, w, 0.25)
        yy, stride = _fresh(y), y.stride()
        assert jk.lift_euler_(yy, vals, a, h, w, 0.25, backend=backend) is yy
        assert yy.stride() == stride
        assert_close(yy, want, dtype)
        for mode, wt in (("assign", None), ("blend", 1 / 3)):
            want = ref.microflow_update_ref_(y.contiguous(), new, tgt, 1.0 if wt is None else wt)
            keep = y.clone()
            assert_close(jk.microflow_update(y, new, tgt, mode, wt, backend=backend), want, dtype)
            assert torch.equal(y, keep)
            yi = _fresh(y)
            jk.microflow_update_(yi, new, tgt, mode, wt, backend=backend)
            assert_close(yi, want, dtype)


@needs_cpp
def test_compiled_kernels_take_strided_y():
    h, w, c = 5, 6, 3
    n = h * w
    a = anchors(n, 7)
    near = ref.nearest_anchor_map_ref(a, h, w)
    wt = jk.gaussian_weights(1.0, 5)
    vals = tokens(2, 7, c, seed=5)
    for y in _strided(2, n, c, seed=7):
        want = ref.lift_euler_ref_(y.contiguous(), vals, a, near, wt, h, w, -0.5)
        got = _fresh(y)
        ops.lift_euler_(got, vals, a, near, wt, h, w, -0.5)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # bit-identical to the contiguous kernel
        cont = y.contiguous()
        ops.lift_euler_(cont, vals, a, near, wt, h, w, -0.5)
        assert torch.equal(got, cont)
        got = _fresh(y)
        ops.microflow_update_(got, torch.tensor([3, 1]), tokens(2, 2, c, seed=8), 0.25)
        cont = y.contiguous()
        ops.microflow_update_(cont, torch.tensor([3, 1]), tokens(2, 2, c, seed=8), 0.25)
        assert torch.equal(got, cont)


# ---------------------------------------------------------------- in-place writes bump the version counter
#
# scatter_tokens_, lift_euler_ and microflow_update_ write an argument: like a torch in-place op, every
# backend bumps its autograd version counter, so a tensor saved for backward and then overwritten by
# them is reported at backward instead of giving wrong gradients (and the value-check cache sees the
# write). The C++ kernels and the Triton launcher the CUDA key routes to did not bump it.


def _inplace_calls(device):
    """(op, the written tensor, direct kernel call(kernel), public call(backend)) of each in-place op."""
    out = []
    for op in ("scatter_tokens_", "lift_euler_", "microflow_update_"):
        args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kernel_args(op).items()}
        target = args[OPS[op].mutates[0]]
        direct = lambda kernel, op=op, args=args: kernel(*schema_args(op, args))  # noqa: E731
        if op == "scatter_tokens_":
            public = lambda be, a=args: jk.scatter_tokens_(a["base"], a["idx"], a["src"], backend=be)  # noqa: E731
        elif op == "lift_euler_":
            public = lambda be, a=args: jk.lift_euler_(a["y"], a["values"], a["anchor_idx"], MH, MW, 0.1,  # noqa: E731
                                                       nearest=a["nearest"], backend=be)
        else:
            public = lambda be, a=args: jk.microflow_update_(a["y"], a["new_idx"], a["target"], "blend", 0.5,  # noqa: E731
                                                             backend=be)
        out.append((op, target, direct, public))
    return out


@pytest.mark.parametrize("device,backend", device_backends(("cuda", "cpp", "triton", "reference")))
def test_inplace_ops_bump_the_version_counter(device, backend):
    for op, target, direct, public in _inplace_calls(device):
        if backend != "reference":  # the kernel called directly (the reference has none)
            v0 = target._version
            direct(direct_kernel(op, backend))
            assert target._version > v0, f"{op} ({backend}) wrote {OPS[op].mutates[0]} without bumping its version"
        v0 = target._version
        public(backend)
        assert target._version > v0, f"jk.{op}(backend={backend!r}) did not bump the version"


@pytest.mark.parametrize("device,backend", device_backends(("cuda", "cpp", "triton", "reference")))
def test_overwriting_a_tensor_saved_for_backward_is_reported(device, backend):
    for op, target, direct, public in _inplace_calls(device):
        scale = torch.ones((), device=device, requires_grad=True)
        loss = (scale * target).sum()  # saves target for the gradient of scale
        public(backend)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
        if backend != "reference":
            loss = (scale * target).sum()
            direct(direct_kernel(op, backend))
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                loss.backward()
