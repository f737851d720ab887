"""The report: ``gpu_check.json`` and ``gpu_check.md``, rewritten after every section."""

from __future__ import annotations

import json

from .common import Kit


def _fmt_q(q) -> str:
    return "/".join(f"{x:g}" for x in q) if isinstance(q, list) else str(q)



def write_report(kit: Kit) -> None:
    res = kit.result
    res["ok"] = not kit.failures
    res["failures"] = kit.failures
    probes = res.get("parity_summary", {}).get("strided_destination_probes", [])
    res["known_issues"] = [f"{p['op']} ({p['probe']}): {p['known_issue']}" for p in probes if p.get("known_issue")]
    res["known_issues_fixed"] = [f"{p['op']} ({p['probe']})" for p in probes if p.get("note", "").startswith("consistent now")]
    kit.out.mkdir(parents=True, exist_ok=True)
    (kit.out / "gpu_check.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    L = [f"# GPU proof kit{' (DRY RUN on CPU: proves the kit runs, not the GPU)' if kit.dry else ''}", "",
         f"**{'PASS' if res['ok'] else 'FAIL'}**: {len(kit.failures)} failure(s)", ""]
    env = res.get("env", {})
    for key in ("date_utc", "gpu", "gpu_arch", "machine", "python", "torch", "cuda", "triton", "diffusers", "git",
                "backends_under_test", "stand_in", "command"):
        if key in env:
            L.append(f"- {key}: {env[key]}")
    L += ["", "## Sections", "", "| section | status | seconds | budget |", "|---|---|---|---|"]
    for name, s in res.get("sections", {}).items():
        L.append(f"| {name} | {s.get('status')} | {s.get('seconds')} | {s.get('budget_s', '')} |")
    if kit.failures:
        L += ["", "## Failures", ""] + [f"- {f}" for f in kit.failures[:60]]
        if len(kit.failures) > 60:
            L.append(f"- ... {len(kit.failures) - 60} more in gpu_check.json")
    par = res.get("parity")
    if par:
        L += ["", "## Parity against reference", "", "| op | backend | records | failed | max abs err | dtypes |", "|---|---|---|---|---|---|"]
        agg: dict = {}
        for r in par:
            a = agg.setdefault((r["op"], r["backend"]), {"n": 0, "bad": 0, "err": 0.0, "dt": set()})
            a["n"] += 1
            a["bad"] += not r["ok"]
            a["dt"].add(r["dtype"])
            if r.get("max_err") is not None and r["check"] != "exact":
                a["err"] = max(a["err"], r["max_err"])
        for (op, be), a in agg.items():
            L.append(f"| {op} | {be} | {a['n']} | {a['bad']} | {a['err']:.2e} | {', '.join(sorted(a['dt']))} |")
        ps = res.get("parity_summary", {})
        L.append("")
        L.append(f"Index ops and copies bit-exact; others within jit_kernels.testing.tolerance. "
                 f"Cases left out for budget: {ps.get('skipped_for_budget', 0)}.")
        for p in ps.get("strided_destination_probes", []):
            L.append(f"- {p['op']} on a strided destination: {p['outcomes']}"
                     + (f" -- known issue: {p['known_issue']}" if p.get("known_issue") else "")
                     + (f" -- {p['note']}" if p.get("note") else ""))
    bad = res.get("bad_inputs")
    if bad and bad.get("cases"):
        n_ok = sum(1 for c in bad["cases"] if c.get("ok"))
        L += ["", "## Bad inputs", "", f"{n_ok}/{len(bad['cases'])} raised the expected type with a healthy context "
              f"and a clean exit ({bad['children']} child processes, {bad['per_child']})."]
        for c in bad["cases"]:
            if not c.get("ok"):
                L.append(f"- FAILED {c['case']} on {c['backend']}: raised {c.get('raised')}, expected {c.get('expected')}")
    smp = res.get("sampler")
    if smp:
        L += ["", "## Sampler (small velocity fn)", "",
              "| run | steps | launches per step | quiet max | validation passes per step | syncs per step | ok |",
              "|---|---|---|---|---|---|---|"]
        for r in smp:
            L.append(f"| {r['preset']} {r['policy']} {r['backend']} | {r.get('steps')} | {r.get('launches_per_step')} | "
                     f"{r.get('launches_quiet_step_max')} | {r.get('validation_passes_per_step')} | "
                     f"{r.get('syncs_per_step', 'n/a (CPU)')} | {r.get('ok', r.get('skipped'))} |")
        if smp and smp[0].get("launch_unit"):
            L.append(f"\nLaunch unit: {smp[0]['launch_unit']}; the velocity fn alone: {smp[0].get('velocity_fn_launches')}.")
        sy = res.get("syncs", {})
        L.append(f"Syncs: {sy.get('method')}.")
        for s in sy.get("runs", []):
            L.append(f"- {s['run']}: quiet steps {s['quiet_steps']}, syncs there {s.get('syncs_quiet_steps')}"
                     + (f", error mode: {s['error_mode']}" if "error_mode" in s else ""))
    bench = res.get("bench")
    if bench and bench.get("ops"):
        L += ["", f"## Bench ({bench['timer']}; copy bandwidth {bench['copy_bandwidth_GBps']} GB/s)", "",
              "| op | size | dtype | backend | ours us | torch us | published us | x vs torch | GB/s | of copy bw |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in bench["ops"]:
            L.append(f"| {r['op']} | {r['size']} | {r['dtype']} | {r['backend']} | {_fmt_q(r.get('ours_us'))} | "
                     f"{_fmt_q(r.get('torch_us', ''))} | {_fmt_q(r.get('published_us', ''))} | {r.get('x_vs_torch', '')} | "
                     f"{r.get('GB/s', '')} | {r.get('of_copy_bw', '')} |")
        if bench.get("attention"):
            L += ["", "| attention | tokens | dtype | stock ms | " + " | ".join(f"{b} ms | x vs stock ({b})" for b in kit.backends) + " |",
                  "|---|---|---|---|" + "---|---|" * len(kit.backends)]
            for r in bench["attention"]:
                L.append(f"| {r['case']} | {r['tokens']} | {r['dtype']} | {_fmt_q(r['stock_ms'])} | " +
                         " | ".join(f"{_fmt_q(r.get(f'ours_{b}_ms'))} | {r.get(f'x_vs_stock_{b}')}" for b in kit.backends) + " |")
        if bench.get("variants"):
            L += ["", "Kernel variants (`JIT_KERNELS_LIFT_VARIANT`, v1 = the kernels before the launch / index-math changes):",
                  "", "| op | size | dtype | backend | v1 us | v2 us | v2 speedup | same bits |", "|---|---|---|---|---|---|---|---|"]
            for r in bench["variants"]:
                be = r["backend"] + (f" (for {r['stand_in_for']})" if r.get("stand_in_for") else "")
                L.append(f"| {r['op']} | {r['size']} | {r['dtype']} | {be} | {_fmt_q(r.get('v1_us'))} | "
                         f"{_fmt_q(r.get('v2_us'))} | {r.get('v2_speedup', r.get('error', ''))} | {r.get('same_bits', '')} |")
        L.append(f"\nTimes are quantiles 0.2/0.5/0.8. Rows left out for budget: {bench.get('skipped_for_budget', 0)}.")
    e2e = res.get("e2e")
    if e2e:
        L += ["", "## End to end (random-weight FLUX transformer)", "", f"Status: {e2e.get('status')}"]
        if e2e.get("rows"):
            m = e2e["model"]
            L.append(f"\n{m.get('num_layers')} double + {m.get('num_single_layers')} single blocks, "
                     f"{m.get('num_attention_heads')} x {m.get('attention_head_dim')} heads, {e2e['parameters'] / 1e6:.1f} M "
                     f"parameters, {e2e['dtype']}, {e2e['grid']} grid + {e2e['text_tokens']} text tokens; "
                     f"dense steps timed {e2e['dense_steps_timed']}/50, {e2e['repeats']} round(s).\n")
            cols = ["method", "steps", "wall_s", "model_s", "sampler_overhead", "speedup_vs_dense50", "flop_ratio_vs_dense50",
                    "model_time_ratio_vs_dense50", "realised_vs_dense50", "speedup_vs_dense_same_steps",
                    "validation_passes"]
            L += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            L += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in e2e["rows"]]
            q = e2e.get("quiet_step_check", {})
            L.append(f"\nQuiet-step check ({q.get('run')}): validation passes {q.get('validation_passes_quiet_steps')}, "
                     f"syncs {q.get('syncs_quiet_steps', 'n/a (CPU)')}"
                     + (f", error mode: {q['error_mode']}" if "error_mode" in q else "") + f"; ok {q.get('ok')}")
        elif e2e.get("how_to"):
            L.append(f"\n{e2e['how_to']}")
        for key, title, cols in (
                ("peak_memory", "Peak GPU memory, stock loop vs JiT",
                 ["method", "peak_GiB", "before_GiB", "over_weights_GiB", "over_weights_vs_stock", "finite_output"]),
                ("nf4", "nf4 (bitsandbytes) transformer under model CPU offload, JiT 7x",
                 ["check", "ok", "detail"])):
            sub = e2e.get(key) or {}
            if sub:
                L += ["", f"{title}: {sub.get('status')}"]
            if sub.get("rows"):
                L += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                L += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in sub["rows"]]
    san = res.get("sanitizer")
    if san:
        L += ["", "## compute-sanitizer", "", f"Status: {san.get('status')}; {san.get('error_summary') or ''} "
              f"{san.get('note') or ''} (parity records {san.get('parity_records')}, failed {san.get('parity_failed')})"]
    if res["known_issues"]:
        L += ["", "Known issues seen in this run (reported, not counted as failures):"] + [f"- {k}" for k in res["known_issues"]]
    if res["known_issues_fixed"]:
        L += ["", "Known issues no longer seen (remove them from KNOWN_ISSUES in benchmarks/gpu_check/parity.py so a "
              "regression fails): " + ", ".join(res["known_issues_fixed"])]
    (kit.out / "gpu_check.md").write_text("\n".join(L) + "\n")
