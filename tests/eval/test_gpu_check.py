"""The GPU proof kit (the package benchmarks/gpu_check/), run in pieces on CPU so CI catches breakage.

The full dry run (every section, tiny shapes) is a step of .ci/run, not a test. Here: the
parity machinery on one small spec and its failure detection, the bad-input child on a few
cases and a case that raises nothing, the sampler probes, the JSON schema of an in-process
dry run of one section, and the env handling. The GPU run of a section is marked ``gpu``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check as gc

ROOT = Path(__file__).resolve().parents[2]
DRY = not torch.cuda.is_available()


def _kit(tmp_path, **kw) -> gc.Kit:
    dev = "cpu" if DRY else "cuda"
    return gc.Kit(out=tmp_path, dry=DRY, small=kw.pop("small", True), device=dev,
                  backends=gc._backends_under_test(dev), args=gc.parse_args(["--out", str(tmp_path)]), **kw)


def test_compare_exact_and_tolerance():
    a = torch.arange(6.0)
    b = a.clone()
    assert gc.compare(a, b, True, torch.float32, "op") == (0.0, True, None)
    b[3] += 1e-6
    err, ok, why = gc.compare(a, b, True, torch.float32, "op")
    assert not ok and "1 elements differ" in why and err > 0
    assert gc.compare(a, b, False, torch.float32, "op")[1]  # within fp32 tolerance
    b[3] += 1.0
    assert not gc.compare(a, b, False, torch.float32, "op")[1]
    assert not gc.compare(a, a.half(), True, torch.float32, "op")[1]  # dtype mismatch
    assert not gc.compare(a, a[:5], False, torch.float32, "op")[1]  # shape mismatch


def test_parity_on_one_spec_matches_reference(tmp_path):
    kit = _kit(tmp_path)
    cases = gc.token_cases(gc.Spec(7, 13, 2, 8, per_sample=True, strided=True, dtypes=(torch.bfloat16,)), kit.device)
    ops = {c.op for c in cases}
    assert ops == {"nearest_anchor_map", "gather_tokens", "scatter_tokens", "scatter_tokens_", "lift_field",
                   "lift_euler_", "token_importance", "microflow_update_", "microflow_update", "microflow_target",
                   "select_new_tokens"}
    for case in cases:
        ref = case.run("reference")
        for be in kit.backends:
            err, ok, why = gc.compare(case.run(be), ref, case.exact, case.tol_dtype, case.kind)
            assert ok, (case.op, case.shape, be, err, why)


def test_parity_runner_reports_a_wrong_backend(tmp_path, monkeypatch):
    kit = _kit(tmp_path)

    def wrong(be):  # a "kernel" 1e-3 off on every backend but the reference
        x = torch.ones(4, 3)
        return x if be == "reference" else x + 1e-3

    monkeypatch.setattr(gc.parity, "parity_groups",
                        lambda k: [lambda: [gc.PCase("fake_op", "4x3", "float32", wrong, exact=True)]])
    records, probes, skipped = gc.run_parity_groups(kit, gc.Budget(60))
    assert [r["backend"] for r in records] == kit.backends and not skipped and not probes
    assert all(not r["ok"] and r["max_err"] > 0 and "not bit-exact" in r["why"] for r in records)
    assert len(kit.failures) == len(kit.backends) and kit.failures[0].startswith("parity: fake_op")


def test_parity_budget_cuts_the_tail(tmp_path, monkeypatch):
    kit = _kit(tmp_path)
    ran = []
    monkeypatch.setattr(gc.parity, "parity_groups", lambda k: [lambda: ran.append(1) or []] * 3)
    records, _, skipped = gc.run_parity_groups(kit, gc.Budget(0))
    assert records == [] and ran == [] and skipped == 3


def test_parity_plan_covers_the_issue_list():
    specs, attn = gc.parity_plan(dry=False, small=False)
    grids = {(s.h, s.w, s.b) for s in specs}
    assert {(7, 13, 2), (1, 17, 2), (9, 1, 2), (3, 4, 2), (64, 64, 1), (64, 64, 8), (128, 128, 1)} <= grids
    assert any(s.per_sample for s in specs) and any(s.strided for s in specs)
    assert {d for s in specs for d in s.dtypes} == set(gc.ALL)
    big = {(a["text"], a["img"], a["heads"], a["dim"], bool(a.get("lengths"))) for a in attn}
    assert {(512, 1310, 24, 128, False), (512, 4096, 24, 128, False), (512, 1310, 24, 128, True),
            (512, 4096, 24, 128, True)} <= big


def test_nearest_ties_under_permutations(tmp_path):
    kit = _kit(tmp_path)
    for case in gc.tie_cases(kit.device):
        ref = case.run("reference")
        for be in kit.backends:
            assert gc.compare(case.run(be), ref, case.exact, case.tol_dtype, case.kind)[1], (case.shape, be)


def test_bad_input_child_in_process(capsys):
    names = ["gather_tokens: index out of range", "scatter_tokens_: duplicate index",
             "lift_field: inconsistent nearest map", "anchor_attention: key_lengths > L",
             "gather_tokens: mixed devices"]
    be = gc._backends_under_test("cpu" if DRY else "cuda")[0]
    assert gc.run_bad_child(names, be, DRY) == 0
    lines = [json.loads(ln[len(gc.CHILD_TAG):]) for ln in capsys.readouterr().out.splitlines()
             if ln.startswith(gc.CHILD_TAG)]
    recs = {r["case"]: r for r in lines if "case" in r}
    assert set(recs) == set(names)
    assert all(r["ok"] and r["raised"] == r["expected"] for r in recs.values()), recs
    assert lines[-1] == {"health": True, "error": None}


def test_bad_input_child_flags_a_call_that_raises_nothing(capsys, monkeypatch):
    table = gc.bad_cases()
    table["fake: valid call"] = ("IndexError", lambda d, o, be: None)
    monkeypatch.setattr(gc.bad_inputs, "bad_cases", lambda: table)
    gc.run_bad_child(["fake: valid call"], "reference", DRY)
    rec = json.loads(capsys.readouterr().out.splitlines()[0][len(gc.CHILD_TAG):])
    assert rec["raised"] is None and rec["ok"] is False


def test_every_bad_case_names_an_exception_type():
    table = gc.bad_cases()
    assert len(table) >= 20
    assert {exc for exc, _ in table.values()} == {"IndexError", "ValueError"}
    ops = {name.split(":")[0] for name in table}
    assert {"gather_tokens", "scatter_tokens_", "nearest_anchor_map", "lift_field", "lift_euler_", "token_importance",
            "select_new_tokens", "microflow_update_", "microflow_target", "anchor_attention"} <= ops


def test_step_probe_counts_validation_passes_per_step():
    import jit_kernels as jk
    from jit_sampler import JiTConfig, beta_sigmas, jit_sample, make_plan

    cfg = JiTConfig.preset("7x")
    sig = beta_sigmas(cfg.total_steps, cfg.beta_alpha, cfg.beta_beta)
    plan = make_plan(cfg, 12, 12, sig)
    quiet = {i for i in range(1, plan.steps) if not plan.is_transition(i)}
    probe = gc.StepProbe(False, quiet, None)
    lat = torch.randn(1, 144, 4, generator=torch.Generator().manual_seed(0))

    def field(x, idx, sigma, step):
        # The sampler itself runs no value check (its indices take the trusted path); a velocity that
        # calls a checked public op at the transitions gives the probe passes to see there.
        if plan.is_transition(step):
            # a checked call on the full grid, on a backend whose value check runs in Python (the count's
            # subject; the token ops on cpp check inside the C++ kernel and are not counted)
            jk.gather_tokens(torch.zeros(1, 144, 1), idx, backend="reference")
        return gc._field(x, idx, sigma, step)

    with probe.active():
        jit_sample(field, lat, 12, 12, sig, cfg, torch.Generator().manual_seed(1), interrupt=probe.interrupt,
                   step_callback=probe.callback)
    assert len(probe.passes) == plan.steps
    assert sum(probe.passes[i] for i in quiet) == 0
    assert sum(probe.passes[i] for i in range(plan.steps) if plan.is_transition(i)) > 0  # the probe sees passes


def test_count_launches_one_window_per_step(tmp_path):
    from jit_sampler import JiTConfig, beta_sigmas, jit_sample

    kit = _kit(tmp_path)
    cfg = JiTConfig.preset("7x")
    sig = beta_sigmas(cfg.total_steps, cfg.beta_alpha, cfg.beta_beta)
    lat = torch.randn(1, 144, 4, generator=torch.Generator().manual_seed(0)).to(kit.device)
    wins = gc.count_launches(kit, lambda intr: jit_sample(gc._field, lat, 12, 12, sig, cfg, gc._gen(1), interrupt=intr))
    assert len(wins) == cfg.total_steps + 1  # setup, then one window per step
    key = "jit_kernels_ops" if kit.device == "cpu" else "kernels"
    assert wins[1][key] > 0  # step 0 gathers and lifts


def test_build_random_flux_has_no_uninitialised_state():
    pytest.importorskip("diffusers")
    cfg = gc.flux_config(dry=True)
    tr = gc.build_random_flux(cfg, "cpu", torch.float32)
    ps = dict(tr.named_parameters())
    assert all(torch.isfinite(p).all() for p in ps.values())
    w = ps["transformer_blocks.0.attn.to_q.weight"]
    assert abs(float(w.std()) - 1 / w.shape[1] ** 0.5) < 0.05 and tr.config.num_layers == 2


@pytest.mark.slow
@pytest.mark.skipif(not DRY, reason="the in-process dry run needs a CPU-only machine (TRITON_INTERPRET=1)")
def test_dry_run_section_json_schema(tmp_path, capsys):
    rc = gc.main(["--dry-run", "--section", "sampler", "--out", str(tmp_path)])
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rc == 0 and out["ok"] is True and out["failures"] == []
    assert {"ok", "env", "parity", "sampler", "syncs", "bench", "e2e", "sections"} <= set(out)
    assert out["env"]["dry_run"] is True and out["env"]["backends_under_test"] == ["cpp", "triton"]
    assert list(out["sections"]) == ["env", "sampler"] and out["sections"]["sampler"]["status"] == "ok"
    assert len(out["sampler"]) == 5 and all(r["ok"] and r["validation_passes_quiet_steps"] == 0 for r in out["sampler"])
    assert out["syncs"]["runs"][0]["syncs_quiet_steps"] is None  # not measured on CPU
    md = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in md and "| sampler | ok |" in md


@pytest.mark.skipif(not DRY, reason="CPU-only behaviour")
def test_gpu_run_refuses_without_cuda(tmp_path):
    assert gc.main(["--out", str(tmp_path)]) == 2


def test_prepare_env_refuses_to_switch_modes_in_process():
    import jit_kernels  # noqa: F401
    from jit_kernels.triton.common import INTERPRET

    with pytest.raises(RuntimeError, match="fresh process"):
        gc._prepare_env(not INTERPRET, None)


@pytest.mark.gpu
def test_gpu_parity_small_subset(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--section", "parity", "--small", "--out",
                        str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert out["ok"] and out["env"]["backends_under_test"] == ["cuda", "triton"] and len(out["parity"]) > 50


def test_strided_destination_probe_flags_an_unknown_divergence(tmp_path, monkeypatch):
    kit = _kit(tmp_path)

    def refuses_on_compiled(be):
        if be != "reference":
            raise ValueError("y must be contiguous")
        return torch.ones(2)

    monkeypatch.setattr(gc.parity, "KNOWN_ISSUES", {("lift_euler_", "strided destination"): "a tolerated disagreement"})
    monkeypatch.setattr(gc.parity, "strided_destination_probes", lambda dev: [("lift_euler_", refuses_on_compiled),
                                                                             ("fake_op_", refuses_on_compiled)])
    probes = gc.run_probes(kit)
    known, unknown = probes
    assert not known["consistent"] and known["known_issue"] and not unknown["consistent"] and "known_issue" not in unknown
    assert len(kit.failures) == 1 and "fake_op_ on a strided destination" in kit.failures[0]


@pytest.mark.slow
def test_bench_times_both_lift_variants(tmp_path, monkeypatch):
    from jit_kernels._env import LIFT_VARIANT

    monkeypatch.setenv(LIFT_VARIANT, "v1")  # restored by the bench afterwards
    kit = _kit(tmp_path)
    rows, skipped = gc.bench_variants(kit, gc.Budget(600))
    assert skipped == 0 and os.environ[LIFT_VARIANT] == "v1"
    assert {(r["op"], r["backend"]) for r in rows} == {(op, be) for op in gc.VARIANT_OPS for be in kit.backends}
    for r in rows:
        assert "error" not in r, r
        assert len(r["v1_us"]) == len(r["v2_us"]) == 3 and r["v2_speedup"] > 0
        assert r["same_bits"] is (None if r["op"] == "lift_euler_" else True), r
    kit.result["bench"] = {"timer": "t", "copy_bandwidth_GBps": 1.0, "attention": [], "variants": rows,
                           "ops": [{"op": "x", "size": "s", "dtype": "d", "backend": "b"}]}
    gc.write_report(kit)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "Kernel variants" in md
    assert sum(line.startswith("| lift_field | 16x16 B=1") for line in md.splitlines()) == len(kit.backends)


def test_sanitizer_error_count_is_read_as_a_number():
    assert gc._sanitizer_errors("========= ERROR SUMMARY: 0 errors\n") == 0
    assert gc._sanitizer_errors("========= ERROR SUMMARY: 10 errors\n") == 10  # not "ends with 0 errors"
    assert gc._sanitizer_errors("x\n========= ERROR SUMMARY: 1 error\n") == 1
    assert gc._sanitizer_errors("========= ERROR SUMMARY: 0 errors\n... ERROR SUMMARY: 2 errors") == 2  # the last
    assert gc._sanitizer_errors("no summary here") is None


@pytest.mark.slow
@pytest.mark.skipif(not DRY, reason="the in-process dry run needs a CPU-only machine (TRITON_INTERPRET=1)")
def test_time_limit_shrinks_every_budget_to_fit(tmp_path, capsys):
    rc = gc.main(["--dry-run", "--section", "sampler", "--time-limit", "170", "--out", str(tmp_path)])
    out = json.loads((tmp_path / "gpu_check.json").read_text())
    fit = out["env"]["time_limit"]["budget_fit"]
    assert rc == 0 and 0.3 < fit <= 0.5  # (170 - 20 - startup) / 300, startup a few seconds
    assert out["sections"]["sampler"]["budget_s"] == round(gc.BUDGET_DRY["sampler"] * fit)


def test_sanitizer_gets_what_is_left_or_nothing():
    assert gc.sanitizer_seconds(470.0, 300.0, dry=False) == 165.0  # the total less the others, less 5 s
    assert gc.sanitizer_seconds(470.0, 440.0, dry=False) is None  # under 30 s: not started (no floor)
    assert gc.sanitizer_seconds(300.0, 280.0, dry=True) == 15.0


@pytest.mark.slow
@pytest.mark.skipif(not DRY, reason="the in-process dry run needs a CPU-only machine (TRITON_INTERPRET=1)")
def test_relative_out_reaches_the_sanitizer_child(tmp_path, monkeypatch, capsys):
    # The child runs from the repository root: a relative --out must name the same folder there.
    monkeypatch.chdir(tmp_path)
    rc = gc.main(["--dry-run", "--section", "sanitizer", "--out", "rel"])
    out = json.loads((tmp_path / "rel" / "gpu_check.json").read_text())
    assert rc == 0 and out["sanitizer"]["status"] == "ok"
    assert (tmp_path / "rel" / "sanitizer" / "gpu_check.json").exists()
    assert not (ROOT / "rel").exists()


def test_stock_loop_step_is_the_velocity_wrappers_euler_step():
    # The stock row of the peak-memory table must run what FluxPipeline runs: one step of it equals
    # an Euler step with the package's FluxVelocity on every token.
    pytest.importorskip("diffusers")
    from benchmarks.gpu_check.memory import stock_loop
    from jit_sampler import FluxVelocity

    cfg = gc.flux_config(dry=True)
    tr = gc.build_random_flux(cfg, "cpu", torch.float32)
    g = gc._gen(5)
    h = w = 4
    prompt, pooled = torch.randn(1, 3, cfg["joint_attention_dim"], generator=g), torch.randn(1, 16, generator=g)
    text_ids = torch.zeros(3, 3)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(h), torch.arange(h * 1.0), torch.arange(w * 1.0),
                                         indexing="ij"), -1)[0].reshape(h * w, 3)
    lat = torch.randn(1, h * w, cfg["in_channels"], generator=g)
    guidance = torch.full((1,), 3.5)
    with torch.no_grad():
        y = stock_loop(tr, lat, prompt, pooled, text_ids, img_ids, guidance, [1.0, 0.75])
        v = FluxVelocity(tr, prompt, pooled, text_ids, img_ids, guidance=guidance)(lat, torch.arange(h * w)[None], 1.0, 0)
    torch.testing.assert_close(y, lat - 0.25 * v)
    assert not torch.equal(y, lat)


def test_memory_and_nf4_rows_say_why_they_are_skipped_without_cuda(tmp_path):
    from benchmarks.gpu_check.memory import peak_memory_rows
    from benchmarks.gpu_check.nf4 import nf4_check

    kit = _kit(tmp_path)
    if kit.device == "cuda":
        pytest.skip("the CUDA rows run in the kit's e2e section")
    called = []
    mem = peak_memory_rows(False, lambda: called.append(1), {"JiT 7x": lambda: called.append(1)}, 600, 1, "bf16")
    assert mem["status"].startswith("skipped: CUDA only") and "rows" not in mem and not called
    nf4 = nf4_check(kit)
    assert nf4["status"].startswith("skipped: CUDA only") and "bitsandbytes" in nf4["status"]
    kit.result["e2e"] = {"status": "ok", "rows": [], "peak_memory": mem, "nf4": nf4}
    kit.result.update(parity=[], bench={}, sanitizer={}, sections={}, env={})
    gc.write_report(kit)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "Peak GPU memory, stock loop vs JiT: skipped: CUDA only" in md
    assert "nf4 (bitsandbytes) transformer under model CPU offload, JiT 7x: skipped: CUDA only" in md
