"""The command line: argument parsing, budgets, and the section loop."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

from .bad_inputs import run_bad_child, section_bad_inputs
from .bench import section_bench
from .build import run_build
from .common import BUDGET_DRY, BUDGET_GPU, Budget, Kit, SECTIONS, _exact_fp32, _prepare_env
from .e2e import section_e2e
from .env import section_env
from .parity import run_parity_child, section_parity
from .report import write_report
from .sampler import section_sampler
from .sanitizer import section_sanitizer


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=sys.modules[__package__].__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="output folder (gpu_check.json, gpu_check.md)")
    p.add_argument("--dry-run", action="store_true", help="CPU rehearsal: tiny shapes, interpreter Triton, cpp for cuda")
    p.add_argument("--section", choices=SECTIONS, default=None, help="run one section (env always runs)")
    p.add_argument("--small", action="store_true", help="parity on a small subset (the compute-sanitizer run)")
    p.add_argument("--build", action="store_true", help="first run `python setup.py build_ext --inplace` for this GPU")
    p.add_argument("--e2e-steps", type=int, default=0, help="dense steps to time and extrapolate to 50 (0: as many as fit)")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's time budget")
    p.add_argument("--time-limit", type=float, default=None,
                   help="hard wall-clock seconds for the whole command, --build included: every budget shrinks "
                        "to fit what is left after the build (for a machine that kills a command at a fixed limit)")
    p.add_argument("--total-budget", type=float, default=None,
                   help="seconds for all sections (default 470 on a GPU, 300 dry); the sanitizer gets what is left")
    p.add_argument("--child-bad", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-parity", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-budget", type=float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument("--backend", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(argv)
    if args.child_bad is None and args.child_parity is None and not args.out:
        p.error("--out DIR is required")
    return args



def sanitizer_seconds(total: float, elapsed: float, dry: bool) -> float | None:
    """The last section's budget: what the others left of the total (less 5 s), or None when too
    little is left to start compute-sanitizer and the child it watches."""
    seconds = total - elapsed - 5.0
    return seconds if seconds >= (10.0 if dry else 30.0) else None



def main(argv=None) -> int:
    process_start = time.perf_counter()
    cli = argv is None
    argv = list(sys.argv[1:] if cli else argv)
    args = parse_args(argv)
    if args.out:  # children run from the repo root: hand them (and the report) an absolute path
        args.out = str(Path(args.out).resolve())
    if args.child_bad is not None:
        _prepare_env(args.dry_run, argv if cli else None)
        with _exact_fp32():  # the health check compares fp32 lifts
            return run_bad_child(args.child_bad.split("|"), args.backend, args.dry_run)
    if args.child_parity is not None:
        _prepare_env(args.dry_run, argv if cli else None)
        if args.dry_run:
            torch.set_num_threads(1)
        shard, shards = (int(x) for x in args.child_parity.split("/"))
        return run_parity_child(shard, shards, args.child_budget, args.dry_run, args.small)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here. Run on a GPU machine, or rehearse with --dry-run.", file=sys.stderr)
        return 2
    build = run_build(args.dry_run, None if args.time_limit is None else 0.6 * args.time_limit) if args.build else None
    if build is not None and build["rc"] != 0:
        print(build["log_tail"], file=sys.stderr)
    _prepare_env(args.dry_run, argv if cli else None)
    if args.dry_run and cli:
        torch.set_num_threads(1)  # tiny shapes on a shared 2-core machine: threads only contend
    kit = Kit(out=Path(args.out), dry=args.dry_run, small=args.small,
              device="cpu" if args.dry_run else "cuda", backends=[], args=args)
    budgets = {k: v * args.budget_scale for k, v in (BUDGET_DRY if kit.dry else BUDGET_GPU).items()}
    kit.result = {"ok": None, "env": {}, "parity": [], "sampler": [], "syncs": {}, "bench": {}, "e2e": {},
                  "bad_inputs": {}, "sanitizer": {}, "sections": {}}
    kit.log(f"gpu_check: {'DRY RUN on CPU' if kit.dry else 'CUDA'}; output {kit.out}")
    t = time.perf_counter()
    try:
        kit.result["env"] = section_env(kit)
        status = "ok"
    except Exception as exc:
        traceback.print_exc()
        kit.fail("env", repr(exc))
        status = "error"
    if build is not None:
        kit.result["env"]["build"] = build
        if build["rc"] != 0:
            kit.fail("env", f"the extension build failed (rc {build['rc']}): {build['log_tail'][-300:]}")
    kit.result["sections"]["env"] = {"status": status, "seconds": round(time.perf_counter() - t, 1)}
    kit.log(f"env: {kit.result['env'].get('gpu', '')} backends under test {kit.backends}")
    write_report(kit)

    wanted = [args.section] if args.section else list(SECTIONS)
    total = args.total_budget if args.total_budget is not None else (300.0 if kit.dry else 470.0) * args.budget_scale
    if args.time_limit is not None:
        # What the limit leaves after the build, imports and env, less a margin for the last child's
        # teardown and the report: every budget shrinks by the same factor to fit.
        left = args.time_limit - (time.perf_counter() - process_start) - 20.0
        fit = max(0.0, min(1.0, left / total)) if total > 0 else 0.0
        budgets = {k: v * fit for k, v in budgets.items()}
        total *= fit
        kit.result["env"]["time_limit"] = {"seconds": args.time_limit, "budget_fit": round(fit, 3),
                                           "total_budget_s": round(total, 1)}
        kit.log(f"time limit {args.time_limit:.0f}s: {left:.0f}s left for the sections, budgets x {fit:.2f}")
    run_start = time.perf_counter()
    for name in wanted:
        if not kit.backends and name != "e2e":
            kit.result["sections"][name] = {"status": "skipped: no backend under test"}
            continue
        seconds = budgets[name]
        if name == "sanitizer" and len(wanted) > 1:  # the last section: whatever the others left of the total
            seconds = sanitizer_seconds(total, time.perf_counter() - run_start, kit.dry)
            if seconds is None:
                kit.result["sections"][name] = {"status": "skipped: out of time"}
                kit.log(f"{name}: skipped, out of time")
                continue
        budget = Budget(seconds)
        n_fail = len(kit.failures)
        kit.log(f"{name}: start (budget {budget.seconds:.0f}s)")
        status = "ok"
        try:
            if name == "parity":
                kit.result["parity"], kit.result["parity_summary"] = section_parity(kit, budget)
            elif name == "bad_inputs":
                kit.result["bad_inputs"] = section_bad_inputs(kit, budget)
            elif name == "sampler":
                kit.result["sampler"], kit.result["syncs"] = section_sampler(kit, budget)
            elif name == "bench":
                kit.result["bench"] = section_bench(kit, budget)
            elif name == "e2e":
                kit.result["e2e"] = section_e2e(kit, budget)
                if str(kit.result["e2e"].get("status", "")).startswith("skipped"):
                    status = kit.result["e2e"]["status"]
            elif name == "sanitizer":
                kit.result["sanitizer"] = section_sanitizer(kit, budget)
                status = kit.result["sanitizer"].get("status", "ok")
        except Exception as exc:
            traceback.print_exc()
            kit.fail(name, f"section crashed: {exc!r}"[:400])
        if len(kit.failures) > n_fail:
            status = f"FAILED ({len(kit.failures) - n_fail})"
        kit.result["sections"][name] = {"status": status, "seconds": round(budget.elapsed(), 1),
                                        "budget_s": round(budget.seconds)}
        kit.log(f"{name}: {status} in {budget.elapsed():.1f}s")
        write_report(kit)
    write_report(kit)
    kit.log(f"{'PASS' if not kit.failures else 'FAIL'}: {len(kit.failures)} failure(s); wrote "
            f"{kit.out / 'gpu_check.json'} and {kit.out / 'gpu_check.md'}")
    for f in kit.failures[:20]:
        print(f"  - {f}")
    return 0 if not kit.failures else 1
