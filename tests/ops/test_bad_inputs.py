"""A corpus of bad inputs for every public op on every CPU backend (``reference``, ``cpp``, ``triton``).

Each bad case names the exception type the call must raise (``TypeError`` for types,
``ValueError`` for shapes, values, overlap and devices, ``IndexError`` for index values out of
range); the call must raise it before any work, leaving every input as it was (compared with
clones taken before the call). Each valid edge case (empty batch, anchors, channels; strided
in-place targets) must agree with the reference backend. Views of one buffer whose address
ranges intersect are refused even when their elements interleave without touching (ATen's rule).

The corpus runs in one subprocess per backend (this file is also a script), so a case that
kills the process (a crash) is recorded as such, and the run resumes after it. Every case is
its own test (``test_case[backend-op: name]``), and ``test_summary[backend]`` prints the counts
of crashes, silent wrong answers, mutations, accepted invalid inputs and wrong exception types,
all of which must be 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MARK = "@@corpus "

# ---------------------------------------------------------------- default arguments of each op

H, W = 5, 6
N = H * W
B, C = 2, 3
ANCHORS = [0, 7, 13, 22]
NEW = [1, 2, 3]


def _tok(b, n, c, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, c, generator=g) + 2.0).to(dtype)


def _near(anchor_idx, h=H, w=W):
    from jit_kernels.reference import nearest_anchor_map_ref

    return nearest_anchor_map_ref(anchor_idx, h, w)


def _defaults(op: str) -> dict:
    a = torch.tensor(ANCHORS)
    if op == "gather_tokens":
        return dict(x=_tok(B, N, C), idx=torch.tensor([1, 4, 9]))
    if op in ("scatter_tokens", "scatter_tokens_"):
        return dict(base=_tok(B, N, C), idx=torch.tensor([1, 4, 9]), src=_tok(B, 3, C, seed=1))
    if op == "nearest_anchor_map":
        return dict(anchor_idx=a, height=H, width=W)
    if op == "lift_field":
        return dict(values=_tok(B, 4, C), anchor_idx=a, height=H, width=W)
    if op == "lift_euler_":
        return dict(y=_tok(B, N, C, seed=2), values=_tok(B, 4, C), anchor_idx=a, height=H, width=W, dt=0.1)
    if op == "token_importance":
        return dict(field=_tok(B, N, C), height=H, width=W)
    if op == "select_new_tokens":
        return dict(importance=torch.rand(B, N, generator=torch.Generator().manual_seed(3)), active_idx=a, count=5)
    if op in ("microflow_update", "microflow_update_"):
        return dict(y=_tok(B, N, C), new_idx=torch.tensor(NEW), target=_tok(B, 3, C, seed=4), mode="blend",
                    weight=0.5)
    if op == "microflow_target":
        return dict(y_prev=_tok(B, N, C), v_prev=_tok(B, N, C, seed=5), anchor_idx=a, new_idx=torch.tensor(NEW),
                    eps=_tok(B, 3, C, seed=6), sigma_prev=0.8, sigma=0.5, height=H, width=W)
    if op == "anchor_attention":
        g = torch.Generator().manual_seed(7)
        q, k, v = (torch.randn(B, 5, 2, 4, generator=g) for _ in range(3))
        return dict(q=q, k=k, v=v, cos=torch.randn(5, 4, generator=g), sin=torch.randn(5, 4, generator=g))
    if op == "lift_weights":
        return dict(num_anchors=4, num_tokens=N)
    if op == "gaussian_weights":
        return dict(sigma=1.0, kernel_size=7)
    if op == "blur_params":
        return dict(num_anchors=4, num_tokens=N)
    raise KeyError(op)


# Ops that take no backend (their checks are backend-independent): run once, in the reference process.
NO_BACKEND = ("lift_weights", "gaussian_weights", "blur_params")

# Positional parameters of each op, in order (the rest are keywords).
_POSITIONAL = {
    "gather_tokens": ("x", "idx"),
    "scatter_tokens": ("base", "idx", "src"),
    "scatter_tokens_": ("base", "idx", "src"),
    "nearest_anchor_map": ("anchor_idx", "height", "width"),
    "lift_field": ("values", "anchor_idx", "height", "width"),
    "lift_euler_": ("y", "values", "anchor_idx", "height", "width", "dt"),
    "token_importance": ("field", "height", "width"),
    "select_new_tokens": ("importance", "active_idx", "count"),
    "microflow_update": ("y", "new_idx", "target", "mode", "weight"),
    "microflow_update_": ("y", "new_idx", "target", "mode", "weight"),
    "microflow_target": ("y_prev", "v_prev", "anchor_idx", "new_idx", "eps", "sigma_prev", "sigma", "height", "width"),
    "anchor_attention": ("q", "k", "v", "cos", "sin"),
    "lift_weights": ("num_anchors", "num_tokens"),
    "gaussian_weights": ("sigma", "kernel_size"),
    "blur_params": ("num_anchors", "num_tokens"),
}


def _call(op: str, args: dict, backend: str | None):
    import jit_kernels as jk

    fn = getattr(jk, op)
    pos = [args[k] for k in _POSITIONAL[op]]
    kw = {k: v for k, v in args.items() if k not in _POSITIONAL[op]}
    if op not in NO_BACKEND:
        kw["backend"] = backend
    return fn(*pos, **kw)


# ---------------------------------------------------------------- the cases

# An override is (argument name, value or function of the arguments built so far).


@dataclass
class Case:
    op: str
    name: str
    expect: type | None  # the exception type; None: a valid edge case, compared with the reference
    over: list = field(default_factory=list)
    compare: str = "exact"  # valid cases: "exact" (torch.equal) or "close" (float tolerance)
    lead: bool = False  # expected behaviour of the value-validation rework (not this branch's items)

    @property
    def id(self) -> str:
        return f"{self.op}: {self.name}"


def _build(case: Case) -> dict:
    args = _defaults(case.op)
    for k, v in case.over:
        args[k] = v(args) if callable(v) and not isinstance(v, type) else v
    return args


def _meta(name):
    return lambda a: a[name].to("meta")


def _expanded(name):
    return lambda a: a[name][:1].expand(a[name].shape[0], -1, -1)


def _as_list(name):
    return lambda a: a[name].tolist()


def _idx(*v):
    return lambda a: torch.tensor(list(v))


I64 = torch.int64
CASES: list[Case] = []


def bad(op, name, expect, *over, lead=False):
    CASES.append(Case(op, name, expect, list(over), lead=lead))


def valid(op, name, *over, compare="exact"):
    CASES.append(Case(op, name, None, list(over), compare=compare))


# gather_tokens
bad("gather_tokens", "x list", TypeError, ("x", _as_list("x")))
bad("gather_tokens", "idx list", TypeError, ("idx", _as_list("idx")))
bad("gather_tokens", "idx int32", TypeError, ("idx", lambda a: a["idx"].int()))
bad("gather_tokens", "x float64", TypeError, ("x", lambda a: a["x"].double()))
bad("gather_tokens", "x int", TypeError, ("x", lambda a: a["x"].long()))
bad("gather_tokens", "x rank 2", ValueError, ("x", lambda a: a["x"][0]))
bad("gather_tokens", "idx rank 3", ValueError, ("idx", lambda a: a["idx"].view(1, 1, 3)))
bad("gather_tokens", "idx batch 3", ValueError, ("idx", lambda a: a["idx"].expand(3, 3)))
bad("gather_tokens", "idx out of range", IndexError, ("idx", _idx(0, N)))
bad("gather_tokens", "idx negative", IndexError, ("idx", _idx(-1, 2)))
bad("gather_tokens", "idx on meta", ValueError, ("idx", _meta("idx")))
bad("gather_tokens", "x on meta", ValueError, ("x", _meta("x")))
valid("gather_tokens", "empty batch", ("x", lambda a: a["x"][:0]))
valid("gather_tokens", "no indices", ("idx", lambda a: a["idx"][:0]))
valid("gather_tokens", "no channels", ("x", lambda a: a["x"][..., :0]))
valid("gather_tokens", "no tokens, no indices", ("x", lambda a: a["x"][:, :0]), ("idx", lambda a: a["idx"][:0]))

# scatter_tokens / scatter_tokens_
for _op in ("scatter_tokens", "scatter_tokens_"):
    bad(_op, "src list", TypeError, ("src", _as_list("src")))
    bad(_op, "idx list", TypeError, ("idx", _as_list("idx")))
    bad(_op, "src float64", TypeError, ("src", lambda a: a["src"].double()))
    bad(_op, "src rows", ValueError, ("src", lambda a: a["src"][:, :2]))
    bad(_op, "src channels", ValueError, ("src", lambda a: a["src"][..., :2]))
    bad(_op, "duplicate idx", ValueError, ("idx", _idx(1, 4, 1)))
    bad(_op, "per-sample duplicate idx", ValueError, ("idx", lambda a: torch.tensor([[1, 2, 3], [4, 4, 5]])))
    bad(_op, "idx out of range", IndexError, ("idx", _idx(1, 4, N)))
    bad(_op, "src on meta", ValueError, ("src", _meta("src")))
    bad(_op, "idx on meta", ValueError, ("idx", _meta("idx")))
    valid(_op, "empty batch", ("base", lambda a: a["base"][:0]), ("src", lambda a: a["src"][:0]))
    valid(_op, "no indices", ("idx", lambda a: a["idx"][:0]), ("src", lambda a: a["src"][:, :0]))
    valid(_op, "no channels", ("base", lambda a: a["base"][..., :0]), ("src", lambda a: a["src"][..., :0]))
bad("scatter_tokens_", "base expanded", ValueError, ("base", _expanded("base")))
bad("scatter_tokens_", "src a view of base", ValueError, ("src", lambda a: a["base"][:, 10:13]))
# base = the first N rows of a longer buffer, src = rows N-1 .. N+1 of it: one row in common.
bad("scatter_tokens_", "src overlapping base partly", ValueError, ("base", lambda a: _tok(B, N + 3, C, seed=12)[:, :N]),
    ("src", lambda a: a["base"].as_strided((B, 3, C), a["base"].stride(), a["base"].storage_offset() + (N - 1) * C)))
valid("scatter_tokens_", "strided base", ("base", lambda a: a["base"].transpose(0, 1).contiguous().transpose(0, 1)))
# Interleaved views of one buffer that share no element: base = even channels, src = odd channels.
# Refused, as ATen refuses them for its in-place ops: their address ranges intersect.
bad("scatter_tokens_", "interleaved disjoint views", ValueError,
      ("base", lambda a: _tok(B, N, 2 * C, seed=8)[..., 0::2]),
      ("src", lambda a: a["base"].as_strided((B, 3, C), a["base"].stride(), a["base"].storage_offset() + 1)))

# nearest_anchor_map
bad("nearest_anchor_map", "anchor_idx list", TypeError, ("anchor_idx", _as_list("anchor_idx")))
bad("nearest_anchor_map", "anchor_idx float", TypeError, ("anchor_idx", lambda a: a["anchor_idx"].float()))
bad("nearest_anchor_map", "height float", TypeError, ("height", 5.0))
bad("nearest_anchor_map", "height bool", TypeError, ("height", True))
bad("nearest_anchor_map", "height 0", ValueError, ("height", 0))
bad("nearest_anchor_map", "width negative", ValueError, ("width", -3))
bad("nearest_anchor_map", "grid 2^62 + 1 x 4", ValueError, ("height", 2**62 + 1), ("width", 4))
bad("nearest_anchor_map", "height 2^64", ValueError, ("height", 2**64))
bad("nearest_anchor_map", "grid 2^15 x 2^15 + 1", ValueError, ("height", 2**15), ("width", 2**15 + 1))
bad("nearest_anchor_map", "no anchors", ValueError, ("anchor_idx", lambda a: a["anchor_idx"][:0]))
bad("nearest_anchor_map", "duplicate anchors", ValueError, ("anchor_idx", _idx(0, 7, 7)))
bad("nearest_anchor_map", "anchor out of range", IndexError, ("anchor_idx", _idx(0, N)))
bad("nearest_anchor_map", "anchor rank 3", ValueError, ("anchor_idx", lambda a: a["anchor_idx"].view(1, 1, 4)))
valid("nearest_anchor_map", "per sample, empty batch", ("anchor_idx", lambda a: a["anchor_idx"][None][:0]))
valid("nearest_anchor_map", "per sample", ("anchor_idx", lambda a: torch.tensor([ANCHORS, [29, 3, 11, 5]])))
valid("nearest_anchor_map", "1 x 50000 grid (distances beyond int32)", ("anchor_idx", _idx(0, 49999, 20000, 7)),
      ("height", 1), ("width", 50000))

# lift_field / lift_euler_ / microflow_target share the lift's arguments
_LIFT = ("lift_field", "lift_euler_", "microflow_target")


def _lift_bad(op, name, expect, *over, lead=False):
    bad(op, name, expect, *over, lead=lead)


for _op in _LIFT:
    _lift_bad(_op, "anchor_idx list", TypeError, ("anchor_idx", _as_list("anchor_idx")))
    _lift_bad(_op, "nearest list", TypeError, ("nearest", lambda a: _near(a["anchor_idx"]).tolist()))
    _lift_bad(_op, "nearest int32", TypeError, ("nearest", lambda a: _near(a["anchor_idx"]).int()))
    _lift_bad(_op, "height str", TypeError, ("height", "5"))
    _lift_bad(_op, "no anchors", ValueError, ("anchor_idx", lambda a: a["anchor_idx"][:0]),
              *((("values", lambda a: a["values"][:, :0]),) if _op != "microflow_target" else ()))
    _lift_bad(_op, "anchor out of range", IndexError, ("anchor_idx", _idx(0, 7, 13, N)))
    _lift_bad(_op, "anchor out of range, nearest given", IndexError, ("nearest", lambda a: _near(a["anchor_idx"])),
              ("anchor_idx", _idx(0, 7, 13, N)))
    _lift_bad(_op, "duplicate anchors", ValueError, ("anchor_idx", _idx(0, 7, 7, 22)))
    _lift_bad(_op, "nearest out of range", IndexError, ("nearest", lambda a: torch.full((N,), 4)))
    _lift_bad(_op, "nearest size", ValueError, ("nearest", lambda a: _near(a["anchor_idx"])[:-1]))
    _lift_bad(_op, "nearest per sample with shared anchors", ValueError,
              ("nearest", lambda a: _near(a["anchor_idx"]).expand(B, -1)))
    _lift_bad(_op, "nearest on meta", ValueError, ("nearest", lambda a: _near(a["anchor_idx"]).to("meta")))
    _lift_bad(_op, "anchor_idx on meta", ValueError, ("anchor_idx", _meta("anchor_idx")))
    _lift_bad(_op, "grid 2^40 x 2^40", ValueError, ("height", 2**40), ("width", 2**40))
    _lift_bad(_op, "height 2^64", ValueError, ("height", 2**64))
    if _op != "lift_field":  # lift_field has no N of its own: any grid holding the anchors is valid
        _lift_bad(_op, "grid mismatch", ValueError, ("height", 6))
    sig = "blur_sigma" if _op == "microflow_target" else "sigma"
    _lift_bad(_op, "blur_scale inf", ValueError, ("blur_scale", float("inf")))
    _lift_bad(_op, "blur_scale nan", ValueError, ("blur_scale", float("nan")))
    _lift_bad(_op, "blur_scale 0", ValueError, ("blur_scale", 0.0))
    _lift_bad(_op, "blur_scale str", TypeError, ("blur_scale", "0.4"))
    _lift_bad(_op, "sigma 1e9", ValueError, (sig, 1e9))
    _lift_bad(_op, "sigma nan", ValueError, (sig, float("nan")))
    _lift_bad(_op, "sigma negative", ValueError, (sig, -1.0))
    _lift_bad(_op, "kernel_size 2^40 + 1", ValueError, ("kernel_size", 2**40 + 1))
    _lift_bad(_op, "kernel_size even", ValueError, ("kernel_size", 4))
    _lift_bad(_op, "kernel_size float", TypeError, ("kernel_size", 3.0))
    # The value-validation rework (not this branch): a nearest map must match its anchors.
    _lift_bad(_op, "duplicate anchors with nearest given", ValueError, ("anchor_idx", _idx(0, 7, 7, 22)),
              ("nearest", lambda a: _near(torch.tensor(ANCHORS))), lead=True)
    _lift_bad(_op, "nearest in range but inconsistent", ValueError,
              ("nearest", lambda a: _near(a["anchor_idx"]).roll(1)), lead=True)

for _op in ("lift_field", "lift_euler_"):
    bad(_op, "values list", TypeError, ("values", _as_list("values")))
    bad(_op, "values float64", TypeError, ("values", lambda a: a["values"].double()))
    bad(_op, "values rows", ValueError, ("values", lambda a: a["values"][:, :3]))
    bad(_op, "values rank 2", ValueError, ("values", lambda a: a["values"][0]))
    bad(_op, "per-sample anchors, wrong batch", ValueError,
        ("anchor_idx", lambda a: torch.tensor([ANCHORS] * 3)))
    valid(_op, "empty batch", ("values", lambda a: a["values"][:0]),
          *((("y", lambda a: a["y"][:0]),) if _op == "lift_euler_" else ()), compare="close")
    valid(_op, "no channels", ("values", lambda a: a["values"][..., :0]),
          *((("y", lambda a: a["y"][..., :0]),) if _op == "lift_euler_" else ()), compare="close")
    valid(_op, "per-sample anchors, empty batch", ("values", lambda a: a["values"][:0]),
          ("anchor_idx", lambda a: a["anchor_idx"][None][:0]),
          *((("y", lambda a: a["y"][:0]),) if _op == "lift_euler_" else ()), compare="close")
bad("lift_euler_", "y list", TypeError, ("y", _as_list("y")))
bad("lift_euler_", "y shape", ValueError, ("y", lambda a: a["y"][:, :-1]))
bad("lift_euler_", "y channels", ValueError, ("y", lambda a: a["y"][..., :2]))
bad("lift_euler_", "y on meta", ValueError, ("y", _meta("y")))
bad("lift_euler_", "values on meta", ValueError, ("values", _meta("values")))
bad("lift_euler_", "dt nan", ValueError, ("dt", float("nan")))
bad("lift_euler_", "dt inf", ValueError, ("dt", float("inf")))
bad("lift_euler_", "dt str", TypeError, ("dt", "0.1"))
bad("lift_euler_", "y expanded", ValueError, ("y", _expanded("y")))
bad("lift_euler_", "values a view of y", ValueError, ("values", lambda a: a["y"][:, 10:14]))
bad("lift_euler_", "values overlapping y partly", ValueError, ("y", lambda a: _tok(B, N + 4, C, seed=13)[:, :N]),
    ("values", lambda a: a["y"].as_strided((B, 4, C), a["y"].stride(), a["y"].storage_offset() + (N - 2) * C)))
bad("lift_euler_", "nearest sharing memory with y", ValueError,
    ("nearest", lambda a: a["y"].view(torch.int32).view(-1)[: 2 * N].view(torch.int64)))
valid("lift_euler_", "strided y (batch-major)", ("y", lambda a: a["y"].transpose(0, 1).contiguous().transpose(0, 1)),
      compare="close")
valid("lift_euler_", "strided y (channel stride 2)", ("y", lambda a: _tok(B, N, 2 * C, seed=9)[..., ::2]),
      compare="close")
bad("lift_euler_", "y interleaved with values in one buffer", ValueError,
    ("y", lambda a: _tok(B, N, 2 * C, seed=10)[..., 0::2]),
    ("values", lambda a: a["y"].as_strided((B, 4, C), a["y"].stride(), a["y"].storage_offset() + 1)))

# token_importance
bad("token_importance", "field list", TypeError, ("field", _as_list("field")))
bad("token_importance", "field float64", TypeError, ("field", lambda a: a["field"].double()))
bad("token_importance", "field rank 2", ValueError, ("field", lambda a: a["field"][0]))
bad("token_importance", "grid mismatch", ValueError, ("width", 5))
bad("token_importance", "width float", TypeError, ("width", 6.0))
bad("token_importance", "no channels", ValueError, ("field", lambda a: a["field"][..., :0]))
bad("token_importance", "no channels, 1 x 48 grid", ValueError, ("field", lambda a: torch.randn(1, 48, 0)),
    ("height", 1), ("width", 48))
bad("token_importance", "grid 2^40 x 2^40", ValueError, ("height", 2**40), ("width", 2**40))
valid("token_importance", "empty batch", ("field", lambda a: a["field"][:0]), compare="close")

# select_new_tokens
bad("select_new_tokens", "importance list", TypeError, ("importance", _as_list("importance")))
bad("select_new_tokens", "active_idx list", TypeError, ("active_idx", _as_list("active_idx")))
bad("select_new_tokens", "importance int", ValueError, ("importance", lambda a: a["importance"].long()))
bad("select_new_tokens", "importance rank 3", ValueError, ("importance", lambda a: a["importance"][None]))
bad("select_new_tokens", "count too large", ValueError, ("count", N - 3))
bad("select_new_tokens", "count negative", ValueError, ("count", -1))
bad("select_new_tokens", "count float", TypeError, ("count", 2.0))
bad("select_new_tokens", "duplicate active", ValueError, ("active_idx", _idx(1, 1)))
bad("select_new_tokens", "active out of range", IndexError, ("active_idx", _idx(0, N)))
bad("select_new_tokens", "active on meta", ValueError, ("active_idx", _meta("active_idx")))
valid("select_new_tokens", "empty batch", ("importance", lambda a: a["importance"][:0]))
valid("select_new_tokens", "empty batch, per-sample active",
      ("importance", lambda a: a["importance"][:0]), ("active_idx", lambda a: a["active_idx"][None][:0]))
valid("select_new_tokens", "no active tokens", ("active_idx", lambda a: a["active_idx"][:0]))
valid("select_new_tokens", "count 0", ("count", 0))

# microflow_update / microflow_update_
for _op in ("microflow_update", "microflow_update_"):
    bad(_op, "y list", TypeError, ("y", _as_list("y")))
    bad(_op, "new_idx list", TypeError, ("new_idx", _as_list("new_idx")))
    bad(_op, "target float64", TypeError, ("target", lambda a: a["target"].double()))
    bad(_op, "target rows", ValueError, ("target", lambda a: a["target"][:, :2]))
    bad(_op, "mode unknown", ValueError, ("mode", "teleport"))
    bad(_op, "weight 0", ValueError, ("weight", 0.0))
    bad(_op, "weight nan", ValueError, ("weight", float("nan")))
    bad(_op, "weight str", TypeError, ("weight", "0.5"))
    bad(_op, "assign with a weight", ValueError, ("mode", "assign"), ("weight", 0.5))
    bad(_op, "duplicate new_idx", ValueError, ("new_idx", _idx(2, 2, 3)))
    bad(_op, "new_idx out of range", IndexError, ("new_idx", _idx(0, 1, N)))
    bad(_op, "target on meta", ValueError, ("target", _meta("target")))
    bad(_op, "new_idx on meta", ValueError, ("new_idx", _meta("new_idx")))
    valid(_op, "empty batch", ("y", lambda a: a["y"][:0]), ("target", lambda a: a["target"][:0]), compare="close")
    valid(_op, "no new tokens", ("new_idx", lambda a: a["new_idx"][:0]), ("target", lambda a: a["target"][:, :0]),
          compare="close")
    valid(_op, "no channels", ("y", lambda a: a["y"][..., :0]), ("target", lambda a: a["target"][..., :0]),
          compare="close")
    valid(_op, "strided y", ("y", lambda a: a["y"].transpose(0, 1).contiguous().transpose(0, 1)), compare="close")
    valid(_op, "strided y, assign", ("y", lambda a: _tok(B, N, 2 * C, seed=11)[..., ::2]), ("mode", "assign"),
          ("weight", None))
bad("microflow_update_", "y expanded", ValueError, ("y", _expanded("y")))
bad("microflow_update_", "target a view of y", ValueError, ("target", lambda a: a["y"][:, 5:8]))
bad("microflow_update_", "new_idx sharing memory with y", ValueError,
    ("new_idx", lambda a: a["y"].view(-1)[:6].view(torch.int64)))
valid("microflow_update", "y expanded (out of place: a copy is written)", ("y", _expanded("y")), compare="close")

# microflow_target
bad("microflow_target", "y_prev list", TypeError, ("y_prev", _as_list("y_prev")))
bad("microflow_target", "new_idx list", TypeError, ("new_idx", _as_list("new_idx")))
bad("microflow_target", "v_prev shape", ValueError, ("v_prev", lambda a: a["v_prev"][:1]))
bad("microflow_target", "eps rows", ValueError, ("eps", lambda a: a["eps"][:, :2]))
bad("microflow_target", "sigma above sigma_prev", ValueError, ("sigma", 0.9))
bad("microflow_target", "sigma_prev nan", ValueError, ("sigma_prev", float("nan")))
bad("microflow_target", "duplicate new_idx", ValueError, ("new_idx", _idx(1, 1, 2)))
bad("microflow_target", "new_idx out of range", IndexError, ("new_idx", _idx(1, 2, N)))
bad("microflow_target", "eps on meta", ValueError, ("eps", _meta("eps")))
bad("microflow_target", "v_prev on meta", ValueError, ("v_prev", _meta("v_prev")))
valid("microflow_target", "empty batch", ("y_prev", lambda a: a["y_prev"][:0]), ("v_prev", lambda a: a["v_prev"][:0]),
      ("eps", lambda a: a["eps"][:0]), compare="close")
valid("microflow_target", "no new tokens", ("new_idx", lambda a: a["new_idx"][:0]), ("eps", lambda a: a["eps"][:, :0]),
      compare="close")
valid("microflow_target", "no channels", ("y_prev", lambda a: a["y_prev"][..., :0]),
      ("v_prev", lambda a: a["v_prev"][..., :0]), ("eps", lambda a: a["eps"][..., :0]), compare="close")

# anchor_attention
bad("anchor_attention", "q list", TypeError, ("q", _as_list("q")))
bad("anchor_attention", "key_lengths list", TypeError, ("key_lengths", [5, 5]))
bad("anchor_attention", "q float64", TypeError, ("q", lambda a: a["q"].double()))
bad("anchor_attention", "k dtype differs", TypeError, ("k", lambda a: a["k"].half()))
bad("anchor_attention", "v shape", ValueError, ("v", lambda a: a["v"][:, :4]))
bad("anchor_attention", "odd head dim", ValueError, *[(n, lambda a, n=n: a[n][..., :3]) for n in "qkv"],
    ("cos", lambda a: a["cos"][:, :3]), ("sin", lambda a: a["sin"][:, :3]))
bad("anchor_attention", "cos shape", ValueError, ("cos", lambda a: a["cos"][:4]))
bad("anchor_attention", "scale 0", ValueError, ("scale", 0.0))
bad("anchor_attention", "scale nan", ValueError, ("scale", float("nan")))
bad("anchor_attention", "key_lengths float", TypeError, ("key_lengths", torch.tensor([5.0, 5.0])))
bad("anchor_attention", "key_lengths shape", ValueError, ("key_lengths", torch.tensor([5])))
bad("anchor_attention", "key_lengths above L", IndexError, ("key_lengths", torch.tensor([5, 6])))
bad("anchor_attention", "key_lengths 0", IndexError, ("key_lengths", torch.tensor([0, 5])))
bad("anchor_attention", "k on meta", ValueError, ("k", _meta("k")))
bad("anchor_attention", "key_lengths on meta", ValueError, ("key_lengths", torch.tensor([5, 5], device="meta")))
for _name, _dim in (("empty batch", 0), ("no tokens", 1), ("no heads", 2)):
    _sl = [slice(None)] * 4
    _sl[_dim] = slice(0, 0)
    _sl = tuple(_sl)
    _over = [(n, lambda a, n=n, s=_sl: a[n][s]) for n in "qkv"]
    if _dim == 1:
        _over += [("cos", lambda a: a["cos"][:0]), ("sin", lambda a: a["sin"][:0])]
    valid("anchor_attention", _name, *_over, compare="close")
valid("anchor_attention", "empty batch with key_lengths", *[(n, lambda a, n=n: a[n][:0]) for n in "qkv"],
      ("key_lengths", torch.zeros(0, dtype=I64)), compare="close")

# blur helpers (backend-independent)
bad("lift_weights", "blur_scale inf", ValueError, ("blur_scale", float("inf")))
bad("lift_weights", "blur_scale nan, M == N", ValueError, ("num_anchors", N), ("blur_scale", float("nan")))
bad("lift_weights", "sigma 1e9", ValueError, ("sigma", 1e9))
bad("lift_weights", "sigma inf", ValueError, ("sigma", float("inf")))
bad("lift_weights", "kernel_size 2^40 + 1", ValueError, ("kernel_size", 2**40 + 1))
bad("lift_weights", "kernel_size bool", TypeError, ("kernel_size", True))
bad("gaussian_weights", "kernel_size 2^40 + 1", ValueError, ("kernel_size", 2**40 + 1))
bad("gaussian_weights", "kernel_size float", TypeError, ("kernel_size", 7.0))
bad("gaussian_weights", "sigma nan", ValueError, ("sigma", float("nan")))
bad("gaussian_weights", "sigma inf", ValueError, ("sigma", float("inf")))
bad("blur_params", "scale inf", ValueError, ("scale", float("inf")))
bad("blur_params", "scale nan, M == N", ValueError, ("num_anchors", N), ("scale", float("nan")))
valid("lift_weights", "sigma 1e9 with an explicit kernel_size", ("sigma", 1e9), ("kernel_size", 5))
valid("gaussian_weights", "sigma 1e-200 (2 sigma^2 underflows)", ("sigma", 1e-200))


def _cases_for(backend: str) -> list[Case]:
    return [c for c in CASES if backend == "reference" or c.op not in NO_BACKEND]


# ---------------------------------------------------------------- the runner (in a subprocess)


def _snapshot(args: dict) -> dict:
    return {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}


def _unchanged(args: dict, snap: dict, allow=()) -> list[str]:
    changed = []
    for k, before in snap.items():
        if k in allow:
            continue
        if not torch.equal(args[k], before):
            changed.append(k)
    return changed


_TARGET = {"scatter_tokens_": "base", "lift_euler_": "y", "microflow_update_": "y"}


def _same(got, want, compare: str) -> bool:
    if isinstance(got, tuple):
        return got == want
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    if compare == "exact" or got.numel() == 0:
        return torch.equal(got, want)
    return torch.allclose(got.float(), want.float(), rtol=1e-5, atol=1e-5)


def _run_one(case: Case, backend: str) -> dict:
    try:
        args = _build(case)
    except Exception as exc:  # noqa: BLE001 - a broken case, not a finding
        return dict(outcome="build_error", detail=f"{type(exc).__name__}: {exc}")
    snap = _snapshot(args)
    if case.expect is not None:
        try:
            _call(case.op, args, backend)
        except Exception as exc:  # noqa: BLE001 - the type is the point
            changed = _unchanged(args, snap)
            if changed:
                return dict(outcome="mutated", detail=f"{type(exc).__name__}; changed {changed}")
            if isinstance(exc, case.expect):
                return dict(outcome="ok", detail=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            return dict(outcome="wrong_type", detail=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        changed = _unchanged(args, snap)
        return dict(outcome="accepted", detail=f"no error; changed {changed}" if changed else "no error")
    # A valid edge case: the backend against the reference, on separate copies of the inputs.
    ref_args = _build(case)
    target = _TARGET.get(case.op)
    try:
        got = _call(case.op, args, backend)
    except Exception as exc:  # noqa: BLE001
        return dict(outcome="wrong", detail=f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    try:
        want = _call(case.op, ref_args, "reference")
    except Exception as exc:  # noqa: BLE001
        return dict(outcome="wrong", detail=f"the reference raised {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    changed = _unchanged(args, snap, allow=(target,))
    if changed:
        return dict(outcome="mutated", detail=f"changed {changed}")
    if target is not None:
        got, want = args[target], ref_args[target]
    if not _same(got, want, case.compare):
        return dict(outcome="wrong", detail="result differs from the reference")
    return dict(outcome="ok", detail="")


def _main(backend: str, start: int) -> None:
    import jit_kernels  # noqa: F401  (import errors must surface here, not as a crash of case 0)

    cases = _cases_for(backend)
    for i in range(start, len(cases)):
        print(MARK + json.dumps({"start": i}), flush=True)
        res = _run_one(cases[i], backend)
        print(MARK + json.dumps({"done": i, **res}), flush=True)


CASE_TIMEOUT = 60.0  # seconds one case may take before it counts as a hang
MEMORY_LIMIT = 8 << 30  # address space of the runner: a case asking for terabytes fails fast instead of swapping


def _limit_memory():  # in the child, before exec
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    except (ImportError, ValueError, OSError):
        pass


def run_corpus(backend: str) -> dict[str, dict]:
    """Run every case for ``backend`` in subprocesses; results by case id.

    A case during which the process dies is a ``crash``, one that runs past :data:`CASE_TIMEOUT`
    a ``hang`` (the process is killed); either way a new process resumes after that case.
    """
    import selectors
    import time

    cases = _cases_for(backend)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results: dict[str, dict] = {}
    start = 0
    while start < len(cases):
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), backend, str(start)], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_limit_memory)
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        current, deadline, hung = None, time.monotonic() + 120.0, False  # startup: imports
        while True:
            if not sel.select(timeout=max(deadline - time.monotonic(), 0.0)):
                hung = True
                proc.kill()
                break
            line = proc.stdout.readline()
            if not line:
                break
            if not line.startswith(MARK):
                continue
            msg = json.loads(line[len(MARK):])
            if "start" in msg:
                current, deadline = msg["start"], time.monotonic() + CASE_TIMEOUT
            else:
                results[cases[msg["done"]].id] = {k: v for k, v in msg.items() if k != "done"}
                current = None
        sel.close()
        err = proc.stderr.read()
        proc.wait()
        if current is None:
            if len(results) < len(cases):  # the process failed outside any case
                raise RuntimeError(f"corpus runner for {backend} failed (rc {proc.returncode}):\n{err[-3000:]}")
            break
        if hung:
            results[cases[current].id] = dict(outcome="hang", detail=f"no result within {CASE_TIMEOUT:.0f} s")
        else:
            results[cases[current].id] = dict(outcome="crash", detail=f"process died (rc {proc.returncode}): "
                                                                      f"{err.strip()[-300:]}")
        start = current + 1
    return results


def summarise(cases: list[Case], results: dict[str, dict]) -> dict[str, int]:
    counts = {"cases": len(cases), "crashes": 0, "hangs": 0, "silent wrong answers": 0, "mutations": 0,
              "accepted invalid inputs": 0, "wrong exception types": 0, "broken cases": 0}
    key = {"crash": "crashes", "hang": "hangs", "wrong": "silent wrong answers", "mutated": "mutations",
           "accepted": "accepted invalid inputs", "wrong_type": "wrong exception types",
           "build_error": "broken cases"}
    for c in cases:
        out = results[c.id]["outcome"]
        if out in key:
            counts[key[out]] += 1
    return counts


if __name__ == "__main__":
    _main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    sys.exit(0)


# ---------------------------------------------------------------- the tests

import pytest  # noqa: E402

import jit_kernels as jk  # noqa: E402
from jit_kernels.testing import compiled_backends  # noqa: E402

BACKENDS = ["reference"] + compiled_backends("cpu")
_RESULTS: dict[str, dict] = {}


def _results(backend: str) -> dict:
    if backend not in _RESULTS:
        _RESULTS[backend] = run_corpus(backend)
    return _RESULTS[backend]


_PARAMS = [pytest.param(be, c, id=f"{be}-{c.id}") for be in BACKENDS for c in _cases_for(be)]


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "case"), _PARAMS)
def test_case(backend, case):
    res = _results(backend)[case.id]
    want = f"raise {case.expect.__name__}" if case.expect else "agree with the reference"
    assert res["outcome"] == "ok", f"{case.id} on {backend} must {want}: {res['outcome']} ({res['detail']})"


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_summary(backend):
    cases = _cases_for(backend)
    counts = summarise(cases, _results(backend))
    print(f"\nbad-input corpus on {backend}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    failing = {k: v for k, v in counts.items() if k != "cases" and v}
    assert not failing, (failing, [(c.id, _results(backend)[c.id]) for c in cases
                                   if _results(backend)[c.id]["outcome"] != "ok"])


def test_corpus_covers_every_public_op():
    ops = {c.op for c in CASES}
    public = {name for name in jk.__all__ if callable(getattr(jk, name)) and name not in (
        "BackendUnavailableError", "available_backends", "extension_error", "get_backend", "set_backend",
        "use_backend", "reset_validation_passes", "validate_index", "validation_passes")}
    assert public <= ops, public - ops
    for op in ops - set(NO_BACKEND):
        assert any(c.expect is None for c in CASES if c.op == op), f"{op}: no valid edge case"
