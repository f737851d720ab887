"""Per-call cost of the public ops: time on small tensors, Python calls, guard lines vs kernel lines.

    python -m benchmarks.bench_call_overhead                  # this checkout
    python -m benchmarks.bench_call_overhead --base 982d6f7   # also count the lines of another revision

Three measurements, written to benchmarks/results/call_overhead_cpu.{json,md} with the command,
machine, versions and git sha:

1. Time: the public ``gather_tokens`` (``validate=True``, and the trusted ``validate=False``) against
   ``torch.index_select`` on a [1, 64, 8] tensor and 16 indices, and ``lift_euler_`` on a small
   grid, and the kernel called directly (the floor a public call can reach); interleaved rounds
   (each implementation once per round), medians of the per-round ratios with their spread.
2. Python calls per public call: ``sys.setprofile`` counts the ``call`` events (Python functions
   entered) and ``c_call`` events (builtins) of one call, after a warm-up call.
3. Guard lines vs kernel lines: non-blank, non-comment lines of the guard files (the Python checks,
   ``csrc/checks.h``, ``csrc/cuda/checks.*``, the Triton guard in ``triton/__init__.py``) and of the
   kernel files (``csrc/cpu/*.cpp``, ``csrc/cuda/*.cu`` but checks.cu, the Triton family modules),
   read from git (this revision and ``--base``).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

import torch

import jit_kernels as jk
from benchmarks.bench_ops import time_interleaved
from benchmarks.env import ROOT, command_line, environment, write_results

GUARD_FILES = ["jit_kernels/_checks.py", "jit_kernels/_metadata.py", "jit_kernels/_values.py", "csrc/checks.h",
               "csrc/cuda/checks.cuh", "csrc/cuda/checks.cu", "jit_kernels/triton/__init__.py"]
FAMILIES = ("tokens", "lift", "importance", "microflow", "attention")
KERNEL_FILES = ([f"csrc/cpu/{f}.cpp" for f in FAMILIES] + ["csrc/cuda/tokens.cu", "csrc/cuda/lift.cu"]
                + [f"jit_kernels/triton/{f}.py" for f in FAMILIES])


def _code_lines(text: str, path: str) -> int:
    comment = "#" if path.endswith(".py") else "//"
    n, in_doc = 0, False
    for line in text.splitlines():
        s = line.strip()
        if path.endswith(".py") and (s.startswith('"""') or s.startswith("'''")):
            quotes = s[:3]
            if not (len(s) > 3 and s.endswith(quotes)):  # a docstring that opens (or closes) here
                in_doc = not in_doc
            continue
        if in_doc or not s or s.startswith(comment):
            continue
        n += 1
    return n


def line_counts(rev: str) -> dict:
    def count(paths):
        total = 0
        for p in paths:
            out = subprocess.run(["git", "show", f"{rev}:{p}"], cwd=ROOT, capture_output=True, text=True)
            total += _code_lines(out.stdout, p) if out.returncode == 0 else 0
        return total

    g, k = count(GUARD_FILES), count(KERNEL_FILES)
    return {"rev": rev, "guard_lines": g, "kernel_lines": k, "ratio": round(g / k, 3)}


def python_calls(fn) -> dict:
    fn()  # warm-up: caches, lazy imports
    counts = {"call": 0, "c_call": 0}

    def prof(frame, event, arg):
        if event in counts:
            counts[event] += 1

    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return {"python_calls": counts["call"], "builtin_calls": counts["c_call"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=41)
    p.add_argument("--inner", type=int, default=200)
    p.add_argument("--base", default=None, help="another git revision whose guard / kernel lines to count")
    p.add_argument("--out", default=str(ROOT) + "/benchmarks/results/call_overhead_cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    x = torch.randn(1, 64, 8)
    idx = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:16]
    h = w = 8
    anchors = idx.sort().values
    near = jk.nearest_anchor_map(anchors, h, w)
    vals = torch.randn(1, 16, 8)
    y = torch.randn(1, 64, 8)
    raw = torch.ops.jit_kernels.gather_tokens.default  # a custom op's dispatch: the floor of any public call
    calls = {
        "torch.index_select": lambda: torch.index_select(x, 1, idx),
        "torch.ops.jit_kernels.gather_tokens (the kernel alone)": lambda: raw(x, idx, True),
        "gather_tokens": lambda: jk.gather_tokens(x, idx),
        "gather_tokens(validate=False)": lambda: jk.gather_tokens(x, idx, validate=False),
        "lift_euler_": lambda: jk.lift_euler_(y, vals, anchors, h, w, 1e-9, nearest=near),
        "lift_euler_(validate=False)": lambda: jk.lift_euler_(y, vals, anchors, h, w, 1e-9, nearest=near,
                                                              validate=False),
    }
    for name in list(calls):  # a revision without the trusted path (validate=) is measured without it
        try:
            calls[name]()
        except TypeError:
            del calls[name]
    t = time_interleaved(calls, "cpu", args.rounds, args.inner, samples=True)
    base = t["torch.index_select"]
    rows = []
    for name, fn in calls.items():
        ratio = sorted(a / b for a, b in zip(t[name], base))  # paired by round: the machine's swings cancel
        row = {"call": name, "us": round(statistics.median(t[name]) * 1e6, 2),
               "x_index_select": round(statistics.median(ratio), 2),
               "x_p10_p90": [round(ratio[len(ratio) // 10], 2), round(ratio[(9 * len(ratio)) // 10], 2)]}
        row.update(python_calls(fn))
        rows.append(row)
        print(row, flush=True)
    lines = [line_counts("HEAD")] + ([line_counts(args.base)] if args.base else [])
    for r in lines:
        print(r, flush=True)
    env = environment()
    env.update(command=command_line("benchmarks.bench_call_overhead", argv if argv is not None else sys.argv[1:]),
               torch_threads=1, shapes="x [1, 64, 8], 16 indices; lift on an 8 x 8 grid, 16 anchors, C = 8",
               lines=lines)
    write_results(args.out, "Per-call overhead of the public ops (CPU)", env, rows,
                  ["call", "us", "x_index_select", "x_p10_p90", "python_calls", "builtin_calls"],
                  "us: median time per call over interleaved rounds; x_index_select: median over rounds of the "
                  "round's time / torch.index_select's in the same round (x_p10_p90: 10th and 90th percentiles); "
                  "python_calls / builtin_calls: sys.setprofile call / c_call events of one call. "
                  "Guard vs kernel lines: env.lines.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
