"""Ahead-of-time lowering of every Triton kernel of the package to Hopper (sm_90) code, without a GPU.

    python -m jit_kernels.triton.aot [--arch 90] [--json out.json]

Each launcher is run on representative CPU inputs (FLUX 1024^2: a 64 x 64 grid, C = 64,
1310 anchors, batch 2, fp32 and bf16; and a degenerate 1 x 17 grid with C = 1 and one
anchor, where the JIT turns sizes of 1 into constants) with its kernels swapped for recorders,
so the kernels are compiled with exactly the arguments, block sizes and num_warps the
launchers pass on a GPU. The arguments are specialised as Triton's JIT does (ints equal
to 1 become constants, multiples of 16 and pointers get the divisibility hint), then
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` lowers them to
PTX and a cubin. Registers and spills come from ``ptxas -v`` on the PTX (``n/a`` when no
ptxas is found). Exits non-zero if any kernel fails to lower.

The kernels must be real ``JITFunction``s, so this cannot run under ``TRITON_INTERPRET=1``;
:func:`main` re-executes itself without it, and :func:`compile_all_isolated` does the same
for callers (tests) whose process already imported the kernels in interpreter mode.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

__all__ = ["compile_all", "compile_all_isolated", "main", "find_ptxas", "KERNELS"]

# Every @triton.jit kernel of the package, by module: a new kernel must be added here
# (tests check that this list matches what the modules define).
KERNELS: dict[str, tuple[str, ...]] = {
    "tokens": ("_gather_tokens_fwd_kernel", "_scatter_tokens_fwd_kernel"),
    "lift": ("_nearest_anchor_map_fwd_kernel", "_lift_field_fwd_kernel", "_lift_euler_fwd_kernel"),
    "importance": ("_token_importance_fwd_kernel", "_select_new_tokens_fwd_kernel", "_select_mask_active_kernel"),
    "microflow": ("_microflow_update_fwd_kernel", "_microflow_target_fwd_kernel"),
    "attention": ("_anchor_attention_fwd_kernel", "_rotate_qk_fwd_kernel", "_anchor_attention_v2_fwd_kernel"),
}


def _interpreting() -> bool:
    from jit_kernels._env import triton_interpret

    return triton_interpret()


@dataclass
class Row:
    kernel: str
    case: str
    dtype: str
    num_warps: int
    shared: int | None
    registers: int | None
    spills: int | None
    constexprs: str
    ok: bool
    error: str = ""


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kw)`` records the call instead of launching."""

    def __init__(self, fn, calls: list):
        self.fn = fn
        self.calls = calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.fn, args, kwargs))

        return launch


@contextlib.contextmanager
def _recording(calls: list):
    from importlib import import_module

    saved = []
    for mod_name, names in KERNELS.items():
        mod = import_module(f"jit_kernels.triton.{mod_name}")
        for name in names:
            fn = getattr(mod, name)
            saved.append((mod, name, fn))
            setattr(mod, name, _Recorder(fn, calls))
    try:
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def _record_case(case: str, h: int, w: int, c: int, m: int, r: int, b: int, dtypes) -> list:
    import torch

    from jit_kernels import lift_weights
    from jit_kernels.triton import importance, lift, microflow, tokens

    n = h * w
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(n, generator=g)
    anchors, new = perm[:m].clone(), perm[m:m + r].clone()
    nearest = torch.zeros(n, dtype=torch.int64)  # values are irrelevant: nothing is launched
    wts = lift_weights(m, n)
    out = []
    for dtype in dtypes:
        calls: list = []
        x = torch.zeros(b, n, c, dtype=dtype)
        vals = torch.zeros(b, m, c, dtype=dtype)
        tgt = torch.zeros(b, r, c, dtype=dtype)
        with _recording(calls):
            tokens.launch_gather_tokens(x, anchors)
            tokens.launch_scatter_tokens_(x, anchors, vals)
            if dtype == dtypes[0]:  # index-only kernels: one dtype
                lift.launch_nearest_anchor_map(anchors, h, w)
            lift.launch_lift_field(vals, anchors, nearest, wts, h, w)
            lift.launch_lift_euler_(x, vals, anchors, nearest, wts, h, w, -0.1)
            importance.launch_token_importance(x, h, w)
            importance.launch_select_new_tokens(torch.zeros(b, n, dtype=dtype), anchors, min(512, n - m))
            microflow.launch_microflow_update_(x, new, tgt, 1.0 / 3.0)
            microflow.launch_microflow_update_(x, new, tgt, 1.0)
            microflow.launch_microflow_target(x, x, anchors, nearest, wts, new, tgt, 0.8, 0.6, h, w)
        for fn, args, kwargs in calls:
            # Label a launch by the dtype of its first tensor (the data it streams; int64 for index kernels).
            first = next(a for a in args if isinstance(a, torch.Tensor))
            out.append((case, str(first.dtype).replace("torch.", ""), fn, args, kwargs))
    return out


def _record_nearest_wide() -> list:
    """The nearest map's int64-distance variant (``WIDE``), used on grids such as 1 x 50000."""
    import torch

    from jit_kernels.triton import lift

    calls: list = []
    with _recording(calls):
        lift.launch_nearest_anchor_map(torch.tensor([0, 7, 49999]), 1, 50000)
    return [("wide", "int64", fn, args, kwargs) for fn, args, kwargs in calls]


def _record_lift_v1() -> list:
    """The v1 lift launches (``JIT_KERNELS_LIFT_VARIANT=v1``, kept for A/B timing) at the FLUX shapes, fp32."""
    import torch

    from jit_kernels import lift_weights
    from jit_kernels._env import LIFT_VARIANT
    from jit_kernels.triton import lift, microflow

    h = w = 64
    n, c, m, r = h * w, 64, 1310, 1147
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    anchors, new = perm[:m].clone(), perm[m:m + r].clone()
    nearest, wts = torch.zeros(n, dtype=torch.int64), lift_weights(m, n)
    x, vals = torch.zeros(2, n, c), torch.zeros(2, m, c)
    calls: list = []
    saved = os.environ.get(LIFT_VARIANT)
    os.environ[LIFT_VARIANT] = "v1"
    try:
        with _recording(calls):
            lift.launch_lift_field(vals, anchors, nearest, wts, h, w)
            lift.launch_lift_euler_(x, vals, anchors, nearest, wts, h, w, -0.1)
            microflow.launch_microflow_target(x, x, anchors, nearest, wts, new, torch.zeros(2, r, c), 0.8, 0.6, h, w)
    finally:
        if saved is None:
            del os.environ[LIFT_VARIANT]
        else:
            os.environ[LIFT_VARIANT] = saved
    return [("flux-v1", "float32", fn, args, kwargs) for fn, args, kwargs in calls]


def _record_attention(case: str, b: int, n: int, h: int, d: int, dtypes, lengths: bool) -> list:
    """Launches of ``anchor_attention`` on ``[b, n, h, d]`` inputs (with per-sample key lengths and tables),
    both kernel variants (v2: the rotation kernel, then the attention kernel)."""
    import torch

    from jit_kernels.triton import attention

    out = []
    cs = torch.zeros(b, n, d) if lengths else torch.zeros(n, d)
    lens = torch.full((b,), n, dtype=torch.int64) if lengths else None
    for dtype in dtypes:
        calls: list = []
        x = torch.zeros(b, n, h, d, dtype=dtype)
        with _recording(calls):
            for variant in ("v1", "v2"):  # both kernels ($JIT_KERNELS_ATTN_VARIANT) lower
                attention.anchor_attention_forward(x, x, x, cs, cs, lens, d ** -0.5, variant=variant)
        out += [(case, str(dtype).replace("torch.", ""), fn, args, kwargs) for fn, args, kwargs in calls]
    return out


def _record_launches() -> list[tuple[str, str, object, tuple, dict]]:
    """Run every launcher on representative inputs; (case, dtype label, kernel, args, kwargs) per launch.

    ``flux``: the FLUX 1024^2 shapes (64 x 64 grid, C = 64, 1310 anchors, 1147 new tokens,
    batch 2) in fp32 and bf16. ``edge``: a 1 x 17 grid, C = 1, one anchor, one new token,
    batch 1, where the JIT turns W, C, M, R and the unit strides into constants of 1.
    ``wide``: the nearest map on a 1 x 50000 grid (squared distances beyond int32).
    ``flux-v1``: the lift kernels' v1 variant (``JIT_KERNELS_LIFT_VARIANT=v1``) at the FLUX shapes.
    """
    import torch

    return (_record_case("flux", 64, 64, 64, 1310, 1147, 2, (torch.float32, torch.bfloat16))
            + _record_case("edge", 1, 17, 1, 1, 1, 1, (torch.float32,))
            + _record_nearest_wide()
            + _record_lift_v1()
            # attention (v1 and v2): FLUX (512 text + 1310 anchors, 24 x 128, per-sample lengths), the tiny
            # model (4 x 32), and D = 2 on one token.
            + _record_attention("flux", 2, 512 + 1310, 24, 128, (torch.float32, torch.bfloat16, torch.float16), True)
            # batch 1 of FLUX: v2 picks 64-row tiles there (fewer than 3 waves of 128-row programs)
            + _record_attention("flux-b1", 1, 512 + 1310, 24, 128, (torch.bfloat16,), True)
            + _record_attention("tiny", 1, 4 + 1310, 4, 32, (torch.float32, torch.bfloat16), False)
            + _record_attention("edge", 1, 1, 1, 2, (torch.float32,), False))


_TORCH_TO_TRITON = {
    "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
    "int64": "i64", "int32": "i32", "bool": "i1",
}


def _specialise(fn, args: tuple, kwargs: dict):
    """Signature, constexprs and attrs for ``fn(*args, **kwargs)`` as Triton's JIT would build them."""
    import torch

    names = fn.arg_names
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        v = values[name]
        is_constexpr = i in {p.num for p in fn.params if p.is_constexpr}
        if is_constexpr or isinstance(v, bool):
            signature[name] = "constexpr"
            constexprs[name] = v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + _TORCH_TO_TRITON[str(v.dtype).replace("torch.", "")]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are at least 16-byte aligned
        elif isinstance(v, int):
            if v == 1:  # the JIT turns ints equal to 1 into constants (unit strides)
                signature[name] = "constexpr"
                constexprs[name] = 1
            else:
                signature[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot specialise argument {name}={v!r}")
    return signature, constexprs, attrs


def find_ptxas() -> str | None:
    """ptxas from $PTXAS, the CUDA toolkit, PATH, or Triton's bundled copy."""
    cands = [os.environ.get("PTXAS"), "/usr/local/cuda/bin/ptxas", shutil.which("ptxas")]
    try:
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))
    except Exception:
        pass
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _ptxas_usage(ptx: str, ptxas: str | None) -> tuple[int | None, int | None]:
    """(registers, spill bytes) reported by ``ptxas -v`` for the kernel in ``ptx``."""
    if ptxas is None:
        return None, None
    target = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.M)
    arch = target.group(1) if target else "sm_90"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [ptxas, "-v", f"--gpu-name={arch}", path, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True,
        )
    text = proc.stdout + proc.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return (int(regs.group(1)) if regs else None), (int(spill.group(1)) if spill else None)


def compile_all(arch: int = 90) -> list[Row]:
    """Lower every recorded kernel launch for ``sm_<arch>``; one :class:`Row` per (kernel, dtype, variant)."""
    if _interpreting():
        raise RuntimeError("compile_all needs real JITFunctions: run it without TRITON_INTERPRET "
                           "(or use compile_all_isolated)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    ptxas = find_ptxas()
    rows, seen = [], set()
    for case, label, fn, args, kwargs in _record_launches():
        signature, constexprs, attrs = _specialise(fn, args, kwargs)
        consts = ",".join(f"{k}={v}" for k, v in constexprs.items() if k.isupper())
        key = (fn.__name__, label, tuple(sorted(constexprs.items())))
        if key in seen:
            continue
        seen.add(key)
        num_warps = int(kwargs.get("num_warps", 4))
        opts = {"num_warps": num_warps}
        if "num_stages" in kwargs:  # launchers that choose their pipelining depth
            opts["num_stages"] = int(kwargs["num_stages"])
        try:
            options = backend.parse_options(opts)
            src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
            compiled = triton.compile(src, target=target, options=options.__dict__)
            regs, spills = _ptxas_usage(compiled.asm["ptx"], ptxas)
            rows.append(Row(fn.__name__, case, label, compiled.metadata.num_warps, int(compiled.metadata.shared),
                            regs, spills, consts, True))
        except Exception as exc:  # report every failure, not just the first
            rows.append(Row(fn.__name__, case, label, num_warps, None, None, None, consts, False,
                            f"{type(exc).__name__}: {exc}".splitlines()[0][:300]))
    return rows


def _clean_env() -> dict:
    env = dict(os.environ)
    from jit_kernels._env import TRITON_INTERPRET

    env.pop(TRITON_INTERPRET, None)
    return env


def compile_all_isolated(arch: int = 90, timeout: float = 900) -> tuple[int, list[dict], str]:
    """Run this module in a fresh interpreter without TRITON_INTERPRET: (exit code, rows as dicts, output)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "aot.json")
        proc = subprocess.run(
            [sys.executable, "-m", "jit_kernels.triton.aot", "--arch", str(arch), "--json", path],
            env=_clean_env(), capture_output=True, text=True, timeout=timeout,
        )
        rows = []
        if os.path.exists(path):
            with open(path) as f:
                rows = json.load(f)["kernels"]
    return proc.returncode, rows, proc.stdout + proc.stderr


def _fmt(v) -> str:
    return "n/a" if v is None else str(v)


def _table(rows: list[Row]) -> str:
    head = ("kernel", "case", "dtype", "warps", "shared B", "regs", "spill B", "blocks", "status")
    body = [(r.kernel, r.case, r.dtype, str(r.num_warps), _fmt(r.shared), _fmt(r.registers), _fmt(r.spills),
             r.constexprs, "ok" if r.ok else "FAILED: " + r.error) for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head) - 1)]
    lines = []
    for x in [head, *body]:
        lines.append("  ".join(x[i].ljust(widths[i]) for i in range(len(widths))) + "  " + x[-1])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jit_kernels.triton.aot", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an int (default 90)")
    p.add_argument("--json", help="also write the table as JSON to this path")
    args = p.parse_args(argv)
    if _interpreting():  # the kernels were defined as interpreted functions: start over without it
        cmd = [sys.executable, "-m", "jit_kernels.triton.aot", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.run(cmd, env=_clean_env()).returncode
    import triton

    rows = compile_all(args.arch)
    ptxas = find_ptxas()
    print(f"Triton {triton.__version__} AOT lowering for sm_{args.arch} (ptxas: {ptxas or 'not found'})")
    print(_table(rows))
    failed = [r for r in rows if not r.ok]
    print(f"{len(rows) - len(failed)}/{len(rows)} kernels lowered")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "triton": triton.__version__, "ptxas": ptxas,
                       "kernels": [asdict(r) for r in rows]}, f, indent=1)
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
