"""Section ``sampler``: kernel launches, host syncs and index-validation passes per step of ``jit_sample``."""

from __future__ import annotations

import contextlib
import time
import traceback
import warnings
from typing import Callable

import torch

from .common import Budget, Kit, _gen, _quiet_fd2


def _field(x, idx, sigma, step):
    """A small velocity function: a few elementwise kernels, no host sync."""
    return 0.7 * x + torch.tanh(x.roll(1, dims=-1)) * sigma



def _passes() -> int:
    import jit_kernels as jk

    return sum(jk.validation_passes().values())



class StepProbe:
    """``interrupt`` + ``step_callback`` hooks of jit_sample that measure every step.

    Records index-validation passes per step and, on CUDA, host syncs per step: ``mode="warn"``
    counts synchronising calls in every step; ``mode="error"`` turns them into errors in the
    ``quiet`` steps (those that are not the first of a stage). The sync debug mode is switched
    on at the start of a step and off at its end, so the loop's setup and final synchronize are
    not counted.
    """

    def __init__(self, cuda: bool, quiet: set[int], mode: str | None):
        self.cuda, self.quiet, self.mode = cuda, quiet, mode
        self.step = 0
        self.passes: list[int] = []
        self.syncs: list[int] = []
        self.caught: list = []
        self._p0 = self._w0 = 0

    def _sync_warnings(self) -> int:
        return sum(1 for w in self.caught if "synchroniz" in str(w.message).lower())

    def interrupt(self) -> bool:
        i = self.step
        self.step += 1
        self._p0 = _passes()
        self._w0 = self._sync_warnings()
        if self.cuda and (self.mode == "warn" or (self.mode == "error" and i in self.quiet)):
            torch.cuda.set_sync_debug_mode(self.mode)
        return False

    def callback(self, i, sigma, y):
        if self.cuda and self.mode:
            torch.cuda.set_sync_debug_mode("default")
        self.passes.append(_passes() - self._p0)
        self.syncs.append(self._sync_warnings() - self._w0)

    @contextlib.contextmanager
    def active(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.caught = caught
            try:
                yield self
            finally:
                if self.cuda:
                    torch.cuda.set_sync_debug_mode("default")



def count_launches(kit: Kit, run: Callable[[Callable[[], bool]], object]) -> list[dict]:
    """Per profiler window (setup, then one per step): CUDA kernels and memcpy/memsets, or on CPU the op calls.

    ``run(interrupt)`` runs the sampler with ``interrupt`` as its hook; the hook steps the profiler.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule

    windows: list[dict] = []
    cuda = kit.device == "cuda"

    def ready(p):
        ev = p.events()
        if cuda:
            # GPU-side user annotations (the schedule's ProfilerStep#N ranges) are not kernels
            dev_ev = [e for e in ev if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]
            mem = sum(1 for e in dev_ev if e.name.lower().startswith(("memcpy", "memset")))
            windows.append({"kernels": len(dev_ev) - mem, "memcpy_memset": mem})
        else:
            windows.append({"jit_kernels_ops": sum(1 for e in ev if e.name.startswith("jit_kernels::")),
                            "aten_ops": sum(1 for e in ev if e.name.startswith("aten::"))})

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Pp]rofiler.*")  # "won't be using warmup", "clears events"
        with _quiet_fd2(), profile(activities=acts, schedule=schedule(wait=0, warmup=0, active=1),
                                   on_trace_ready=ready) as prof:
            def interrupt():
                prof.step()
                return False

            run(interrupt)
    return windows



def section_sampler(kit: Kit, budget: Budget) -> tuple[list[dict], dict]:
    import jit_kernels as jk
    from jit_kernels.testing import tokens
    from jit_sampler import JiTConfig, beta_sigmas, jit_sample, make_plan

    cuda = kit.device == "cuda"
    h = w = 16 if kit.dry else 64
    b, c = 2, (16 if kit.dry else 64)
    lat = tokens(b, h * w, c, offset=0.0, device=kit.device)
    runs = [("7x", "shared", "auto"), ("7x", "per_sample", "auto"), ("4x", "shared", "auto"),
            ("reference", "shared", "auto"), ("7x", "shared", "triton")]
    # What the velocity function launches by itself (subtracted to get the sampler's own launches).
    vwin = count_launches(kit, lambda intr: (intr(), _field(lat[:, : h * w // 3], None, 0.5, 0), intr()))
    v_launch = vwin[1] if len(vwin) > 1 else {}
    rows, sync_rows = [], []
    for preset, policy, backend in runs:
        if budget.over():
            rows.append({"preset": preset, "policy": policy, "backend": backend, "skipped": "out of budget"})
            continue
        name = f"{preset} {policy} backend={backend}"
        cfg = JiTConfig.preset(preset, anchor_policy=policy, backend=backend)
        sig = beta_sigmas(cfg.total_steps, cfg.beta_alpha, cfg.beta_beta)
        plan = make_plan(cfg, h, w, sig)
        quiet = {i for i in range(1, plan.steps) if not plan.is_transition(i)}
        row = {"preset": preset, "policy": policy, "backend": backend,
               "resolved_backend": jk._backends.resolve("lift_euler_", torch.device(kit.device), backend),
               "grid": f"{h}x{w} B={b} C={c}", "steps": plan.steps,
               "transition_steps": [i for i in range(plan.steps) if plan.is_transition(i)],
               "quiet_steps": sorted(quiet)}
        try:
            t = time.perf_counter()
            ref, _ = jit_sample(_field, lat, h, w, sig, cfg, _gen(1))  # warm-up: compiles the kernels
            kit.sync()
            row["warmup_s"] = round(time.perf_counter() - t, 3)
            # 1) launches per step
            wins = count_launches(kit, lambda intr: jit_sample(_field, lat, h, w, sig, cfg, _gen(1), interrupt=intr))
            key = "kernels" if cuda else "jit_kernels_ops"
            per_step = [wn.get(key, 0) for wn in wins[1:plan.steps + 1]]
            row["launch_unit"] = "CUDA kernels" if cuda else "jit_kernels op calls (CPU stand-in for launches)"
            row["setup_launches"] = wins[0] if wins else None
            row["launches_per_step"] = per_step
            row["velocity_fn_launches"] = v_launch.get(key)
            row["launches_quiet_step_max"] = max((per_step[i] for i in quiet if i < len(per_step)), default=None)
            # 2) validation passes (and on CUDA syncs) per step
            probe = StepProbe(cuda, quiet, "warn" if cuda else None)
            jk.reset_validation_passes()
            t = time.perf_counter()
            with probe.active():
                y, rep = jit_sample(_field, lat, h, w, sig, cfg, _gen(1), interrupt=probe.interrupt,
                                    step_callback=probe.callback)
            kit.sync()
            row["time_s"] = round(time.perf_counter() - t, 3)
            row["validation_passes_per_step"] = probe.passes
            row["validation_passes_run"] = jk.validation_passes()
            quiet_passes = sum(probe.passes[i] for i in quiet)
            row["validation_passes_quiet_steps"] = quiet_passes
            same = bool(torch.allclose(y, ref, rtol=1e-6, atol=1e-6))
            row["deterministic"] = same
            ok = quiet_passes == 0 and same
            srow = {"run": name, "quiet_steps": len(quiet)}
            if cuda:
                row["syncs_per_step"] = probe.syncs
                srow["syncs_quiet_steps"] = sum(probe.syncs[i] for i in quiet)
                srow["syncs_transition_and_first_steps"] = sum(s for i, s in enumerate(probe.syncs) if i not in quiet)
                # 3) "error" on the quiet steps: any sync there raises
                probe_e = StepProbe(True, quiet, "error")
                try:
                    with probe_e.active():
                        jit_sample(_field, lat, h, w, sig, cfg, _gen(1), interrupt=probe_e.interrupt,
                                   step_callback=probe_e.callback)
                    srow["error_mode"] = "no sync in the quiet steps"
                except RuntimeError as exc:
                    srow["error_mode"] = f"sync at step {probe_e.step - 1}: {str(exc)[:300]}"
                    ok = False
                ok &= srow["syncs_quiet_steps"] == 0
            else:
                srow["syncs_quiet_steps"] = None
                srow["note"] = "CPU: no syncs to count; validation passes in the quiet steps stand in"
                srow["validation_passes_quiet_steps"] = quiet_passes
            row["ok"] = ok
            sync_rows.append(srow)
            if not ok:
                kit.fail("sampler", f"{name}: quiet-step validation passes {quiet_passes}, deterministic {same}, "
                                    f"syncs {srow.get('syncs_quiet_steps')}, {srow.get('error_mode', '')}")
        except Exception as exc:
            row.update(ok=False, error=repr(exc)[:400])
            kit.fail("sampler", f"{name}: {exc!r}"[:400])
            traceback.print_exc()
        rows.append(row)
        kit.log(f"  sampler {name}: launches/step {row.get('launches_per_step')}, "
                f"validation passes/step {row.get('validation_passes_per_step')}"
                + (f", syncs/step {row.get('syncs_per_step')}" if cuda else ""))
    syncs = {"method": "torch.cuda.set_sync_debug_mode: 'warn' counts per step, 'error' on the quiet steps"
             if cuda else "not measured on CPU (dry run): validation passes per step instead", "runs": sync_rows}
    return rows, syncs
