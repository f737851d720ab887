"""Microbenchmarks of the jit_kernels ops against plain-PyTorch compositions.

    python -m benchmarks.bench_ops                       # CPU, all sizes, fp32 (+ bf16 with --bf16)
    python -m benchmarks.bench_ops --device cuda --bf16  # GPU: timed with triton.testing.do_bench

Times are medians over interleaved rounds (every implementation of a case runs
once per round, so drift on a shared machine hits all of them alike). Each row
carries the achieved GB/s and its fraction of the copy bandwidth measured in
the same run. Results go to benchmarks/results/ops_<device>.{json,md} with the
command line, machine, versions and git sha.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.cases import SIZES, make_cases
from benchmarks.env import command_line, environment, write_results

RESULTS = Path(__file__).resolve().parent / "results"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: dict, device: str, rounds: int, inner: int, samples: bool = False) -> dict:
    """Median seconds per call of each fn, rounds interleaved across fns (``samples``: the per-round
    seconds per call instead, CPU only, so a caller can pair the rounds of two fns)."""
    if device == "cuda":
        import triton.testing

        return {k: triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median") * 1e-3 for k, f in fns.items()}
    per_round = {k: [] for k in fns}
    for f in fns.values():  # warm-up
        f()
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            per_round[k].append((time.perf_counter() - t0) / inner)
    return per_round if samples else {k: statistics.median(v) for k, v in per_round.items()}


def copy_bandwidth(device: str, rounds: int) -> float:
    """GB/s of a large tensor copy (read + write), the ceiling for these memory-bound ops."""
    src = torch.randn(16 * 2**20, device=device)  # 64 MiB
    dst = torch.empty_like(src)
    t = time_interleaved({"copy": lambda: dst.copy_(src)}, device, rounds, 3)["copy"]
    return 2 * src.numel() * 4 / t / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="also time bf16 inputs")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--inner", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="64 x 64 batch 1 only, few rounds (smoke run)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/ops_<device>)")
    args = p.parse_args(argv)

    sizes = SIZES[:1] if args.quick else SIZES
    rounds = 3 if args.quick else args.rounds
    dtypes = (torch.float32, torch.bfloat16) if args.bf16 else (torch.float32,)
    bw = copy_bandwidth(args.device, rounds)
    rows = []
    for case in make_cases(args.device, dtypes, sizes, args.backend):
        t = time_interleaved(case.impls, args.device, rounds, args.inner)
        row = {"op": case.op, "size": case.size, "dtype": case.dtype}
        for k, v in t.items():
            row[f"{k}_us"] = round(v * 1e6, 1)
        ours = t["ours"]
        row["GB/s"] = round(case.bytes / ours / 1e9, 2)
        row["of_copy_bw"] = round(case.bytes / ours / 1e9 / bw, 3)
        for k in ("torch", "published"):
            if k in t:
                row[f"x_vs_{k}"] = round(t[k] / ours, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)

    env = environment()
    env.update(command=command_line("benchmarks.bench_ops", argv if argv is not None else sys.argv[1:]),
               copy_bandwidth_GBps=round(bw, 2), backend=args.backend)
    stem = Path(args.out) if args.out else RESULTS / f"ops_{args.device}"
    cols = ["op", "size", "dtype", "ours_us", "checked_us", "torch_us", "published_us", "x_vs_torch", "x_vs_published", "GB/s", "of_copy_bw"]
    write_results(stem, "jit_kernels op microbenchmarks", env, rows, cols,
                  "Times are medians (us). ours: the trusted path (validate=False, as the sampler calls the ops); "
                  "checked: the public default (index values checked on every call). x_vs_*: baseline time / ours. "
                  "of_copy_bw: achieved GB/s / copy bandwidth.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
