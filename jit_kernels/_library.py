"""The ``jit_kernels`` op table: one row per op, from which every registration and the routing follow.

A row (:class:`OpDef`) holds the op's schema, its fake (meta) kernel, its family and
whether its CUDA kernel is the Triton launcher. From the table:

- this module defines ``torch.ops.jit_kernels.<op>`` (schema + fake) for every row;
- the compiled extension ``jit_kernels._C`` adds CPU and CUDA kernels to those ops
  (``TORCH_LIBRARY_IMPL`` in ``csrc/cpu/<family>.cpp`` and ``csrc/cuda/<family>.cu``);
- :mod:`jit_kernels.triton` registers the Triton twin ``torch.ops.jit_kernels.<op>_triton``
  (same schema and fake) around the launcher ``launch_<op>`` of
  ``jit_kernels/triton/<family>.py``, and, for rows with ``cuda_via_triton``, registers that
  launcher as the CUDA kernel of ``<op>`` itself;
- :mod:`jit_kernels._backends` finds the implementation of ``(op, backend)`` through the row;
- for rows that write an argument (``Tensor(a!)``: ``scatter_tokens_``, ``lift_euler_``,
  ``microflow_update_``), this module registers an ``ADInplaceOrView`` kernel that bumps the
  autograd version counter of that argument and redispatches to the backend kernel, so every
  backend's in-place write is visible to autograd's saved-tensor check (and to the sampler's check
  that a velocity callable left its active-index tensor alone), as a torch in-place op's is.

The schemas live in Python rather than in ``csrc/`` because the package must work
without its compiled extension (reference and Triton paths). The compiled extension is
loaded after this module has defined the ops.

Every schema ends in ``bool validate=True``: the kernel checks the index values (ranges,
duplicates, nearest-map consistency, key lengths) before any work. The public functions
check them on every call themselves (:mod:`jit_kernels._checks`) and pass ``False``. With
``False`` no kernel reads or writes outside its tensors either: the C++ CPU kernels still
raise ``IndexError`` for an index out of range, the CUDA and Triton kernels mask it
(docs/architecture.md, "Validation policy"); duplicates or an inconsistent nearest map then
give an unspecified result.

Conventions shared by all ops: token tensors are ``[B, N, C]`` (fp32, fp16 or bf16,
arithmetic in fp32); index tensors are int64 ``[M]`` (shared by the batch) or ``[B, M]``
(per sample); grids are row-major ``H x W`` with ``N = H * W``; ``weights`` is the fp32
``[K]`` Gaussian of :mod:`jit_kernels.blur`. Attention tensors are ``[B, L, H, D]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import _checks, _metadata, _values

import torch

__all__ = ["NAMESPACE", "OpDef", "OPS", "SCHEMAS", "FAMILIES"]

NAMESPACE = "jit_kernels"

# Op families: each has a public module jit_kernels/<family>.py, a reference
# jit_kernels/reference/<family>.py, Triton launchers in jit_kernels/triton/<family>.py
# and C++ kernels in csrc/cpu/<family>.cpp (CUDA C++ in csrc/cuda/<family>.cu where there is one).
FAMILIES = ("tokens", "lift", "importance", "microflow", "attention")


@dataclass(frozen=True)
class OpDef:
    """One op of the library: what every backend registers, and how CUDA is served."""

    name: str
    family: str
    schema: str  # the argument list and returns, without the name: "(Tensor x, ...) -> Tensor"
    fake: Callable  # the meta kernel shared by the op and its Triton twin (output shapes only)
    cuda_via_triton: bool = False  # no CUDA C++ kernel: the Triton launcher is the op's CUDA kernel

    def __post_init__(self):
        object.__setattr__(self, "fake", _one_device(self.name, self.schema, self.fake))

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    @property
    def triton_op(self) -> str:
        """Name of the Triton twin in ``torch.ops.jit_kernels``."""
        return self.name + "_triton"

    @property
    def launcher(self) -> str:
        """Name of the plain Triton launcher in ``jit_kernels.triton.<family>``."""
        return "launch_" + self.name

    @property
    def metadata(self) -> Callable:
        """The op's metadata check (:mod:`jit_kernels._metadata`: shapes, dtypes, devices, in-place
        targets; what the C++ kernels check with ``TORCH_CHECK``), taking the schema arguments
        without ``validate``."""
        return getattr(_metadata, self.name)

    @property
    def values(self) -> Callable:
        """The op's index-value check (:mod:`jit_kernels._values`), taking the schema arguments
        without ``validate``."""
        return getattr(_values, self.name)

    @property
    def mutates(self) -> tuple[str, ...]:
        """Arguments the op writes (``Tensor(a!)`` in the schema)."""
        parsed = torch._C.parse_schema(self.name + self.schema)
        return tuple(a.name for a in parsed.arguments if a.alias_info is not None and a.alias_info.is_write)


# ---------------------------------------------------------------- fakes (output shapes)


def _one_device(op: str, schema: str, fake: Callable) -> Callable:
    """``fake`` refusing tensors on several devices (``ValueError``: the public functions' check,
    :func:`jit_kernels._checks.check_devices`, by the schema's argument names).

    The dispatcher sends a call with any ``meta`` tensor to the fake, whatever the other tensors'
    devices: without this, a direct kernel call mixing CPU and meta tensors returned an empty result."""
    names = [a.name for a in torch._C.parse_schema(op + schema).arguments]

    def checked(*args, **kwargs):
        _checks.check_devices(op, **dict(zip(names, args)), **kwargs)
        return fake(*args, **kwargs)

    checked.__name__ = getattr(fake, "__name__", "fake")
    checked.__wrapped__ = fake
    return checked


def _fake_gather_tokens(x, idx, validate=True):
    return x.new_empty((x.shape[0], idx.shape[-1], x.shape[2]))


def _fake_scatter_tokens(base, idx, src, validate=True):
    # Every kernel (C++ CPU/CUDA, Triton) returns a contiguous copy.
    return torch.empty_like(base, memory_format=torch.contiguous_format)


def _fake_nearest_anchor_map(anchor_idx, height, width, validate=True):
    shape = (height * width,) if anchor_idx.dim() == 1 else (anchor_idx.shape[0], height * width)
    return anchor_idx.new_empty(shape, dtype=torch.int64)


def _fake_lift_field(values, anchor_idx, nearest, weights, height, width, validate=True):
    return values.new_empty((values.shape[0], height * width, values.shape[2]))


def _fake_token_importance(field, height, width, validate=True):
    return field.new_empty((field.shape[0], height * width), dtype=torch.float32)


def _fake_select_new_tokens(importance, active_idx, count, validate=True):
    return importance.new_empty((importance.shape[0], count), dtype=torch.int64)


def _fake_microflow_target(y_prev, v_prev, anchor_idx, nearest, weights, new_idx, eps, sigma_prev, sigma, height, width, validate=True):
    return y_prev.new_empty((y_prev.shape[0], new_idx.shape[-1], y_prev.shape[2]))


def _fake_anchor_attention(q, k, v, cos, sin, key_lengths, scale, validate=True):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _fake_inplace(*args):
    return None


# ---------------------------------------------------------------- the table

_LIFT_ARGS = "Tensor anchor_idx, Tensor nearest, Tensor weights, int height, int width"

OPS: dict[str, OpDef] = {
    op.name: op
    for op in (
        OpDef("gather_tokens", "tokens", "(Tensor x, Tensor idx, bool validate=True) -> Tensor", _fake_gather_tokens),
        OpDef("scatter_tokens", "tokens", "(Tensor base, Tensor idx, Tensor src, bool validate=True) -> Tensor", _fake_scatter_tokens),
        OpDef("scatter_tokens_", "tokens", "(Tensor(a!) base, Tensor idx, Tensor src, bool validate=True) -> ()", _fake_inplace),
        OpDef("nearest_anchor_map", "lift", "(Tensor anchor_idx, int height, int width, bool validate=True) -> Tensor",
              _fake_nearest_anchor_map),
        OpDef("lift_field", "lift", f"(Tensor values, {_LIFT_ARGS}, bool validate=True) -> Tensor", _fake_lift_field),
        OpDef("lift_euler_", "lift", f"(Tensor(a!) y, Tensor values, {_LIFT_ARGS}, float dt, bool validate=True) -> ()", _fake_inplace),
        OpDef("token_importance", "importance", "(Tensor field, int height, int width, bool validate=True) -> Tensor",
              _fake_token_importance, cuda_via_triton=True),
        OpDef("select_new_tokens", "importance", "(Tensor importance, Tensor active_idx, int count, bool validate=True) -> Tensor",
              _fake_select_new_tokens, cuda_via_triton=True),
        OpDef("microflow_update_", "microflow", "(Tensor(a!) y, Tensor new_idx, Tensor target, float weight, bool validate=True) -> ()",
              _fake_inplace, cuda_via_triton=True),
        OpDef("microflow_target", "microflow",
              "(Tensor y_prev, Tensor v_prev, Tensor anchor_idx, Tensor nearest, Tensor weights, "
              "Tensor new_idx, Tensor eps, float sigma_prev, float sigma, int height, int width, bool validate=True) -> Tensor",
              _fake_microflow_target, cuda_via_triton=True),
        # q, k, v [B, L, H, D]; cos, sin [L, D] | [B, L, D] (FluxPosEmbed, interleaved pairs); key_lengths
        # int64 [B] or None; scale: the softmax scale (the public wrapper resolves the 1/sqrt(D) default).
        # Triton is its CUDA implementation (see jit_kernels/triton/attention.py for why).
        OpDef("anchor_attention", "attention",
              "(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor? key_lengths, float scale, bool validate=True) -> Tensor",
              _fake_anchor_attention, cuda_via_triton=True),
    )
}

# name -> schema of every op (a view of the table).
SCHEMAS: dict[str, str] = {name: op.schema for name, op in OPS.items()}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _op in OPS.values():
    _lib.define(_op.name + _op.schema, tags=(torch.Tag.pt2_compliant_tag,))
    torch.library.register_fake(_op.qualname, _op.fake)


def _version_bump_kernel(op: OpDef) -> Callable:
    """``ADInplaceOrView`` kernel of an op that writes arguments in place: bump their version counters,
    then redispatch below ``ADInplaceOrView`` to the backend kernel (C++, or the Triton launcher the
    CUDA key routes to). What ``torch.library.custom_op`` registers for its mutable ops (so the Triton
    twins already bump); the ops defined here need it too, or their kernels' writes stay invisible to
    autograd (a tensor saved for backward and then overwritten would go unnoticed)."""
    overload = getattr(getattr(torch.ops, NAMESPACE), op.name).default
    written = [(i, a.name) for i, a in enumerate(overload._schema.arguments)
               if a.alias_info is not None and a.alias_info.is_write]
    below = torch._C._after_ADInplaceOrView_keyset

    def bump_version(keyset, *args, **kwargs):
        for i, name in written:
            torch.autograd.graph.increment_version(args[i] if i < len(args) else kwargs[name])
        return overload.redispatch(keyset & below, *args, **kwargs)

    bump_version.__name__ = f"{op.name}_bump_version"
    return bump_version


for _op in OPS.values():
    if _op.mutates:
        _lib.impl(_op.name, _version_bump_kernel(_op), "ADInplaceOrView", with_keyset=True)
