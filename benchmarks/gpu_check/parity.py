"""Section ``parity``: every public op on the compiled backends against ``reference`` (run in child shards)."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .common import Budget, CHILD_TAG, Kit, ROOT, _dname, _exact_fp32, _gen
from .env import _backends_under_test


# Differences between backends that are known and reported (not failures of the kit); a key
# is (op, probe). When the behaviour becomes consistent, the record says so.
# (op, probe) -> a disagreement between backends known and tolerated (recorded, not a failure).
# Empty: the strided-destination disagreement of lift_euler_ / microflow_update_ was fixed in
# the hardening merge, so any disagreement now fails the kit.
KNOWN_ISSUES: dict[tuple[str, str], str] = {}



@dataclass
class PCase:
    op: str
    shape: str
    dtype: str
    run: Callable[[str], torch.Tensor]  # backend -> result
    exact: bool
    tol_dtype: torch.dtype = torch.float32
    kind: str = "op"



@dataclass
class Spec:
    """One family of parity inputs: a grid and batch with one anchor count and index layout."""

    h: int
    w: int
    b: int
    c: int
    ratio: float = 0.32
    per_sample: bool = False
    strided: bool = False
    dtypes: tuple = (torch.float32, torch.float16, torch.bfloat16)
    m: int | None = None
    note: str = ""

    def label(self, m: int) -> str:
        parts = [f"{self.h}x{self.w} B={self.b} C={self.c} M={m}", "per-sample" if self.per_sample else "shared"]
        if self.strided:
            parts.append("strided")
        if self.note:
            parts.append(self.note)
        return " ".join(parts)



F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

ALL = (F32, F16, BF16)



def parity_plan(dry: bool, small: bool) -> tuple[list[Spec], list[dict]]:
    """(token-op specs, attention configs), most important first (a budget cut drops the tail)."""
    if small:  # the compute-sanitizer subset: every op, small shapes
        specs = [Spec(7, 13, 2, 16, dtypes=(F32, BF16)), Spec(7, 13, 2, 16, per_sample=True, dtypes=(F32, BF16)),
                 Spec(16, 16, 2, 32, dtypes=(F32,)), Spec(3, 4, 2, 8, m=1, dtypes=(F32,), note="grid < blur radius")]
        attn = [dict(text=16, img=48, heads=2, dim=32, b=1, dtypes=(F32, BF16)),
                dict(text=16, img=48, heads=2, dim=32, b=2, dtypes=(BF16,), lengths=True)]
        return specs, attn
    big = 16 if dry else 64
    huge = 24 if dry else 128
    cb = 16 if dry else 64
    specs = [
        Spec(7, 13, 2, 16), Spec(7, 13, 2, 16, per_sample=True),
        Spec(big, big, 1, cb), Spec(big, big, 1, cb, per_sample=True, dtypes=(BF16, F32)),
        Spec(1, 17, 2, 16), Spec(1, 17, 2, 16, per_sample=True),
        Spec(9, 1, 2, 16), Spec(9, 1, 2, 16, per_sample=True),
        Spec(3, 4, 2, 8, m=1, note="grid < blur radius"), Spec(3, 4, 2, 8, m=2, per_sample=True, note="grid < blur radius"),
        Spec(7, 13, 2, 16, strided=True), Spec(7, 13, 2, 16, per_sample=True, strided=True, dtypes=(F32, BF16)),
        Spec(big, big, 8, cb, dtypes=(BF16, F32)), Spec(big, big, 8, cb, per_sample=True, dtypes=(BF16,)),
        Spec(huge, huge, 1, cb, dtypes=(BF16, F32)),
        Spec(big, big, 2, cb, strided=True, dtypes=(BF16,)),
        Spec(7, 13, 2, 16, ratio=1.0, dtypes=(F32,), note="every token an anchor"),
    ]
    if dry:
        attn = [dict(text=8, img=24, heads=2, dim=32, b=1, dtypes=(F32, BF16)),
                dict(text=8, img=24, heads=2, dim=32, b=2, dtypes=(BF16, F32), lengths=True),
                dict(text=8, img=40, heads=2, dim=32, b=1, dtypes=(F16,), strided=True)]
    else:
        attn = [dict(text=512, img=1310, heads=24, dim=128, b=1, dtypes=(BF16,)),
                dict(text=512, img=4096, heads=24, dim=128, b=1, dtypes=(BF16,)),
                dict(text=512, img=1310, heads=24, dim=128, b=2, dtypes=(BF16,), lengths=True),
                dict(text=512, img=4096, heads=24, dim=128, b=2, dtypes=(BF16,), lengths=True),
                dict(text=512, img=1310, heads=24, dim=128, b=1, dtypes=(F16, F32)),
                dict(text=512, img=1310, heads=24, dim=128, b=1, dtypes=(BF16,), strided=True)]
    return specs, attn



def _strided_copy(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t [B, N, C]`` in a channel-strided view (stride 2 on C)."""
    buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    buf[..., ::2] = t
    return buf[..., ::2]



def _inactive(a: torch.Tensor, n: int, r: int, seed: int) -> torch.Tensor:
    """``r`` tokens not in ``a`` (``[M]`` or ``[B, M]``, on CPU), in random order."""
    def row(ai, s):
        mask = torch.ones(n, dtype=torch.bool)
        mask[ai] = False
        free = mask.nonzero().squeeze(1)
        return free[torch.randperm(free.numel(), generator=_gen(s))[:r]]

    return row(a, seed) if a.dim() == 1 else torch.stack([row(ai, seed + i) for i, ai in enumerate(a)])




def token_cases(spec: Spec, dev: str) -> list[PCase]:
    """Every token op on one spec, for each of its dtypes (dtype-free ops once)."""
    import jit_kernels as jk
    from jit_kernels.testing import anchors, tokens

    h, w, b, c = spec.h, spec.w, spec.b, spec.c
    n = h * w
    m = spec.m if spec.m is not None else max(1, min(n, round(n * spec.ratio)))
    a_cpu = anchors(n, m, batch=b if spec.per_sample else None)
    r = (n - m) // 2 if n - m >= 2 else n - m
    new_cpu = _inactive(a_cpu, n, r, seed=11) if r > 0 else None
    a = a_cpu.to(dev)
    new = new_cpu.to(dev) if new_cpu is not None else None
    near = jk.nearest_anchor_map(a, h, w, backend="reference")
    label = spec.label(m)
    cases: list[PCase] = []

    def maybe_strided(t):
        return _strided_copy(t) if spec.strided else t

    cases.append(PCase("nearest_anchor_map", label, "int64", lambda be: jk.nearest_anchor_map(a, h, w, backend=be), True))
    for i, dt in enumerate(spec.dtypes):
        dn = _dname(dt)
        x = maybe_strided(tokens(b, n, c, dt, seed=1, device=dev))
        vals = maybe_strided(tokens(b, m, c, dt, seed=2, device=dev))
        src = maybe_strided(tokens(b, m, c, dt, seed=3, device=dev))
        ybase = tokens(b, n, c, dt, seed=4, device=dev)  # in-place destinations stay contiguous (probe below)
        v_prev = maybe_strided(tokens(b, n, c, dt, seed=5, offset=0.0, device=dev))
        cases += [
            PCase("gather_tokens", label, dn, lambda be, x=x: jk.gather_tokens(x, a, backend=be), True),
            PCase("scatter_tokens", label, dn, lambda be, x=x, src=src: jk.scatter_tokens(x, a, src, backend=be), True),
            PCase("scatter_tokens_", label, dn,
                  lambda be, y=ybase, src=src: jk.scatter_tokens_(y.clone(), a, src, backend=be), True),
            PCase("lift_field", label, dn,
                  lambda be, v=vals: jk.lift_field(v, a, h, w, nearest=near, backend=be), False, dt),
            PCase("lift_euler_", label, dn,
                  lambda be, y=ybase, v=vals: jk.lift_euler_(y.clone(), v, a, h, w, -0.05, nearest=near, backend=be),
                  False, dt),
            PCase("token_importance", label, dn, lambda be, x=x: jk.token_importance(x, h, w, backend=be), False, dt),
        ]
        if i == 0:
            cases.append(PCase("lift_field", label + " map=internal", dn,
                               lambda be, v=vals: jk.lift_field(v, a, h, w, backend=be), False, dt))
        if new is not None:
            target = maybe_strided(tokens(b, r, c, dt, seed=6, device=dev))
            eps = maybe_strided(tokens(b, r, c, dt, seed=7, offset=0.0, device=dev))
            cases += [
                PCase("microflow_update_", label + " assign", dn,
                      lambda be, y=ybase, t=target: jk.microflow_update_(y.clone(), new, t, backend=be), True),
                PCase("microflow_update_", label + " blend 1/3", dn,
                      lambda be, y=ybase, t=target: jk.microflow_update_(y.clone(), new, t, "blend", 1 / 3, backend=be),
                      False, dt),
                PCase("microflow_update", label + " assign", dn,
                      lambda be, y=ybase, t=target: jk.microflow_update(y, new, t, backend=be), True),
                PCase("microflow_target", label, dn,
                      lambda be, x=x, vp=v_prev, e=eps: jk.microflow_target(x, vp, a, new, e, 0.8, 0.7, h, w,
                                                                            nearest=near, backend=be), False, dt),
            ]
        if i == 0 and new is not None:
            imp = jk.token_importance(x, h, w, backend="reference")
            tied = (imp * 2).round() / 2  # many equal scores: ties go to the lower token index
            cases += [
                PCase("select_new_tokens", label, "float32", lambda be: jk.select_new_tokens(imp, a, r, backend=be), True),
                PCase("select_new_tokens", label + " ties", "float32",
                      lambda be: jk.select_new_tokens(tied, a, r, backend=be), True),
            ]
    return cases



def tie_cases(dev: str) -> list[PCase]:
    """Nearest-anchor ties under permuted anchor lists (ties go to the anchor listed first)."""
    import jit_kernels as jk
    from jit_kernels.testing import tokens

    cases = []
    # 8 x 8 grid, anchors on the even lattice: odd cells are equidistant to 2 or 4 anchors.
    lattice = torch.tensor([r * 8 + c for r in range(0, 8, 2) for c in range(0, 8, 2)])
    perms = [lattice[torch.randperm(lattice.numel(), generator=_gen(s))] for s in range(3)]
    for s, p in enumerate(perms):
        a = p.to(dev)
        vals = tokens(2, a.numel(), 8, seed=s, device=dev)
        cases.append(PCase("nearest_anchor_map", f"8x8 lattice ties perm {s}", "int64",
                           lambda be, a=a: jk.nearest_anchor_map(a, 8, 8, backend=be), True))
        cases.append(PCase("lift_field", f"8x8 lattice ties perm {s} map=internal", "float32",
                           lambda be, a=a, v=vals: jk.lift_field(v, a, 8, 8, backend=be), False))
    ab = torch.stack(perms).to(dev)
    vb = tokens(3, ab.shape[1], 8, seed=9, device=dev)
    cases.append(PCase("nearest_anchor_map", "8x8 lattice ties per-sample (3 perms)", "int64",
                       lambda be: jk.nearest_anchor_map(ab, 8, 8, backend=be), True))
    cases.append(PCase("lift_field", "8x8 lattice ties per-sample (3 perms) map=internal", "float32",
                       lambda be: jk.lift_field(vb, ab, 8, 8, backend=be), False))
    # 3 x 3 grid, the four corners: the centre is equidistant to all four; all 24 orders as a batch.
    import itertools

    corners = [0, 2, 6, 8]
    a24 = torch.tensor(list(itertools.permutations(corners))).to(dev)
    cases.append(PCase("nearest_anchor_map", "3x3 four-way tie, all 24 orders per-sample", "int64",
                       lambda be: jk.nearest_anchor_map(a24, 3, 3, backend=be), True))
    return cases



def attention_cases(cfg: dict, dev: str) -> list[PCase]:
    import jit_kernels as jk
    from benchmarks.bench_attention import AXES, anchor_ids, rope_tables
    from jit_kernels.testing import qkv

    text, img, heads, dim, b = cfg["text"], cfg["img"], cfg["heads"], cfg["dim"], cfg["b"]
    n = text + img
    grid = 64 if img > 256 else 16
    lengths = None
    if cfg.get("lengths"):  # per-sample anchor sets: per-sample tables, the second sample padded
        tabs = [rope_tables(anchor_ids(text, img, grid=grid, seed=s), AXES[dim]) for s in range(b)]
        cos = torch.stack([t[0] for t in tabs]).to(dev)
        sin = torch.stack([t[1] for t in tabs]).to(dev)
        lengths = torch.tensor([n] + [max(1, n - 301 * (i + 1) % n) for i in range(b - 1)], dtype=torch.int32, device=dev)
    else:
        cos, sin = (t.to(dev) for t in rope_tables(anchor_ids(text, img, grid=grid), AXES[dim]))
    label = f"{text}+{img} tokens, {heads}x{dim} heads, B={b}" + (f", key_lengths={lengths.tolist()}" if lengths is not None else "")
    cases = []
    for dt in cfg["dtypes"]:
        q, k, v = (t.to(dev) for t in qkv(b, n, heads, dim, dt, seed=n))
        if cfg.get("strided"):  # views of one fused [B, L, 3, H, D] projection
            fused = torch.stack([q, k, v], 2)
            q, k, v = fused[:, :, 0], fused[:, :, 1], fused[:, :, 2]
        cases.append(PCase("anchor_attention", label + (" strided qkv" if cfg.get("strided") else ""), _dname(dt),
                           lambda be, q=q, k=k, v=v: jk.anchor_attention(q, k, v, cos, sin, lengths, backend=be),
                           False, dt, "attention"))
    return cases



def strided_destination_probes(dev: str) -> list[tuple[str, Callable[[str], torch.Tensor]]]:
    """In-place ops on a channel-strided destination: every backend must agree (accept and match, or refuse alike)."""
    import jit_kernels as jk
    from jit_kernels.testing import anchors, tokens

    h, w, b, c = 7, 13, 2, 8
    n = h * w
    a = anchors(n, 30).to(dev)
    new = _inactive(a.cpu(), n, 20, 3).to(dev)
    vals = tokens(b, 30, c, seed=2, device=dev)
    tgt = tokens(b, 20, c, seed=3, device=dev)

    def y():
        return _strided_copy(tokens(b, n, c, seed=4, device=dev))

    return [
        ("scatter_tokens_", lambda be: jk.scatter_tokens_(y(), a, vals, backend=be)),
        ("lift_euler_", lambda be: jk.lift_euler_(y(), vals, a, h, w, -0.05, backend=be)),
        ("microflow_update_", lambda be: jk.microflow_update_(y(), new, tgt, backend=be)),
    ]



def compare(out, ref, exact: bool, dtype: torch.dtype, kind: str) -> tuple[float, bool, str | None]:
    """(max abs error, ok, why not) of a backend result against the reference."""
    from jit_kernels.testing import tolerance

    if not isinstance(out, torch.Tensor):
        return math.inf, False, f"returned {type(out).__name__}"
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return math.inf, False, f"got {out.dtype} {tuple(out.shape)}, reference {ref.dtype} {tuple(ref.shape)}"
    if out.numel() == 0:
        return 0.0, True, None
    diff = (out.double() - ref.double()).abs()
    err = float(diff.max())
    if exact:
        ok = torch.equal(out, ref)
        return err, ok, None if ok else f"not bit-exact ({int((diff > 0).sum())} elements differ)"
    tol = tolerance(dtype, kind)
    ok = bool(torch.isclose(out.double(), ref.double(), rtol=tol["rtol"], atol=tol["atol"]).all())
    return err, ok, None if ok else f"outside {tol}"



def parity_groups(kit: Kit) -> list[Callable[[], list[PCase]] | str]:
    """The parity work in priority order: builders of case lists, and ``"probes"`` (strided destinations)."""
    dev = kit.device
    specs, attn = parity_plan(kit.dry, kit.small)
    groups: list = []
    for i, s in enumerate(specs):
        groups.append(lambda s=s: token_cases(s, dev))
        if i == 1:
            groups += [lambda: tie_cases(dev), lambda: attention_cases(attn[0], dev), "probes"]
    groups += [lambda cfg=cfg: attention_cases(cfg, dev) for cfg in attn[1:]]
    return groups



def run_probes(kit: Kit) -> list[dict]:
    """In-place ops on a strided destination: the backends must agree (or differ only as a known issue)."""
    probes = []
    for op, fn in strided_destination_probes(kit.device):
        outcome = {}
        for be in ["reference"] + kit.backends:
            try:
                outcome[be] = ("ok", fn(be))
            except Exception as exc:
                outcome[be] = (type(exc).__name__, str(exc)[:160])
        ref = outcome["reference"]
        rec = {"op": op, "probe": "strided destination",
               "outcomes": {be: (o[0] if o[0] != "ok" else "updated") for be, o in outcome.items()}}
        agree = True
        for be in kit.backends:
            o = outcome[be]
            if o[0] != ref[0]:
                agree = False
            elif o[0] == "ok":
                agree &= compare(o[1], ref[1], op != "lift_euler_", torch.float32, "op")[1]
        rec["consistent"] = agree
        known = KNOWN_ISSUES.get((op, "strided destination"))
        if not agree:
            if known:
                rec["known_issue"] = known
            else:
                kit.fail("parity", f"{op} on a strided destination: backends disagree {rec['outcomes']}")
        elif known:
            rec["note"] = "consistent now: the known issue is fixed (remove it from KNOWN_ISSUES)"
        probes.append(rec)
    return probes



def run_parity_groups(kit: Kit, budget: Budget, shard: int = 0, shards: int = 1,
                      emit: Callable[[dict], None] | None = None) -> tuple[list[dict], list[dict], int]:
    """Run the groups ``i`` with ``i % shards == shard``: (records, probes, cases left out for budget).

    ``emit(record)`` is called as each record is made (a child prints it at once, so a later crash
    of the CUDA context does not take the records before it along)."""
    records: list[dict] = []
    probes: list[dict] = []
    skipped = 0
    poisoned = None
    for gi, make in enumerate(parity_groups(kit)):
        if gi % shards != shard:
            continue
        if budget.over() or poisoned:
            skipped += 1
            continue
        if make == "probes":
            probes = run_probes(kit)
            continue
        try:
            cases = make()
        except Exception as exc:
            kit.fail("parity", f"building inputs failed: {exc!r}")
            continue
        for case in cases:
            if budget.over() or poisoned:
                skipped += 1
                continue
            try:
                ref = case.run("reference")
                kit.sync()
            except Exception as exc:
                records.append(dict(op=case.op, backend="reference", dtype=case.dtype, shape=case.shape,
                                    max_err=None, ok=False, error=repr(exc)[:300]))
                kit.fail("parity", f"{case.op} [{case.shape}] {case.dtype}: reference raised {exc!r}"[:300])
                continue
            for be in kit.backends:
                rec = dict(op=case.op, backend=be, dtype=case.dtype, shape=case.shape,
                           check="exact" if case.exact else f"tolerance({_dname(case.tol_dtype)}, {case.kind})")
                if kit.stand_in(be):
                    rec["stand_in_for"] = kit.stand_in(be)
                try:
                    out = case.run(be)
                    kit.sync()
                    err, ok, why = compare(out, ref, case.exact, case.tol_dtype, case.kind)
                    rec.update(max_err=err, ok=ok)
                    if why:
                        rec["why"] = why
                except Exception as exc:
                    rec.update(max_err=None, ok=False, error=repr(exc)[:300])
                    if "CUDA error" in str(exc) or "illegal memory" in str(exc):
                        poisoned = f"{case.op} [{case.shape}] on {be}: {exc}"[:300]
                records.append(rec)
                if emit is not None:
                    emit(rec)
                if not rec["ok"]:
                    kit.fail("parity", f"{case.op} {be} {case.dtype} [{case.shape}]: {rec.get('why') or rec.get('error')}")
            del ref
        if kit.device == "cuda" and not poisoned:
            try:
                torch.cuda.empty_cache()
            except Exception as exc:  # a sticky CUDA error surfaces here too
                poisoned = f"torch.cuda.empty_cache after group {gi}: {exc}"[:300]
    if poisoned:
        kit.fail("parity", f"the CUDA context is unusable after {poisoned}; the rest of this shard did not run")
    return records, probes, skipped



def run_parity_child(shard: int, shards: int, budget_s: float, dry: bool, small: bool) -> int:
    """Child process of a sharded parity section: tagged JSON lines (records, probes, failures, skipped)."""
    dev = "cpu" if dry else "cuda"
    kit = Kit(out=Path("."), dry=dry, small=small, device=dev, backends=_backends_under_test(dev),
              args=argparse.Namespace())
    kit.log = lambda msg: None  # the parent reports

    def emit(r):
        print(CHILD_TAG + json.dumps({"record": r}), flush=True)

    with _exact_fp32():
        records, probes, skipped = run_parity_groups(kit, Budget(budget_s), shard, shards, emit=emit)
    for p in probes:
        print(CHILD_TAG + json.dumps({"probe": p}), flush=True)
    for f in kit.failures:
        print(CHILD_TAG + json.dumps({"failure": f}), flush=True)
    print(CHILD_TAG + json.dumps({"skipped": skipped, "done": True}), flush=True)
    return 0



def parity_shards(kit: Kit) -> int:
    """Child processes for the parity section: compiling Triton kernels dominates a fresh GPU run, and it is
    serial within a process (the shards share Triton's on-disk cache). ``--small`` (the compute-sanitizer
    run) stays in one process; the dry run uses two children to rehearse the path."""
    if kit.small:
        return 1
    if kit.dry:
        return 2
    return max(1, min(6, (os.cpu_count() or 2) // 2))



def section_parity(kit: Kit, budget: Budget) -> tuple[list[dict], dict]:
    from concurrent.futures import ThreadPoolExecutor

    shards = parity_shards(kit)
    if shards == 1:
        with _exact_fp32():
            records, probes, skipped = run_parity_groups(kit, budget)
    else:
        def run(k):
            cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--child-parity", f"{k}/{shards}",
                   "--child-budget", f"{max(1.0, budget.left() - 5):.1f}"] + (["--dry-run"] if kit.dry else [])
            try:
                return k, subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget.left() + 20)
            except subprocess.TimeoutExpired as exc:
                return k, exc

        records, probes, skipped = [], [], 0
        with ThreadPoolExecutor(max_workers=shards) as pool:
            for k, p in pool.map(run, range(shards)):
                if isinstance(p, subprocess.TimeoutExpired):
                    kit.fail("parity", f"shard {k}/{shards} timed out")
                    continue
                lines = [json.loads(ln[len(CHILD_TAG):]) for ln in p.stdout.splitlines() if ln.startswith(CHILD_TAG)]
                for ln in lines:
                    if "record" in ln:
                        records.append(ln["record"])
                    elif "probe" in ln:
                        probes.append(ln["probe"])
                    elif "failure" in ln:
                        kit.failures.append(ln["failure"])
                        kit.log(f"FAIL {ln['failure']}")
                    elif "skipped" in ln:
                        skipped += ln["skipped"]
                if p.returncode != 0 or not any(ln.get("done") for ln in lines):
                    kit.fail("parity", f"shard {k}/{shards} died (rc {p.returncode}): {(p.stderr or '')[-600:]}")
    summary = {"records": len(records), "failed": sum(1 for r in records if not r["ok"]), "shards": shards,
               "skipped_for_budget": skipped, "strided_destination_probes": probes}
    return records, summary
