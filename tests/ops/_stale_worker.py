"""Worker of tests/ops/test_stale_indices.py: every index argument of every op, made invalid behind torch's back.

``python tests/ops/_stale_worker.py BACKEND MODE`` runs every case on one backend and prints one JSON
line per case as it finishes (``{"case", "outcome", "error", "canary_ok", "inputs_ok"}``), so
the parent can name the case that killed this process (its "start" line has no "end" line).

A case: build valid inputs, call the op once (through the route of MODE), then write an invalid
value into one index argument through a route that does not bump torch's version counter
(``.data``, a ``set_`` alias of its storage, ``.numpy()``, DLPack) and call again with the very
same tensors. Every tensor the op writes in place sits inside a larger buffer whose margins
("canaries") must stay untouched, and every input except the mutated index must be unchanged.

MODE: ``public`` (the public function, values checked on every call), ``trusted`` (the public
function with ``validate=False``: the caller vouches for the indices, nothing reads them on the
host), ``kernel`` (``torch.ops.jit_kernels.<op>``, or ``<op>_triton`` for the Triton backend, with
``validate=False``: what the trusted path calls).
"""

from __future__ import annotations

import json
import sys

import torch

import jit_kernels as jk


class _Kernels:
    """``torch.ops.jit_kernels.<op>`` (the C++ kernel on CPU tensors), or its Triton twin ``<op>_triton``."""

    triton = False

    def __getattr__(self, name):
        return getattr(torch.ops.jit_kernels, name + "_triton" if self.triton else name)


ops = _Kernels()
BAD_VALUES = (10**9, -(10**9), -1)
ROUTES = ("data", "set_", "numpy", "dlpack")
# The Triton interpreter costs ~0.3 s a call: there, one route through torch and one foreign, and a
# value far out and one just below the range (the kernel sees the same tensor whatever the route).
TRITON_BAD_VALUES = (10**9, -1)
TRITON_ROUTES = ("data", "dlpack")
CANARY = 12345.0


def boxed(shape, *, fill=None, gen=None):
    """A float32 tensor of ``shape`` in the middle of a larger buffer whose margins hold CANARY."""
    n = 1
    for s in shape:
        n *= s
    pad = max(64, n)
    buf = torch.full((pad + n + pad,), CANARY)
    t = buf[pad:pad + n].view(shape)
    t.copy_(torch.randn(shape, generator=gen) if fill is None else torch.full(shape, fill))
    return buf, t, pad


def mutate(idx: torch.Tensor, route: str, pos: tuple, value: int) -> None:
    """``idx[pos] = value`` without bumping ``idx``'s version counter."""
    v0 = idx._version
    if route == "data":
        idx.data[pos] = value
    elif route == "set_":
        alias = torch.empty(0, dtype=idx.dtype).set_(idx.untyped_storage(), idx.storage_offset(), idx.shape,
                                                     idx.stride())
        alias[pos] = value
    elif route == "numpy":
        idx.numpy()[pos] = value
    elif route == "dlpack":
        torch.from_dlpack(idx)[pos] = value
    else:
        raise ValueError(route)
    assert idx[pos].item() == value and idx._version == v0, (route, idx._version, v0)


def cases(backend: str):
    """(name, make) pairs; ``make()`` -> (call, index tensors by name, boxes to watch, inputs to keep)."""
    h, w, c, b = 6, 8, 5, 2
    n = h * w

    def g():
        return torch.Generator().manual_seed(0)

    def anchors(per_sample: bool):
        a = torch.tensor([0, 5, 17, 30, 47])
        return a.expand(b, -1).clone() if per_sample else a

    out = []
    for per_sample in (False, True):
        tag = "per_sample" if per_sample else "shared"

        def tokens_case(op, per_sample=per_sample):
            def make():
                gen = g()
                x = torch.randn(b, n, c, generator=gen)
                idx = anchors(per_sample)
                src = torch.randn(b, idx.shape[-1], c, generator=gen)
                box = boxed((b, n, c), gen=gen)
                if op == "gather_tokens":
                    return dict(public=lambda **k: jk.gather_tokens(x, idx, **k),
                                kernel=lambda: ops.gather_tokens(x, idx, False),
                                index={"idx": idx}, boxes=[], keep=[x])
                if op == "scatter_tokens":
                    return dict(public=lambda **k: jk.scatter_tokens(x, idx, src, **k),
                                kernel=lambda: ops.scatter_tokens(x, idx, src, False),
                                index={"idx": idx}, boxes=[], keep=[x, src])
                _, base, _ = box
                return dict(public=lambda **k: jk.scatter_tokens_(base, idx, src, **k),
                            kernel=lambda: ops.scatter_tokens_(base, idx, src, False),
                            index={"idx": idx}, boxes=[box], keep=[src])
            return make

        for op in ("gather_tokens", "scatter_tokens", "scatter_tokens_"):
            out.append((f"{op}/{tag}", tokens_case(op)))

        def nearest_case(per_sample=per_sample):
            a = anchors(per_sample)
            return dict(public=lambda **k: jk.nearest_anchor_map(a, h, w, **k),
                        kernel=lambda: ops.nearest_anchor_map(a, h, w, False),
                        index={"anchor_idx": a}, boxes=[], keep=[])
        out.append((f"nearest_anchor_map/{tag}", nearest_case))

        def lift_case(op, per_sample=per_sample):
            def make():
                gen = g()
                a = anchors(per_sample)
                near = jk.nearest_anchor_map(a, h, w)
                vals = torch.randn(b, a.shape[-1], c, generator=gen)
                wt = jk.lift_weights(a.shape[-1], n)
                if op == "lift_field":
                    return dict(public=lambda **k: jk.lift_field(vals, a, h, w, nearest=near, **k),
                                kernel=lambda: ops.lift_field(vals, a, near, wt, h, w, False),
                                index={"anchor_idx": a, "nearest": near}, boxes=[], keep=[vals])
                box = boxed((b, n, c), gen=gen)
                y = box[1]
                return dict(public=lambda **k: jk.lift_euler_(y, vals, a, h, w, 0.1, nearest=near, **k),
                            kernel=lambda: ops.lift_euler_(y, vals, a, near, wt, h, w, 0.1, False),
                            index={"anchor_idx": a, "nearest": near}, boxes=[box], keep=[vals])
            return make

        for op in ("lift_field", "lift_euler_"):
            out.append((f"{op}/{tag}", lift_case(op)))

        def select_case(per_sample=per_sample):
            imp = torch.randn(b, n, generator=g())
            a = anchors(per_sample)
            return dict(public=lambda **k: jk.select_new_tokens(imp, a, 3, **k),
                        kernel=lambda: ops.select_new_tokens(imp, a, 3, False),
                        index={"active_idx": a}, boxes=[], keep=[imp])
        out.append((f"select_new_tokens/{tag}", select_case))

        def update_case(inplace, per_sample=per_sample):
            def make():
                gen = g()
                new = torch.tensor([1, 2, 9])
                new = new.expand(b, -1).clone() if per_sample else new
                target = torch.randn(b, 3, c, generator=gen)
                box = boxed((b, n, c), gen=gen)
                y = box[1]
                if inplace:
                    return dict(public=lambda **k: jk.microflow_update_(y, new, target, "blend", 0.5, **k),
                                kernel=lambda: ops.microflow_update_(y, new, target, 0.5, False),
                                index={"new_idx": new}, boxes=[box], keep=[target])
                return dict(public=lambda **k: jk.microflow_update(y, new, target, "blend", 0.5, **k),
                            kernel=None, index={"new_idx": new}, boxes=[box], keep=[target, y])
            return make

        out.append((f"microflow_update_/{tag}", update_case(True)))
        out.append((f"microflow_update/{tag}", update_case(False)))

        def target_case(per_sample=per_sample):
            gen = g()
            a = anchors(per_sample)
            near = jk.nearest_anchor_map(a, h, w)
            new = torch.tensor([1, 2, 9])
            new = new.expand(b, -1).clone() if per_sample else new
            yp, vp = torch.randn(b, n, c, generator=gen), torch.randn(b, n, c, generator=gen)
            eps = torch.randn(b, 3, c, generator=gen)
            wt = jk.lift_weights(a.shape[-1], n)
            return dict(public=lambda **k: jk.microflow_target(yp, vp, a, new, eps, 0.8, 0.6, h, w, nearest=near, **k),
                        kernel=lambda: ops.microflow_target(yp, vp, a, near, wt, new, eps, 0.8, 0.6, h, w, False),
                        index={"anchor_idx": a, "nearest": near, "new_idx": new}, boxes=[], keep=[yp, vp, eps])
        out.append((f"microflow_target/{tag}", target_case))

    def attention_case():
        gen = g()
        q, k, v = (torch.randn(2, 24, 2, 8, generator=gen) for _ in range(3))
        cos, sin = torch.randn(24, 8, generator=gen), torch.randn(24, 8, generator=gen)
        lens = torch.tensor([24, 13])
        return dict(public=lambda **kw: jk.anchor_attention(q, k, v, cos, sin, key_lengths=lens, **kw),
                    kernel=lambda: ops.anchor_attention(q, k, v, cos, sin, lens, 0.3, False),
                    index={"key_lengths": lens}, boxes=[], keep=[q, k, v, cos, sin])
    out.append(("anchor_attention", attention_case))
    return out


def bad_values(name: str, value: int) -> int:
    if name == "key_lengths":  # valid lengths are [1, L]
        return {10**9: 10**6, -(10**9): -(10**6), -1: 0}[value]
    return value


def run(backend: str, mode: str) -> None:
    ops.triton = backend == "triton"
    for name, make in cases(backend):
        for arg in make()["index"]:
            for route in TRITON_ROUTES if backend == "triton" else ROUTES:
                for value in TRITON_BAD_VALUES if backend == "triton" else BAD_VALUES:
                    case = make()
                    if mode == "kernel" and case["kernel"] is None:
                        continue
                    call = {"public": lambda: case["public"](backend=backend),
                            "trusted": lambda: case["public"](backend=backend, validate=False),
                            "kernel": case["kernel"]}[mode]
                    label = f"{name}:{arg}:{route}:{value}"
                    print(json.dumps({"start": label}), flush=True)
                    idx = case["index"][arg]
                    keep = [t.clone() for t in case["keep"]]
                    others = {k: t.clone() for k, t in case["index"].items() if k != arg}
                    record = {"case": label}
                    try:
                        jk_call_ok = True
                        call()  # a valid call first: anything it may remember about the tensors
                    except Exception as exc:  # noqa: BLE001 (the valid call must pass: reported)
                        jk_call_ok = False
                        record["valid_call_error"] = f"{type(exc).__name__}: {exc}"
                    pos = (0,) * idx.dim()
                    mutate(idx, route, pos, bad_values(arg, value))
                    try:
                        call()
                        record["outcome"] = "returned"
                    except Exception as exc:  # noqa: BLE001
                        record["outcome"] = type(exc).__name__
                        record["error"] = str(exc).splitlines()[0][:200]
                    record["valid_call_ok"] = jk_call_ok
                    record["canary_ok"] = all(
                        bool((buf[:pad] == CANARY).all()) and bool((buf[pad + t.numel():] == CANARY).all())
                        for buf, t, pad in case["boxes"])
                    record["inputs_ok"] = (all(torch.equal(a, b) for a, b in zip(keep, case["keep"]))
                                           and all(torch.equal(t, case["index"][k]) for k, t in others.items()))
                    print(json.dumps(record), flush=True)
    print(json.dumps({"done": True}), flush=True)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
