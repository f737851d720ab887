"""The op table and the layer it generates: registrations, Triton twins, CUDA routing,
backend selection, the Python validation policy, and torch.compile, for every op.

Backends under test are those present on the machine (``cpp`` = the compiled CPU
extension, ``triton`` = Triton kernels, on CPU through TRITON_INTERPRET=1 only, see
conftest.py). ``test_backends_present`` fails if the build lost one, so a missing
backend can never hide behind a skip. The per-family parity tests are in
test_tokens.py, test_lift.py, test_importance.py, test_microflow.py and test_attention.py.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import jit_kernels as jk
from jit_kernels import reference as ref
from jit_kernels._library import FAMILIES, OPS
from jit_kernels.testing import anchors, compiled_backends, gen, tokens

BACKENDS = compiled_backends("cpu")


def test_backends_present():
    # conftest.py: Triton runs through its interpreter (CPU tensors) on a machine without CUDA,
    # compiled (CUDA tensors) on a CUDA machine; an explicit TRITON_INTERPRET decides otherwise.
    from jit_kernels._env import triton_interpret

    have = jk.available_backends("cpu")
    assert "reference" in have
    assert "cpp" in have, f"compiled extension missing: {jk.extension_error()}"
    if triton_interpret():
        assert "triton" in have, "Triton backend missing on CPU (triton not importable)"
    else:
        assert torch.cuda.is_available(), "TRITON_INTERPRET is off on a machine without CUDA: Triton cannot run here"
        cuda = jk.available_backends("cuda")
        assert "triton" in cuda, "Triton backend missing for CUDA tensors (triton not importable)"
        assert "cuda" in cuda, f"CUDA kernels missing from jit_kernels._C ({jk.extension_error()}); build with " \
                               "TORCH_CUDA_ARCH_LIST=<arch> python setup.py build_ext --inplace"


def test_backend_names_are_public():
    assert jk.BACKENDS == ("auto", "cuda", "triton", "cpp", "reference")
    assert set(jk.available_backends()) <= set(jk.BACKENDS)


# ---------------------------------------------------------------- the table


def test_every_op_is_registered_from_its_row():
    for name, op in OPS.items():
        assert op.family in FAMILIES, name
        schema = getattr(torch.ops.jit_kernels, name).default._schema
        assert str(schema) == f"jit_kernels::{name}{op.schema}", name
        assert torch.Tag.pt2_compliant_tag in getattr(torch.ops.jit_kernels, name).default.tags, name
        assert op.mutates == tuple(a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write)
    assert jk._library.SCHEMAS == {name: op.schema for name, op in OPS.items()}


def _op_samples():
    h, w, b, c = 5, 6, 2, 3
    n = h * w
    x = tokens(b, n, c)
    a = anchors(n, 10)
    near = ref.nearest_anchor_map_ref(a, h, w)
    wts = jk.lift_weights(10, n)
    vals = tokens(b, 10, c, seed=4)
    new = torch.tensor([i for i in range(n) if i not in set(a.tolist())][:4])
    eps = tokens(b, 4, c, seed=5)
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
        "anchor_attention": (*(tokens(b, n, 8, seed=6 + i).view(b, n, 2, 4) for i in range(3)),
                             torch.rand(n, 4, generator=gen(9)), torch.rand(n, 4, generator=gen(10)),
                             torch.tensor([n, 7]), 0.25),
    }


def test_every_op_has_a_sample():
    assert set(_op_samples()) == set(OPS)


# The Triton twins' rows run the interpreter many times per op (slow); their fakes are the ones the
# C++ rows check too.
@pytest.mark.parametrize("backend", [pytest.param(b, marks=pytest.mark.slow) if b == "triton" else b for b in BACKENDS])
@pytest.mark.parametrize("name", sorted(OPS))
def test_opcheck(backend, name):
    # The fakes (one per row, shared by the op and its Triton twin) against the real kernels.
    args = _op_samples()[name]
    op = getattr(torch.ops.jit_kernels, OPS[name].triton_op if backend == "triton" else name)
    torch.library.opcheck(op.default, args)


# ---------------------------------------------------------------- Triton twins and CUDA routing

try:
    T = importlib.import_module("jit_kernels.triton")
except ImportError:  # triton not installed (test_backends_present reports it)
    T = None
needs_triton = pytest.mark.skipif(T is None, reason="triton not importable")


@needs_triton
def test_every_op_has_a_triton_twin_with_the_same_arguments():
    for name in OPS:
        main = getattr(torch.ops.jit_kernels, name).default._schema
        tri = getattr(torch.ops.jit_kernels, name + "_triton").default._schema
        assert [a.name for a in tri.arguments] == [a.name for a in main.arguments], name
        assert [str(a.type) for a in tri.arguments] == [str(a.type) for a in main.arguments], name
        assert [a.is_write for a in tri.arguments if a.alias_info] == [a.is_write for a in main.arguments if a.alias_info], name
        assert len(tri.returns) == len(main.returns), name
    assert set(T.TRITON_OPS) == set(OPS)


@needs_triton
def test_launchers_follow_the_naming_rule():
    # Every op's Triton launcher is launch_<op> in the module of its family, and nothing else is called launch_*.
    for name, op in OPS.items():
        mod = importlib.import_module(f"jit_kernels.triton.{op.family}")
        assert T.LAUNCHERS[name] is getattr(mod, "launch_" + name), name
    named = {(op.family, "launch_" + n) for n, op in OPS.items()}
    for fam in FAMILIES:
        mod = importlib.import_module(f"jit_kernels.triton.{fam}")
        assert {(fam, k) for k in vars(mod) if k.startswith("launch_")} <= named, fam


@needs_triton
def test_cuda_routing_decision():
    registered = []
    routed = T.route_to_cuda(
        {"a": len, "b": len, "c": len},
        has_kernel=lambda op: op == "b",
        register=lambda op, fn: registered.append(op),
    )
    assert routed == ("a", "c") and registered == ["a", "c"]


@needs_triton
def test_cuda_routing_state():
    # Only the ops without a CUDA C++ kernel are routable, and each of them now has a CUDA kernel.
    assert set(T.CUDA_ROUTABLE) == {"token_importance", "select_new_tokens", "microflow_update_", "microflow_target",
                                    "anchor_attention"}
    assert set(T.CUDA_ROUTABLE) == {n for n, op in OPS.items() if op.cuda_via_triton}
    assert set(T.ROUTED_TO_TRITON) <= set(T.CUDA_ROUTABLE)
    for op in T.CUDA_ROUTABLE:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"jit_kernels::{op}", "CUDA"), op
    # The CPU extension (if loaded) registers no CUDA kernel, so here every routable op was routed.
    if not any(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"jit_kernels::{op}", "CUDA")
        for op in ("gather_tokens", "lift_field")
    ):
        assert set(T.ROUTED_TO_TRITON) == set(T.CUDA_ROUTABLE)
    # Routing again is a no-op: every routable op has a kernel now.
    assert T.route_to_cuda(T.CUDA_ROUTABLE, register=lambda op, fn: pytest.fail(op)) == ()


# ---------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_torch_compile_fullgraph(backend):
    h, w = 6, 7
    n = h * w
    a = anchors(n, 12)
    near = jk.nearest_anchor_map(a, h, w)
    x = tokens(2, n, 4)

    def step(x):
        v = jk.gather_tokens(x, a, backend=backend)
        full = jk.lift_field(v, a, h, w, nearest=near, backend=backend)
        imp = jk.token_importance(full, h, w, backend=backend)
        return full, imp

    step(x)  # eager first: resolves (and caches) the backends, which dynamo cannot trace
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    want = step(x)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


# ---------------------------------------------------------------- validation policy and backend choice


BAD_BACKENDS = ["reference"] + BACKENDS


@pytest.mark.parametrize("backend", BAD_BACKENDS)
def test_bad_inputs_raise_before_work(backend):
    x = tokens(2, 20, 3)
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


@pytest.mark.parametrize("backend", BAD_BACKENDS)
def test_shape_errors_are_the_same_on_every_backend(backend):
    # One policy: types, shapes, dtypes and devices are checked in Python before dispatch, whatever the backend.
    x = tokens(2, 20, 3)
    with pytest.raises(TypeError, match=r"gather_tokens: x must be a torch.Tensor"):
        jk.gather_tokens(x.tolist(), torch.tensor([0]), backend=backend)
    with pytest.raises(ValueError, match=r"gather_tokens: idx must be \[M\] \(shared\) or \[B, M\] \(per sample\)"):
        jk.gather_tokens(x, torch.zeros(1, 1, 1, dtype=torch.int64), backend=backend)
    with pytest.raises(ValueError, match=r"scatter_tokens_: src must be \[B, M, C\] = \[2, 1, 3\]"):
        jk.scatter_tokens_(x, torch.tensor([0]), x[:, :2], backend=backend)
    with pytest.raises(TypeError, match=r"microflow_target: anchor_idx must be a torch.Tensor"):
        jk.microflow_target(x, x, [0, 1], torch.tensor([2]), x[:, :1], 0.5, 0.3, 4, 5, backend=backend)


def test_unknown_and_unavailable_backend():
    x = tokens(1, 4, 2)
    with pytest.raises(ValueError, match="unknown backend"):
        jk.gather_tokens(x, torch.tensor([0]), backend="metal")
    with pytest.raises(jk.BackendUnavailableError, match="cuda"):
        jk.gather_tokens(x, torch.tensor([0]), backend="cuda")

    with jk.use_backend("reference"):
        assert jk.get_backend() == "reference"
    assert jk.get_backend() != "reference" or __import__("os").environ.get("JIT_KERNELS_BACKEND") == "reference"
