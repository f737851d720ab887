"""Section ``bad_inputs``: invalid calls on the device, each batch in a child process; then a health check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Callable

import torch

from .common import Budget, CHILD_TAG, Kit, ROOT


def bad_cases() -> dict[str, tuple[str, Callable[[str, str, str], object]]]:
    """name -> (expected exception type, fn(device, other_device, backend)). Each call is invalid."""
    import jit_kernels as jk
    from jit_kernels._backends import backend_op
    from jit_kernels.testing import anchors, tokens

    h, w, n, m = 7, 13, 91, 30
    cases: dict = {}

    def case(name, exc):
        def deco(fn):
            cases[name] = (exc, fn)
            return fn
        return deco

    def base(d):
        a = anchors(n, m).to(d)
        return tokens(2, n, 8, device=d), a, jk.nearest_anchor_map(a, h, w, backend="reference"), tokens(2, m, 8, device=d)

    def bad_near(d):  # anchors 0 and 1 swap their own entries: not their own nearest anchor
        x, a, near, v = base(d)
        near = near.clone()
        near[a[0]], near[a[1]] = 1, 0
        return x, a, near, v

    def idx(d, vals):
        return torch.tensor(vals, dtype=torch.int64, device=d)

    @case("gather_tokens: index out of range", "IndexError")
    def _(d, o, be):
        jk.gather_tokens(tokens(2, n, 8, device=d), idx(d, [0, 5, n]), backend=be)

    @case("gather_tokens: negative index", "IndexError")
    def _(d, o, be):
        jk.gather_tokens(tokens(2, n, 8, device=d), idx(d, [3, -1]), backend=be)

    @case("gather_tokens: mixed devices", "ValueError")
    def _(d, o, be):
        jk.gather_tokens(tokens(2, n, 8, device=d), idx(o, [0, 1]), backend=be)

    @case("gather_tokens: direct op, validate=True, index out of range", "IndexError")
    def _(d, o, be):
        backend_op("gather_tokens", be)(tokens(2, n, 8, device=d), idx(d, [0, n + 7]), True)

    @case("scatter_tokens_: duplicate index", "ValueError")
    def _(d, o, be):
        jk.scatter_tokens_(tokens(2, n, 8, device=d), idx(d, [4, 9, 4]), tokens(2, 3, 8, device=d), backend=be)

    @case("scatter_tokens: index out of range", "IndexError")
    def _(d, o, be):
        jk.scatter_tokens(tokens(2, n, 8, device=d), idx(d, [4, n]), tokens(2, 2, 8, device=d), backend=be)

    @case("nearest_anchor_map: duplicate anchors", "ValueError")
    def _(d, o, be):
        jk.nearest_anchor_map(idx(d, [3, 8, 3]), h, w, backend=be)

    @case("nearest_anchor_map: anchor out of range", "IndexError")
    def _(d, o, be):
        jk.nearest_anchor_map(idx(d, [3, n]), h, w, backend=be)

    @case("lift_field: inconsistent nearest map", "ValueError")
    def _(d, o, be):
        x, a, near, v = bad_near(d)
        jk.lift_field(v, a, h, w, nearest=near, backend=be)

    @case("lift_field: nearest value out of range", "IndexError")
    def _(d, o, be):
        x, a, near, v = base(d)
        near = near.clone()
        near[near != 0] = m  # every non-anchor-0 cell names anchor M (out of range)
        jk.lift_field(v, a, h, w, nearest=near, backend=be)

    @case("lift_field: direct op, validate=True, inconsistent nearest map", "ValueError")
    def _(d, o, be):
        x, a, near, v = bad_near(d)
        backend_op("lift_field", be)(v, a, near, jk.lift_weights(m, n, device=d), h, w, True)

    @case("lift_euler_: inconsistent nearest map", "ValueError")
    def _(d, o, be):
        x, a, near, v = bad_near(d)
        jk.lift_euler_(x, v, a, h, w, -0.1, nearest=near, backend=be)

    @case("lift_euler_: mixed devices", "ValueError")
    def _(d, o, be):
        x, a, near, v = base(d)
        jk.lift_euler_(x, v, a, h, w, -0.1, nearest=near.to(o), backend=be)

    @case("token_importance: grid does not match N", "ValueError")
    def _(d, o, be):
        jk.token_importance(tokens(2, n, 8, device=d), 7, 12, backend=be)

    @case("select_new_tokens: active index out of range", "IndexError")
    def _(d, o, be):
        jk.select_new_tokens(torch.rand(2, n, generator=torch.Generator().manual_seed(0)).to(d), idx(d, [1, n]), 5,
                             backend=be)

    @case("select_new_tokens: duplicate active index", "ValueError")
    def _(d, o, be):
        jk.select_new_tokens(torch.rand(2, n, generator=torch.Generator().manual_seed(0)).to(d), idx(d, [1, 1]), 5,
                             backend=be)

    @case("microflow_update_: duplicate index", "ValueError")
    def _(d, o, be):
        jk.microflow_update_(tokens(2, n, 8, device=d), idx(d, [2, 2]), tokens(2, 2, 8, device=d), backend=be)

    @case("microflow_update_: index out of range", "IndexError")
    def _(d, o, be):
        jk.microflow_update_(tokens(2, n, 8, device=d), idx(d, [2, n]), tokens(2, 2, 8, device=d), backend=be)

    @case("microflow_target: new index out of range", "IndexError")
    def _(d, o, be):
        x, a, near, v = base(d)
        jk.microflow_target(x, x, a, idx(d, [n + 3]), tokens(2, 1, 8, device=d), 0.8, 0.7, h, w, nearest=near, backend=be)

    @case("microflow_target: mixed devices", "ValueError")
    def _(d, o, be):
        x, a, near, v = base(d)
        jk.microflow_target(x, x, a, idx(d, [2]), tokens(2, 1, 8, device=o), 0.8, 0.7, h, w, nearest=near, backend=be)

    def attn(d, b=2, n_tok=24):
        q = torch.randn(b, n_tok, 2, 16, generator=torch.Generator().manual_seed(0)).to(d)
        cos, sin = torch.ones(n_tok, 16, device=d), torch.zeros(n_tok, 16, device=d)
        return q, cos, sin

    @case("anchor_attention: key_lengths > L", "IndexError")
    def _(d, o, be):
        q, cos, sin = attn(d)
        jk.anchor_attention(q, q, q, cos, sin, torch.tensor([24, 25], device=d), backend=be)

    @case("anchor_attention: key_lengths = 0", "IndexError")
    def _(d, o, be):
        q, cos, sin = attn(d)
        jk.anchor_attention(q, q, q, cos, sin, torch.tensor([0, 24], device=d), backend=be)

    @case("anchor_attention: mixed devices", "ValueError")
    def _(d, o, be):
        q, cos, sin = attn(d)
        jk.anchor_attention(q, q, q, cos.to(o), sin, backend=be)

    @case("anchor_attention: direct op, validate=True, key_lengths > L", "IndexError")
    def _(d, o, be):
        q, cos, sin = attn(d)
        backend_op("anchor_attention", be)(q, q, q, cos, sin, torch.tensor([30, 24], device=d), 0.25, True)

    return cases



def _health(dev: str, be: str) -> bool:
    """A valid gather and lift on this backend after the bad calls: the context still works."""
    import jit_kernels as jk
    from jit_kernels.testing import anchors, tokens

    a = anchors(91, 30).to(dev)
    x = tokens(2, 91, 8, device=dev)
    ok = torch.equal(jk.gather_tokens(x, a, backend=be), jk.gather_tokens(x, a, backend="reference"))
    got = jk.lift_field(x[:, :30], a, 7, 13, backend=be)
    ok &= bool(torch.allclose(got, jk.lift_field(x[:, :30], a, 7, 13, backend="reference"), rtol=1e-5, atol=1e-5))
    if dev == "cuda":
        torch.cuda.synchronize()
    return ok



def run_bad_child(names: list[str], backend: str, dry: bool) -> int:
    """Child process: run the named bad calls, print one tagged JSON line each, then a health check."""
    dev = "cpu" if dry else "cuda"
    other = "meta" if dry else "cpu"
    table = bad_cases()
    for name in names:
        expected, fn = table[name]
        rec = {"case": name, "backend": backend, "expected": expected}
        try:
            fn(dev, other, backend)
            if dev == "cuda":
                torch.cuda.synchronize()
            rec.update(raised=None, ok=False)
        except Exception as exc:
            rec.update(raised=type(exc).__name__, ok=type(exc).__name__ == expected, message=str(exc)[:240])
        print(CHILD_TAG + json.dumps(rec), flush=True)
    try:
        healthy = _health(dev, backend)
        err = None
    except Exception as exc:
        healthy, err = False, repr(exc)[:300]
    print(CHILD_TAG + json.dumps({"health": healthy, "error": err}), flush=True)
    return 0



def section_bad_inputs(kit: Kit, budget: Budget) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    names = list(bad_cases())
    if kit.dry:  # 2 cores: one child per backend runs every case (the GPU run: one child per case and backend)
        jobs = [(names, be) for be in kit.backends]
        workers = 2
    else:
        jobs = [([nm], be) for nm in names for be in kit.backends]
        workers = max(2, min(12, (os.cpu_count() or 4) - 2))
    deadline = time.perf_counter() + budget.left()

    # A child needs seconds to import torch and make a CUDA context: one started with less than this
    # left is not started (counted as left out for budget) rather than timed out as a failure.
    min_start = 2.0 if kit.dry else 20.0

    def run(job):
        group, be = job
        left = deadline - time.perf_counter()
        if left <= min_start:
            return job, None, "skipped: out of budget"
        cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--child-bad", "|".join(group), "--backend", be]
        if kit.dry:
            cmd.append("--dry-run")
        try:
            p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(5.0, left))
            return job, p, None
        except subprocess.TimeoutExpired:
            return job, None, f"timed out after {left:.0f}s"

    results = []
    skipped = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for (group, be), p, why in pool.map(run, jobs):
            if p is None:
                if why.startswith("skipped"):
                    skipped += len(group)
                    continue
                for nm in group:
                    results.append({"case": nm, "backend": be, "ok": False, "error": why})
                    kit.fail("bad_inputs", f"{nm} on {be}: {why}")
                continue
            lines = [json.loads(ln[len(CHILD_TAG):]) for ln in p.stdout.splitlines() if ln.startswith(CHILD_TAG)]
            recs = [ln for ln in lines if "case" in ln]
            health = next((ln for ln in lines if "health" in ln), None)
            seen = {r["case"] for r in recs}
            for r in recs:
                r["child_rc"] = p.returncode
                r["child_healthy"] = bool(health and health["health"])
                r["ok"] = bool(r["ok"] and p.returncode == 0 and r["child_healthy"])
                if kit.stand_in(be):
                    r["stand_in_for"] = kit.stand_in(be)
                results.append(r)
                if not r["ok"]:
                    kit.fail("bad_inputs", f"{r['case']} on {be}: raised {r.get('raised')} (expected {r['expected']}), "
                                           f"child rc {p.returncode}, healthy {r['child_healthy']}"
                                           + (f": {health.get('error')}" if health and health.get("error") else ""))
            for nm in group:
                if nm not in seen:
                    results.append({"case": nm, "backend": be, "ok": False, "child_rc": p.returncode,
                                    "error": (p.stderr or p.stdout)[-600:]})
                    kit.fail("bad_inputs", f"{nm} on {be}: the child died (rc {p.returncode}) before reporting")
    return {"cases": results, "children": len(jobs), "skipped_for_budget": skipped,
            "per_child": "one case per child" if not kit.dry else "every case of a backend in one child (dry run)"}
